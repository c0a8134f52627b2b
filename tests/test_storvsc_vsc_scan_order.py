"""The simulated guest's SCSI scan goes in the real Linux 6.1 guest's order.

Why: Linux's __scsi_scan_target probes LUN 0 first (scsi_probe_and_add_lun: INQUIRY
36, INQUIRY again with the length the data gives, then scsi_add_lun's VPD pages) and
only then sends REPORT LUNS (scsi_report_lun_scan). A host that answered REPORT LUNS
before any INQUIRY, or only after one, would pass our simulated guest either way;
the capture (tests/data/real_linux_6.1_storvsc_init.json, the real hv_storvsc on
the KVM tier) says which order real guests use, and our VSC must use it too.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from kvm_record import RecordingStorvsc

from devices.storvsc.protocol import SCSI_IF_TYPE, VMBUS_RQST_INIT
from devices.storvsc.vsc import attach_storvsc
from vmbus.guest.vm import SimulatedVm

DATA = Path(__file__).parent / "data" / "real_linux_6.1_storvsc_init.json"
INQUIRY, REPORT_LUNS = 0x12, 0xA0


def _capture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DATA.read_text())
    return data


def _scan_steps(records: list[dict[str, Any]]) -> dict[tuple[int, int], list[tuple[Any, ...]]]:
    """Per (path, target), in the order the host got them: standard INQUIRYs
    ("INQUIRY", lun, allocation length), VPD INQUIRYs ("VPD", lun, page) and
    ("REPORT LUNS",); other commands left out (sd's, which Linux runs concurrently)."""
    steps: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
    for r in records:
        if r["dir"] != "in" or r["trans_id"] == VMBUS_RQST_INIT:
            continue
        srb = bytes.fromhex(r["payload"])[12:]
        path, target, lun, cdb = srb[5], srb[6], srb[7], srb[16 : 16 + srb[8]]
        if cdb[0] == INQUIRY and cdb[1] & 1:
            step: tuple[Any, ...] = ("VPD", lun, cdb[2])
        elif cdb[0] == INQUIRY:
            step = ("INQUIRY", lun, int.from_bytes(cdb[3:5], "big"))
        elif cdb[0] == REPORT_LUNS:
            step = ("REPORT LUNS",)
        else:
            continue
        steps.setdefault((path, target), []).append(step)
    return steps


def _before_report(steps: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return steps[: steps.index(("REPORT LUNS",))]


def test_the_capture_probes_lun_0_before_report_luns() -> None:
    """What the real driver did, spelled out (so the comparison below means it):
    on every target it scanned, INQUIRY 36 then 96 to LUN 0 before REPORT LUNS."""
    real = _scan_steps(_capture()["packets"])
    assert set(real) >= {(0, 0), (0, 1), (1, 0)}
    for where in [(0, 0), (0, 1), (1, 0)]:
        std = [s for s in real[where] if s[0] != "VPD"]
        assert std[:3] == [("INQUIRY", 0, 36), ("INQUIRY", 0, 96), ("REPORT LUNS",)], where
    # LUN 0 of target 0 is there: its VPD pages are read before REPORT LUNS too
    assert {("VPD", 0, 0x80), ("VPD", 0, 0x83)} <= set(_before_report(real[(0, 0)]))


class CapturedController(RecordingStorvsc):
    """The capture's controller (instance, LUNs), recording what the simulated VSC sends."""

    def __init__(self) -> None:
        (dev_cfg,) = tomllib.loads(_capture()["config"])["device"]
        super().__init__(uuid.UUID(dev_cfg["instance"]), lun=dev_cfg["lun"])


@pytest.mark.devices.with_args(CapturedController)
async def test_simulated_vsc_scans_in_the_real_order(
    local_vm: SimulatedVm, local_service: Any
) -> None:
    """Against the capture's controller, per target: the simulated VSC's INQUIRYs and
    REPORT LUNS come in the real driver's order (each target's sequence starts as the
    capture's does); the VPD pages it reads from LUN 0 before REPORT LUNS are ones the
    real driver read before its REPORT LUNS; and it found the disk."""
    (offer,) = [o for o in local_vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
    async with attach_storvsc(local_vm, offer) as hba:
        assert 0 in hba.disks
    (dev,) = [d for d in local_service.session().devices if isinstance(d, CapturedController)]
    ours = _scan_steps(dev.records)
    real = _scan_steps(_capture()["packets"])
    for where, steps in real.items():
        std_real = [s for s in steps if s[0] != "VPD"]
        std_ours = [s for s in ours[where] if s[0] != "VPD"]
        assert std_ours[: len(std_real)] == std_real, where
    vpd_ours = {s for s in _before_report(ours[(0, 0)]) if s[0] == "VPD"}
    assert vpd_ours and vpd_ours <= set(_before_report(real[(0, 0)]))
