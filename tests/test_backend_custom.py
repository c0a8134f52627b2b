"""The custom-backend example of docs/backends.md, run as the guest would see it.

The test imports the very code the document shows: the document's code block must
equal devices/storvsc/backends/examples.py, byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path

from disk_model import GOOD, disk_ops, read10, run_disk_model, scsi, sense_key_asc, write10
from hypothesis import given, settings

import devices.storvsc.backends.examples as examples
from devices.storvsc.backends.base import DiskBackend, load_backend
from devices.storvsc.backends.examples import FaultyDisk
from devices.storvsc.scsi import ScsiController

ROOT = Path(__file__).resolve().parent.parent
BS = 512
BAD = (10, 11, 500)


def test_document_shows_this_very_code():
    doc = (ROOT / "docs" / "backends.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    source = Path(examples.__file__).read_text()
    assert source in blocks, "docs/backends.md must show examples.py verbatim"


async def test_document_usage_snippet_runs():
    doc = (ROOT / "docs" / "backends.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "add_lun" in b)
    scope: dict[str, object] = {}
    exec(snippet, scope)
    controller = scope["controller"]
    assert isinstance(controller, ScsiController)
    res, _ = await scsi(controller, read10(2048, 1), data_in_len=BS)
    assert sense_key_asc(res) == (0x3, 0x11, 0x00)
    assert int.from_bytes(res.sense[3:7], "big") == 2048
    res, _ = await scsi(controller, read10(2050, 1), data_in_len=BS)
    assert res.status == GOOD


def faulty_lun(**opts: object) -> ScsiController:
    backend = load_backend(
        "devices.storvsc.backends.examples:FaultyDisk",
        {"size": "1M", "bad_lbas": list(BAD), **opts},
    )
    assert isinstance(backend, DiskBackend)
    ctrl = ScsiController()
    ctrl.add_lun(0, backend)
    return ctrl


async def test_medium_errors_on_chosen_lbas_only():
    ctrl = faulty_lun()
    for lba, blocks, failing in ((10, 1, 10), (8, 4, 10), (11, 1, 11), (499, 2, 500)):
        res, _ = await scsi(ctrl, read10(lba, blocks), data_in_len=blocks * BS)
        assert sense_key_asc(res) == (0x3, 0x11, 0x00)  # MEDIUM ERROR, UNRECOVERED READ ERROR
        assert res.sense[0] == 0xF0 and int.from_bytes(res.sense[3:7], "big") == failing
        assert res.transferred == 0
        res, _ = await scsi(ctrl, write10(lba, blocks), data_out=bytes(blocks * BS))
        assert sense_key_asc(res) == (0x3, 0x0C, 0x00)  # MEDIUM ERROR, WRITE ERROR
    # Normal service elsewhere, right after the errors.
    data = b"\x5a" * 2 * BS
    for lba in (0, 12, 498, 2046):
        res, _ = await scsi(ctrl, write10(lba, 2), data_out=data)
        assert res.status == GOOD
        res, got = await scsi(ctrl, read10(lba, 2), data_in_len=2 * BS)
        assert res.status == GOOD and got == data


async def test_reads_only_mode():
    ctrl = faulty_lun(fail_writes=False)
    res, _ = await scsi(ctrl, write10(10, 1), data_out=bytes(BS))
    assert res.status == GOOD
    res, _ = await scsi(ctrl, read10(10, 1), data_in_len=BS)
    assert sense_key_asc(res) == (0x3, 0x11, 0x00)


@settings(max_examples=20, deadline=None)
@given(ops=disk_ops(blocks=128))
async def test_healthy_faulty_disk_matches_model(ops):
    """A plug-in backend gets the same integrity check as the built-in ones."""
    await run_disk_model(FaultyDisk(size=128 * BS), ops)
