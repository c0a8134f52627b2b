"""VSTOR protocol core (devices/storvsc/protocol.py), sans-IO, driven by byte scripts.

The scripts are the packets Linux 6.1's storvsc_channel_init and
storvsc_queuecommand put on the wire (storvsc_drv.c): 64-byte vstor_packets with
REQUEST_COMPLETION_FLAG, written out here as hex so the layout is checked, not
rebuilt with the code under test."""

from __future__ import annotations

import importlib.util
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.storvsc.protocol import (
    PACKET_SIZE,
    PACKET_SIZE_PRE_WIN8,
    CreateSubChannels,
    DataIn,
    ExecuteSrb,
    NtStatus,
    Reply,
    SrbStatus,
    VstorOp,
    VstorProtocol,
    VstorState,
    decode_srb_reply,
    encode_srb,
    srb_request,
)
from vmbus.device import GuestError


def pkt(op: int, body: bytes = b"", size: int = 64) -> bytes:
    """A vstor_packet spelled out: op, flags = REQUEST_COMPLETION_FLAG, status 0."""
    return (struct.pack("<III", op, 1, 0) + body).ljust(size, b"\0")


# Linux 6.1: BEGIN_INITIALIZATION, then versions newest first.
BEGIN = bytes.fromhex("070000000100000000000000") + bytes(52)
QUERY_WIN10 = bytes.fromhex("09000000010000000000000002060000") + bytes(48)
QUERY_WIN8_1 = bytes.fromhex("09000000010000000000000000060000") + bytes(48)
QUERY_PROPS = bytes.fromhex("0a0000000100000000000000") + bytes(52)
END = bytes.fromhex("080000000100000000000000") + bytes(52)
CREATE_1 = bytes.fromhex("0d00000001000000000000000100") + bytes(50)

# READ(10) of 8 blocks at LBA 0x10 to LUN 2, as queuecommand fills the vmscsi_request:
# length 0x34, port 0, path 0, target 0, lun 2, cdb_length 10, sense 0x14, data_in 1,
# data_transfer_length 4096, CDB, queue_tag 0xff, queue_action 0x20,
# srb_flags 0x14a (QUEUE_ACTION_ENABLE | DISABLE_SYNCH | DATA_IN | NO_QUEUE_FREEZE),
# time_out_value 60.
READ10 = (
    bytes.fromhex("03000000" "01000000" "00000000")
    + bytes.fromhex("3400" "00" "00" "00" "00" "00" "02" "0a" "14" "01" "00" "00100000")
    + bytes.fromhex("28000000001000000800") + bytes(10)
    + bytes.fromhex("0000" "ff" "20" "4a010000" "3c000000" "00000000")
)  # fmt: skip


def ready(max_sub: int = 4) -> VstorProtocol:
    p = VstorProtocol(max_sub_channels=max_sub)
    for step in (BEGIN, QUERY_WIN10, QUERY_PROPS, END):
        ev = p.receive(step)
        assert isinstance(ev, Reply)
    return p


def status_of(payload: bytes) -> tuple[int, int]:
    op, _flags, status = struct.unpack_from("<III", payload)
    return op, status


def test_layouts() -> None:
    assert len(READ10) == PACKET_SIZE == len(BEGIN) == len(CREATE_1)
    assert (
        srb_request(
            encode_srb(
                lun=2,
                cdb=bytes.fromhex("28000000001000000800"),
                data_in=DataIn.READ,
                data_transfer_length=4096,
                srb_flags=0x14A,
                queue_tag=0xFF,
                queue_action=0x20,
            )
        )
        == READ10
    )


def test_linux_init_sequence() -> None:
    p = VstorProtocol(max_sub_channels=4, max_transfer_bytes=0x40000)
    r = p.receive(BEGIN)
    assert isinstance(r, Reply) and r.payload == bytes.fromhex("010000000000000000000000") + bytes(
        52
    )
    r = p.receive(QUERY_WIN10)
    assert isinstance(r, Reply)
    # completion: op COMPLETE_IO, flags 0, status 0, the version echoed
    assert r.payload == bytes.fromhex("01000000000000000000000002060000") + bytes(48)
    r = p.receive(QUERY_PROPS)
    assert isinstance(r, Reply)
    # reserved 0, max_channel_cnt 4, reserved, flags MULTI_CHANNEL, max_transfer 0x40000
    props = bytes.fromhex("00000000040000000100000000000400") + bytes(8)
    assert r.payload == bytes.fromhex("010000000000000000000000") + props + bytes(28)
    r = p.receive(END)
    assert isinstance(r, Reply) and status_of(r.payload) == (VstorOp.COMPLETE_IO, 0)
    assert p.state == VstorState.READY and p.version == 0x0602
    ev = p.receive(CREATE_1)
    assert ev == CreateSubChannels(1)
    assert status_of(p.subchannels_created()) == (VstorOp.COMPLETE_IO, 0)


@pytest.mark.parametrize("version", [0x0602, 0x0600, 0x0501, 0x0402, 0x0200])
def test_versions_accepted(version: int) -> None:
    p = VstorProtocol()
    p.receive(BEGIN)
    r = p.receive(pkt(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", version, 0)))
    assert isinstance(r, Reply) and status_of(r.payload)[1] == 0
    assert p.size == (64 if version >= 0x0501 else 48)


@pytest.mark.parametrize("version", [0x0001, 0x0100, 0x0603, 0x0700, 0xFFFF, 0x0601])
def test_versions_refused(version: int) -> None:
    p = VstorProtocol()
    p.receive(BEGIN)
    r = p.receive(pkt(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", version, 0)))
    assert isinstance(r, Reply)
    assert status_of(r.payload) == (VstorOp.COMPLETE_IO, NtStatus.REVISION_MISMATCH)
    assert r.payload[12:14] == struct.pack("<H", version)
    assert p.state == VstorState.QUERY_VERSION  # the guest tries its next one
    r = p.receive(QUERY_WIN8_1)
    assert isinstance(r, Reply) and status_of(r.payload)[1] == 0


def test_pre_win8_sizes() -> None:
    """A guest on the old 48-byte size (FreeBSD/old Linux): replies mirror it, and
    after a pre-WIN8 negotiation everything is 48 bytes."""
    p = VstorProtocol(max_sub_channels=2)
    r = p.receive(BEGIN[:48])
    assert isinstance(r, Reply) and len(r.payload) == PACKET_SIZE_PRE_WIN8
    r = p.receive(pkt(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", 0x0402, 0), 48))
    assert isinstance(r, Reply) and len(r.payload) == 48
    r = p.receive(QUERY_PROPS[:48])
    assert isinstance(r, Reply) and r.payload[16:18] == b"\0\0"  # no multi-channel < 5.1
    p.receive(END[:48])
    srb = encode_srb(cdb=bytes(6), win8=False)
    ev = p.receive(srb_request(srb, size=48))
    assert isinstance(ev, ExecuteSrb) and ev.srb.sense_info_length == 0x12
    done = p.complete_srb(ev.srb, 0, b"", 0)
    assert len(done) == 48 and done[12:14] == b"\x24\x00"
    with pytest.raises(GuestError) as exc:
        p.receive(READ10)  # 64 bytes after a 48-byte negotiation
    assert exc.value.status is None
    assert p.enumerate_bus() == struct.pack("<III", 11, 0, 0) + bytes(36)


def test_srb_decode_and_completion() -> None:
    p = ready()
    ev = p.receive(READ10, data_bytes=4096)
    assert isinstance(ev, ExecuteSrb)
    s = ev.srb
    assert (s.path_id, s.target_id, s.lun, s.data_in) == (0, 0, 2, DataIn.READ)
    assert s.cdb == bytes.fromhex("28000000001000000800") and s.data_transfer_length == 4096
    assert (s.sense_info_length, s.srb_flags, s.time_out_value) == (0x14, 0x14A, 60)
    ok = p.complete_srb(s, 0, b"", 4096)
    assert len(ok) == 64 and status_of(ok) == (VstorOp.COMPLETE_IO, 0)
    _op, r = decode_srb_reply(ok)
    assert (r.srb_status, r.scsi_status, r.data_transfer_length) == (1, 0, 4096)
    # underrun: SUCCESS with the short length (never more than asked)
    assert decode_srb_reply(p.complete_srb(s, 0, b"", 100))[1].data_transfer_length == 100
    assert decode_srb_reply(p.complete_srb(s, 0, b"", 1 << 20))[1].data_transfer_length == 4096
    # CHECK CONDITION: 18-byte sense, capped by the 20 the guest offered
    sense = bytes.fromhex("700003000000000a000000001100000000")
    sense = sense.ljust(18, b"\0")
    _op, r = decode_srb_reply(p.complete_srb(s, 2, sense, 0))
    assert (r.srb_status, r.scsi_status, r.sense_info_length) == (0x84, 2, 18)
    assert r.sense == sense and r.status == NtStatus.IO_DEVICE_ERROR
    illegal = bytearray(18)
    illegal[2], illegal[12] = 5, 0x24
    assert decode_srb_reply(p.complete_srb(s, 2, bytes(illegal), 0))[1].srb_status == 0x86
    absent = decode_srb_reply(p.srb_failure(s, SrbStatus.INVALID_LUN))[1]
    assert (absent.srb_status, absent.scsi_status, absent.status) == (
        0x20,
        0,
        NtStatus.DEVICE_DOES_NOT_EXIST,
    )


def test_sense_capped_by_the_guest_offer() -> None:
    p = ready()
    body = bytearray(READ10)
    body[21] = 6  # sense_info_length
    ev = p.receive(bytes(body), data_bytes=4096)
    assert isinstance(ev, ExecuteSrb)
    r = decode_srb_reply(p.complete_srb(ev.srb, 2, bytes(range(18)), 0))[1]
    assert r.sense_info_length == 6 and r.sense == bytes(range(6))
    body[21] = 200  # more than the buffer: clamped to 20
    ev = p.receive(bytes(body), data_bytes=4096)
    assert isinstance(ev, ExecuteSrb) and ev.srb.sense_info_length == 20


def refused(p: VstorProtocol, payload: bytes, **kw: object) -> tuple[int | None, bytes]:
    with pytest.raises(GuestError) as exc:
        p.receive(payload, **kw)  # type: ignore[arg-type]
    st = exc.value.status
    return st, (p.failure_reply(st) if st is not None else b"")


def test_io_before_end_initialization() -> None:
    p = VstorProtocol()
    p.receive(BEGIN)
    st, reply = refused(p, READ10, data_bytes=4096)
    assert st == NtStatus.INVALID_DEVICE_STATE
    r = decode_srb_reply(reply)[1]
    assert r.srb_status == 0x86 and r.scsi_status == 2 and len(reply) == 64
    assert p.state == VstorState.QUERY_VERSION  # unchanged


@pytest.mark.parametrize(
    "first",
    [QUERY_WIN10, QUERY_PROPS, END, CREATE_1, pkt(VstorOp.RESET_BUS)],
)
def test_out_of_order(first: bytes) -> None:
    st, reply = refused(VstorProtocol(max_sub_channels=2), first)
    assert st == NtStatus.INVALID_DEVICE_STATE
    assert status_of(reply) == (VstorOp.COMPLETE_IO, NtStatus.INVALID_DEVICE_STATE)


def test_second_begin_refused_until_reset() -> None:
    p = ready()
    assert refused(p, BEGIN)[0] == NtStatus.INVALID_DEVICE_STATE
    p.reset()
    assert isinstance(p.receive(BEGIN), Reply)


@pytest.mark.parametrize("op", [0, 1, 2, 11, 12, 14, 0xFFFFFFFF])
def test_unknown_and_host_operations(op: int) -> None:
    st, reply = refused(ready(), pkt(op))
    assert st == NtStatus.INVALID_DEVICE_REQUEST
    assert status_of(reply)[1] == NtStatus.INVALID_DEVICE_REQUEST


@pytest.mark.parametrize("n", [0, 8, 12, 40, 56, 72, 128])
def test_wrong_sizes_reset(n: int) -> None:
    p = ready()
    st, _ = refused(p, READ10.ljust(n, b"\0")[:n], data_bytes=4096)
    assert st is None


def test_sub_channel_rules() -> None:
    p = ready(max_sub=4)
    assert refused(p, pkt(VstorOp.CREATE_SUB_CHANNELS, b"\0\0"))[0] == NtStatus.INVALID_PARAMETER
    assert refused(p, pkt(VstorOp.CREATE_SUB_CHANNELS, b"\5\0"))[0] == NtStatus.INVALID_PARAMETER
    assert refused(p, CREATE_1, primary=False)[0] == NtStatus.INVALID_DEVICE_STATE
    assert p.receive(pkt(VstorOp.CREATE_SUB_CHANNELS, b"\4\0")) == CreateSubChannels(4)
    assert refused(p, CREATE_1)[0] == NtStatus.INVALID_DEVICE_STATE  # twice
    # no multi-channel advertised: refused
    assert refused(ready(max_sub=0), CREATE_1)[0] == NtStatus.INVALID_DEVICE_STATE
    # init operations belong on the primary
    assert refused(VstorProtocol(), BEGIN, primary=False)[0] == NtStatus.INVALID_DEVICE_STATE
    # SRBs and resets go on any channel
    assert isinstance(ready().receive(READ10, primary=False, data_bytes=4096), ExecuteSrb)


def test_create_sub_channels_before_end() -> None:
    p = VstorProtocol(max_sub_channels=2)
    for step in (BEGIN, QUERY_WIN10, QUERY_PROPS):
        p.receive(step)
    assert p.receive(CREATE_1) == CreateSubChannels(1)
    assert isinstance(p.receive(END), Reply)


def test_resets() -> None:
    p = ready()
    for op in (VstorOp.RESET_LUN, VstorOp.RESET_BUS, VstorOp.RESET_ADAPTER):
        r = p.receive(pkt(op))
        assert isinstance(r, Reply) and status_of(r.payload) == (VstorOp.COMPLETE_IO, 0)
    assert p.ready


def test_bad_srb_fields() -> None:
    p = ready()

    def srb(**kw: object) -> bytes:
        return srb_request(encode_srb(**kw))  # type: ignore[arg-type]

    cdb10 = bytes.fromhex("28000000001000000800")
    cases = [
        (srb(cdb=cdb10, cdb_length=17, data_in=1, data_transfer_length=4096), 4096),
        (srb(cdb=cdb10, cdb_length=0, data_in=1, data_transfer_length=4096), 4096),
        (srb(cdb=cdb10, data_in=3, data_transfer_length=4096), 4096),
        (srb(cdb=cdb10, data_in=1, data_transfer_length=4096), 8192),  # ranges disagree
        (srb(cdb=cdb10, data_in=1, data_transfer_length=4096), 0),  # inband with data
        (srb(cdb=cdb10, data_in=2, data_transfer_length=4096), 4096),  # no-data with data
        (srb(cdb=cdb10, data_in=1, data_transfer_length=1 << 20), 1 << 20),  # > max
    ]
    for payload, data_bytes in cases:
        st, reply = refused(p, payload, data_bytes=data_bytes)
        assert st == NtStatus.INVALID_PARAMETER
        r = decode_srb_reply(reply)[1]
        assert (r.srb_status, r.scsi_status, r.sense[2], r.sense[12]) == (0x86, 2, 5, 0x24)
    # a control operation with a data buffer
    assert refused(p, pkt(VstorOp.RESET_BUS), data_bytes=4096)[0] == NtStatus.INVALID_PARAMETER


def test_enumerate_bus_only_when_ready() -> None:
    p = VstorProtocol()
    assert p.enumerate_bus() is None
    p = ready()
    assert p.enumerate_bus() == struct.pack("<III", VstorOp.ENUMERATE_BUS, 0, 0) + bytes(52)


def test_config_limits() -> None:
    with pytest.raises(ValueError):
        VstorProtocol(max_transfer_bytes=1000)
    with pytest.raises(ValueError):
        VstorProtocol(max_sub_channels=-1)


def _load_fuzz() -> Any:
    path = pathlib.Path(__file__).resolve().parent / "fuzz" / "fuzz_vstor.py"
    spec = importlib.util.spec_from_file_location("fuzz_vstor", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1500))
def test_fuzz_target_as_property(data: bytes) -> None:
    """The atheris target's invariants on random scripts (tests/fuzz/fuzz_vstor.py)."""
    fuzz.check_one(data)


def test_fuzz_target_reaches_srbs() -> None:
    """A script the fuzzer finds early: init, then a valid READ(10) SRB."""
    script = b"\x01" + bytes([0, 0, 3, 0]) + READ10
    fuzz.check_one(script)
    p = ready()
    fuzz.check_step(p, READ10, True, 4096)
