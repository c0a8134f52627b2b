"""The NVSP core driven as Linux 6.1's hv_netvsc drives it (netvsc.c), byte for byte,
and every refusal the issue lists. The guest-side checks below transcribe what
Linux does with our answers (netvsc_send_completion, netvsc_init_buf,
netvsc_send_table), so an answer Linux would drop fails here."""

from __future__ import annotations

import importlib.util
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.netvsc import protocol as nv
from devices.netvsc.protocol import Msg, NvspError, NvspServer, Status
from vmbus.device import GuestError


def _load_fuzz() -> Any:
    path = pathlib.Path(__file__).resolve().parent / "fuzz" / "fuzz_nvsp.py"
    spec = importlib.util.spec_from_file_location("fuzz_nvsp", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_one = _load_fuzz().check_one

LINUX_VERSIONS = (  # netvsc_connect_vsp's ver_list, newest first
    nv.NVSP_PROTOCOL_VERSION_61,
    nv.NVSP_PROTOCOL_VERSION_6,
    nv.NVSP_PROTOCOL_VERSION_5,
    nv.NVSP_PROTOCOL_VERSION_4,
    nv.NVSP_PROTOCOL_VERSION_2,
    nv.NVSP_PROTOCOL_VERSION_1,
)
RECV_BUF = (16 * 1024 * 1024 // 1728 * 1728 + 4095) & ~4095  # NETVSC_DEFAULT_RX, page-rounded
SEND_BUF = (1024 * 1024 // 6144 * 6144 + 4095) & ~4095  # NETVSC_DEFAULT_TX


def linux_msg(msg_type: int, fmt: str = "", *fields: int) -> bytes:
    """A struct nvsp_message as Linux sends it: zeroed, 40 bytes."""
    body = struct.pack("<I" + fmt, msg_type, *fields)
    assert len(body) <= 40
    return body.ljust(40, b"\0")


# sizeof(header) + sizeof(the body) for each completion Linux checks.
_LINUX_MIN = {
    Msg.INIT_COMPLETE: 4 + 12,
    Msg.SEND_RECV_BUF_COMPLETE: 4 + 24,
    Msg.SEND_SEND_BUF_COMPLETE: 4 + 8,
    Msg.SUBCHANNEL: 4 + 8,
    Msg.SEND_RNDIS_PKT_COMPLETE: 4 + 4,
}
_CHAIN = [Msg.INIT_COMPLETE, Msg.SEND_RECV_BUF_COMPLETE, Msg.SEND_SEND_BUF_COMPLETE, Msg.SUBCHANNEL]


def linux_accepts_completion(reply: bytes) -> bool:
    """netvsc_send_completion (5.11-6.6): the control completions' length checks
    fall through, so INIT_COMPLETE must be as long as a receive-buffer completion."""
    msglen = (len(reply) + 7) & ~7  # what VMBus delivers
    (msg_type,) = struct.unpack_from("<I", reply)
    if msg_type in _CHAIN:
        return all(msglen >= _LINUX_MIN[t] for t in _CHAIN[_CHAIN.index(msg_type) :])
    return msg_type in _LINUX_MIN and msglen >= _LINUX_MIN[msg_type]


def status_of(reply: bytes) -> int:
    (msg_type,) = struct.unpack_from("<I", reply)
    off = 12 if msg_type == Msg.INIT_COMPLETE else 4
    return int(struct.unpack_from("<I", reply, off)[0])


def linux_negotiate(server: NvspServer) -> int:
    """negotiate_nvsp_ver for each version, newest first; NDIS config after success."""
    for ver in LINUX_VERSIONS:
        ev = server.receive(linux_msg(Msg.INIT, "II", ver, ver))
        assert isinstance(ev, nv.Initialized)
        assert len(ev.reply) == nv.NVSP_MESSAGE_SIZE and linux_accepts_completion(ev.reply)
        if status_of(ev.reply) == Status.SUCCESS:
            assert ev.version == ver
            if ver != nv.NVSP_PROTOCOL_VERSION_1:
                caps = nv.CAP_IEEE8021Q
                if ver >= nv.NVSP_PROTOCOL_VERSION_5:
                    caps |= nv.CAP_SRIOV | nv.CAP_TEAMING
                if ver >= nv.NVSP_PROTOCOL_VERSION_61:
                    caps |= nv.CAP_RSC
                cfg = server.receive(linux_msg(Msg.SEND_NDIS_CONFIG, "IIQ", 1514, 0, caps))
                assert cfg == nv.NdisConfig(1514, caps)
            return ver
        assert ev.version is None
    raise AssertionError("no version accepted")


def linux_connect(server: NvspServer) -> tuple[nv.ReceiveLayout, nv.SendLayout]:
    """netvsc_connect_vsp + netvsc_init_buf, checking the answers as Linux does."""
    ver = linux_negotiate(server)
    ndis = 0x00060001 if ver <= nv.NVSP_PROTOCOL_VERSION_4 else 0x0006001E
    ev = server.receive(linux_msg(Msg.SEND_NDIS_VER, "II", ndis >> 16, ndis & 0xFFFF))
    assert ev == nv.NdisVersion(6, ndis & 0xFFFF)
    ev = server.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 0x1234, nv.NETVSC_RECEIVE_BUFFER_ID))
    assert ev == nv.MapReceiveBuffer(0x1234, 0xCAFE)
    size = (
        min(RECV_BUF, nv.MAX_RECV_BUFFER_LEGACY) if ver <= nv.NVSP_PROTOCOL_VERSION_2 else RECV_BUF
    )
    reply = server.receive_buffer_mapped(size)
    assert linux_accepts_completion(reply)
    _, status, nsec, offset, sub, count, end = struct.unpack_from("<7I", reply)
    assert (status, nsec, offset) == (Status.SUCCESS, 1, 0)
    assert sub >= 68 and sub * count <= size and end == sub * count
    ev = server.receive(linux_msg(Msg.SEND_SEND_BUF, "IH", 0x1235, nv.NETVSC_SEND_BUFFER_ID))
    assert ev == nv.MapSendBuffer(0x1235, 0)
    reply = server.send_buffer_mapped(SEND_BUF)
    assert linux_accepts_completion(reply)
    _, status, section = struct.unpack_from("<3I", reply)
    assert status == Status.SUCCESS and section >= 68
    assert server.receive_layout is not None and server.send_layout is not None
    assert server.send_layout.count == SEND_BUF // section
    return server.receive_layout, server.send_layout


def ready(max_subchannels: int = 7) -> NvspServer:
    s = NvspServer(max_subchannels=max_subchannels)
    linux_connect(s)
    return s


def test_linux_61_init_sequence() -> None:
    s = NvspServer(max_subchannels=7)
    rx, tx = linux_connect(s)
    assert s.version == nv.NVSP_PROTOCOL_VERSION_61 and s.phase is nv.Phase.READY
    assert s.ndis_version == (6, 30) and s.mtu == 1514
    assert (
        rx.section_size == nv.receive_section_size(1514) and rx.count == RECV_BUF // rx.section_size
    )
    assert tx.section_size == nv.SEND_SECTION_SIZE


@pytest.mark.parametrize("newest", sorted(nv.SUPPORTED_VERSIONS))
def test_linux_falls_back_to_what_the_host_has(newest: int) -> None:
    s = NvspServer(versions=frozenset(v for v in nv.SUPPORTED_VERSIONS if v <= newest))
    linux_connect(s)
    assert s.version == newest
    assert s.ndis_version == ((6, 1) if newest <= nv.NVSP_PROTOCOL_VERSION_4 else (6, 30))


def test_refused_versions_say_why() -> None:
    s = NvspServer(versions=frozenset({nv.NVSP_PROTOCOL_VERSION_4}))
    ev = s.receive(linux_msg(Msg.INIT, "II", 0x60001, 0x60001))
    assert isinstance(ev, nv.Initialized) and status_of(ev.reply) == Status.PROTOCOL_TOO_NEW
    ev = s.receive(linux_msg(Msg.INIT, "II", 2, 2))
    assert isinstance(ev, nv.Initialized) and status_of(ev.reply) == Status.PROTOCOL_TOO_OLD
    assert s.phase is nv.Phase.AWAIT_INIT
    # a range is answered at its newest version we know
    ev = s.receive(linux_msg(Msg.INIT, "II", 2, 0x60001))
    assert isinstance(ev, nv.Initialized) and ev.version == nv.NVSP_PROTOCOL_VERSION_4


def test_rndis_packets_send_buffer_and_gpa_direct() -> None:
    s = ready()
    assert s.send_layout is not None
    # RNDIS control: GPA direct, no section (rndis_filter_send_request)
    ev = s.receive(linux_msg(Msg.SEND_RNDIS_PKT, "III", 1, nv.NO_SECTION, 0))
    assert ev == nv.RndisPacket(nv.CHANNEL_TYPE_CONTROL, None, 0, 0)
    done = s.rndis_complete()
    assert len(done) == 40 and linux_accepts_completion(done) and status_of(done) == 1
    # data copied into section 3 (netvsc_send_pkt)
    ev = s.receive(linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 3, 110))
    assert ev == nv.RndisPacket(0, 3, 3 * nv.SEND_SECTION_SIZE, 110)
    last = s.send_layout.count - 1
    ev = s.receive(linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, last, nv.SEND_SECTION_SIZE))
    assert isinstance(ev, nv.RndisPacket) and ev.offset + ev.length <= s.send_layout.size


def test_subchannels_and_send_table() -> None:
    s = ready(max_subchannels=3)
    ev = s.receive(linux_msg(Msg.SUBCHANNEL, "II", nv.SUBCHANNEL_ALLOCATE, 7))
    assert ev == nv.AllocateSubchannels(7, 3)
    reply = s.subchannels_allocated(3)
    assert linux_accepts_completion(reply) and struct.unpack_from("<3I", reply) == (133, 1, 3)
    table = nv.send_indirection_table(4)
    assert linux_send_table(table, s.version or 0) == [i % 4 for i in range(16)]
    sub = NvspServer.for_subchannel(s)
    ev = sub.receive(linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 5, 60))
    assert isinstance(ev, nv.RndisPacket) and ev.section == 5
    with pytest.raises(NvspError):
        sub.receive(linux_msg(Msg.SUBCHANNEL, "II", 1, 1))


def linux_send_table(msg: bytes, version: int) -> list[int]:
    """netvsc_send_table: count 16, offset forced to 40 for NVSP <= 6, bounded."""
    msglen = (len(msg) + 7) & ~7
    assert msglen >= 4 + 8
    _, count, offset = struct.unpack_from("<3I", msg)
    assert count == 16
    if version <= nv.NVSP_PROTOCOL_VERSION_6 and msglen >= 4 + 36 + count * 4:
        offset = 40
    assert msglen >= count * 4 and offset <= msglen - count * 4
    return list(struct.unpack_from("<16I", msg, offset))


def test_send_table_for_every_version() -> None:
    for ver in nv.SUPPORTED_VERSIONS:
        assert linux_send_table(nv.send_indirection_table(3), ver) == [i % 3 for i in range(16)]


def test_switch_data_path_and_oid_query_ex() -> None:
    s = ready()
    ev = s.receive(linux_msg(Msg.SWITCH_DATA_PATH, "I", nv.DATAPATH_VF))
    assert ev == nv.SwitchDataPath(True, b"")
    ev = s.receive(linux_msg(Msg.OID_QUERY_EX, "II", 0x00040004, 0x00010114))
    assert isinstance(ev, nv.OidQueryEx) and ev.oid == 0x00010114
    assert struct.unpack_from("<II", ev.reply) == (Msg.OID_QUERY_EX_COMP, Status.FAIL)


def test_revoke_then_nothing_flows() -> None:
    s = ready()
    assert s.receive(linux_msg(Msg.REVOKE_RECV_BUF, "H", 0xCAFE)) == nv.RevokeReceiveBuffer(0xCAFE)
    assert s.receive(linux_msg(Msg.REVOKE_SEND_BUF, "H", 0)) == nv.RevokeSendBuffer(0)
    with pytest.raises(NvspError) as exc:
        s.receive(linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, nv.NO_SECTION, 0))
    assert exc.value.reply is not None and status_of(exc.value.reply) == Status.FAIL


def test_guest_completion_of_a_receive() -> None:
    assert nv.parse_rndis_pkt_complete(struct.pack("<II", 108, 1)) == 1  # Linux: 8 bytes
    assert nv.parse_rndis_pkt_complete(linux_msg(108, "I", 2)) == 2  # DPDK: 40
    for bad in (b"", struct.pack("<I", 108), struct.pack("<II", 107, 1)):
        with pytest.raises(NvspError):
            nv.parse_rndis_pkt_complete(bad)


def test_host_messages_are_whole_nvsp_messages() -> None:
    for m in (
        nv.init_complete(1, version=0x60001),
        nv.recv_buf_complete(2),
        nv.send_buf_complete(1, 6144),
        nv.rndis_pkt(0),
        nv.rndis_pkt_complete(1),
        nv.subchannel_complete(1, 2),
        nv.oid_query_ex_complete(2),
    ):
        assert len(m) == nv.NVSP_MESSAGE_SIZE
    assert struct.unpack_from("<4I", nv.rndis_pkt(1)) == (107, 1, 0xFFFFFFFF, 0)


# --- bad input: each gets the failure status (when there is an answer) or a reset ---


def refused(s: NvspServer, msg: bytes, *, reply_type: int | None = None) -> NvspError:
    with pytest.raises(NvspError) as exc:
        s.receive(msg)
    err = exc.value
    assert isinstance(err, GuestError) and err.reason
    if reply_type is None:
        assert err.reply is None
    else:
        assert err.reply is not None and struct.unpack_from("<I", err.reply)[0] == reply_type
        assert status_of(err.reply) != Status.SUCCESS and len(err.reply) == 40
    return err


def test_messages_before_init() -> None:
    s = NvspServer()
    refused(s, linux_msg(Msg.SEND_NDIS_VER, "II", 6, 30))
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 0, 10))
    refused(s, linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))


@pytest.mark.parametrize("size", [0, 1, 3])
def test_messages_shorter_than_a_header(size: int) -> None:
    refused(NvspServer(), bytes(size))


def test_messages_of_the_wrong_size() -> None:
    s = NvspServer()
    refused(s, struct.pack("<II", Msg.INIT, 0x60001), reply_type=Msg.INIT_COMPLETE)
    s.receive(linux_msg(Msg.INIT, "II", 0x60001, 0x60001))
    refused(s, struct.pack("<IIII", Msg.SEND_NDIS_CONFIG, 1514, 0, 0))  # 16 < 20
    s = ready()
    refused(
        s, struct.pack("<III", Msg.SEND_RNDIS_PKT, 0, 0), reply_type=Msg.SEND_RNDIS_PKT_COMPLETE
    )


def test_messages_out_of_order_or_twice() -> None:
    s = NvspServer()
    s.receive(linux_msg(Msg.INIT, "II", 0x60001, 0x60001))
    refused(s, linux_msg(Msg.INIT, "II", 0x60001, 0x60001), reply_type=Msg.INIT_COMPLETE)
    refused(s, linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE), reply_type=102)  # before NDIS_CONFIG
    s.receive(linux_msg(Msg.SEND_NDIS_CONFIG, "IIQ", 1514, 0, 8))
    refused(s, linux_msg(Msg.SEND_NDIS_CONFIG, "IIQ", 1514, 0, 8))
    refused(s, linux_msg(Msg.SEND_SEND_BUF, "IH", 2, 0), reply_type=105)  # before the recv buffer
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, nv.NO_SECTION, 0), reply_type=108)
    s.receive(linux_msg(Msg.SEND_NDIS_VER, "II", 6, 30))
    refused(s, linux_msg(Msg.SEND_NDIS_VER, "II", 6, 30))
    s = ready()
    refused(s, linux_msg(Msg.SEND_RECV_BUF, "IH", 3, 0xCAFE), reply_type=102)
    refused(s, linux_msg(Msg.SEND_SEND_BUF, "IH", 3, 0), reply_type=105)


def test_message_types_beyond_the_version() -> None:
    s = NvspServer(versions=frozenset({nv.NVSP_PROTOCOL_VERSION_2}))
    linux_connect(s)
    refused(s, linux_msg(Msg.SUBCHANNEL, "II", 1, 2))  # a v5 message on v2
    refused(s, linux_msg(Msg.SWITCH_DATA_PATH, "I", 0))  # v4
    s = ready()
    refused(s, linux_msg(Msg.NONE))
    refused(s, linux_msg(200))
    refused(s, linux_msg(Msg.INIT_COMPLETE, "III", 0, 0, 1))  # a host message from the guest


@pytest.mark.parametrize(
    ("size", "why"),
    [
        (nv.MAX_RECV_BUFFER + 4096, "larger than the cap"),
        (RECV_BUF + 100, "not page-aligned"),
        (4096, "fewer sections than the minimum"),
        (0, "empty"),
    ],
)
def test_bad_receive_buffers(size: int, why: str) -> None:
    s = NvspServer()
    linux_negotiate(s)
    s.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))
    with pytest.raises(NvspError) as exc:
        s.receive_buffer_mapped(size)
    assert exc.value.reply is not None and status_of(exc.value.reply) == Status.FAIL, why
    assert s.receive_layout is None


def test_legacy_receive_buffer_cap() -> None:
    s = NvspServer(versions=frozenset({nv.NVSP_PROTOCOL_VERSION_2}))
    linux_negotiate(s)
    s.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))
    with pytest.raises(NvspError):
        s.receive_buffer_mapped(nv.MAX_RECV_BUFFER_LEGACY + 4096)


def test_bad_send_buffers_and_unmappable_gpadls() -> None:
    s = NvspServer()
    linux_negotiate(s)
    s.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))
    err = s.buffer_map_failed("unknown GPADL 1")
    assert err.reply is not None and struct.unpack_from("<II", err.reply) == (102, Status.FAIL)
    s.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))  # the guest may try again
    s.receive_buffer_mapped(RECV_BUF)
    for size in (nv.MAX_SEND_BUFFER + 4096, 4096, 5000):
        s.receive(linux_msg(Msg.SEND_SEND_BUF, "IH", 2, 0))
        with pytest.raises(NvspError) as exc:
            s.send_buffer_mapped(size)  # 4096 holds no 6144-byte section
        assert exc.value.reply is not None and status_of(exc.value.reply) == Status.FAIL
    with pytest.raises(RuntimeError):
        s.send_buffer_mapped(SEND_BUF)  # no mapping pending: a VSP bug, not the guest's


def test_send_sections_out_of_range() -> None:
    s = ready()
    assert s.send_layout is not None
    n = s.send_layout.count
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, n, 10), reply_type=108)
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 0xFFFFFFFE, 10), reply_type=108)
    tail = s.send_layout.size - (n - 1) * s.send_layout.section_size
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, n - 1, tail + 1), reply_type=108)
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 0, 0), reply_type=108)
    refused(s, linux_msg(Msg.SEND_RNDIS_PKT, "III", 2, nv.NO_SECTION, 0), reply_type=108)
    # a section with no send buffer yet
    t = NvspServer()
    linux_negotiate(t)
    t.receive(linux_msg(Msg.SEND_RECV_BUF, "IH", 1, 0xCAFE))
    t.receive_buffer_mapped(RECV_BUF)
    refused(t, linux_msg(Msg.SEND_RNDIS_PKT, "III", 0, 0, 10), reply_type=108)


def test_bad_subchannel_requests_and_switches() -> None:
    s = ready(max_subchannels=2)
    refused(s, linux_msg(Msg.SUBCHANNEL, "II", 2, 1), reply_type=133)
    refused(s, linux_msg(Msg.SUBCHANNEL, "II", 1, 0), reply_type=133)
    refused(s, linux_msg(Msg.SWITCH_DATA_PATH, "I", 2))
    with pytest.raises(ValueError):
        s.subchannels_allocated(3)  # more than the max: a VSP bug


def test_revoke_unknown_ids() -> None:
    s = ready()
    refused(s, linux_msg(Msg.REVOKE_RECV_BUF, "H", 0xCAFF))
    refused(s, linux_msg(Msg.REVOKE_SEND_BUF, "H", 1))


def test_ndis_config_mtu_out_of_bounds_becomes_the_default() -> None:
    for mtu in (0, 81, 9217, 0xFFFFFFFF):
        s = NvspServer()
        s.receive(linux_msg(Msg.INIT, "II", 0x60001, 0x60001))
        ev = s.receive(linux_msg(Msg.SEND_NDIS_CONFIG, "IIQ", mtu, 0, 0))
        assert isinstance(ev, nv.NdisConfig) and ev.mtu == nv.NDIS_MTU_DEFAULT
    s = NvspServer()
    s.receive(linux_msg(Msg.INIT, "II", 0x60001, 0x60001))
    ev = s.receive(linux_msg(Msg.SEND_NDIS_CONFIG, "IIQ", 9014, 0, 0))
    assert isinstance(ev, nv.NdisConfig) and ev.mtu == 9014


# --- property: any bytes either parse or raise the module's error ---


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_nvsp_property(data: bytes) -> None:
    check_one(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=48), max_size=6))
def test_any_message_after_linux_init_parses_or_is_refused(msgs: list[bytes]) -> None:
    s = ready()
    for m in msgs:
        try:
            ev = s.receive(m)
        except NvspError as exc:
            assert exc.reply is None or len(exc.reply) == 40
        else:
            if isinstance(ev, (nv.MapReceiveBuffer, nv.MapSendBuffer)):
                assert s.buffer_map_failed("unmapped").reply is not None
