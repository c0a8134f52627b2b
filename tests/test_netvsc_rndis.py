"""The RNDIS core driven as Linux 6.1's rndis_filter_device_add drives it, byte for
byte, with the guest-side checks Linux applies to our answers transcribed
(rndis_filter_query_device, rndis_query_hwcaps, rndis_filter_receive_data,
rndis_get_ppi); the CVE-2021-28476 class of bad lengths, each a test; the
Toeplitz hash against Microsoft's RSS verification vectors."""

from __future__ import annotations

import importlib.util
import ipaddress
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.netvsc import rndis as r
from devices.netvsc.rndis import MsgType, NicConfig, Oid, RndisDevice, RndisError, Status


def _load_fuzz() -> Any:
    path = pathlib.Path(__file__).resolve().parent / "fuzz" / "fuzz_rndis.py"
    spec = importlib.util.spec_from_file_location("fuzz_rndis", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()
MAC = bytes.fromhex("00155d0a0b0c")


# --- what Linux sends ---


class LinuxGuest:
    """rndis_filter.c's request builders: ids from 1, info buffer at offset 20."""

    def __init__(self) -> None:
        self.req_id = 0

    def next_id(self) -> int:
        self.req_id += 1
        return self.req_id

    def initialize(self) -> bytes:
        return struct.pack("<6I", MsgType.INITIALIZE, 24, self.next_id(), 1, 0, 0x4000)

    def request(self, msg_type: int, oid: int, info: bytes = b"") -> bytes:
        return (
            struct.pack("<7I", msg_type, 28 + len(info), self.next_id(), oid, len(info), 20, 0)
            + info
        )

    def query(self, oid: int, info: bytes = b"") -> bytes:
        return self.request(MsgType.QUERY, oid, info)

    def set(self, oid: int, info: bytes) -> bytes:
        return self.request(MsgType.SET, oid, info)

    def halt(self) -> bytes:
        return struct.pack("<3I", MsgType.HALT, 12, self.next_id())


def linux_query_result(reply: bytes, inresult_size: int) -> bytes:
    """rndis_filter_query_device's checks on QUERY_CMPLT; returns the info buffer."""
    msg_type, msg_len, _req, status, buflen, offset = struct.unpack_from("<6I", reply)
    assert msg_type == MsgType.QUERY_CMPLT and msg_len == len(reply)
    assert msg_len - 8 >= 16
    assert status == Status.SUCCESS, hex(status)
    assert buflen <= inresult_size and offset >= 16
    assert msg_len - 8 >= offset and msg_len - 8 - offset >= buflen
    assert msg_len <= r.MAX_RESPONSE_SIZE
    return reply[8 + offset : 8 + offset + buflen]


def set_status(reply: bytes) -> int:
    msg_type, msg_len, _req, status = struct.unpack_from("<4I", reply)
    assert msg_type == MsgType.SET_CMPLT and msg_len == len(reply) == 16
    return int(status)


def answer(dev: RndisDevice, msg: bytes) -> bytes:
    (msg_type, one), *rest = r.split_messages(msg)
    assert not rest and msg_type != MsgType.PACKET
    result = dev.control(one)
    assert result.reply is not None
    return result.reply


def offload_query(nvsp_version: int) -> bytes:
    rev, size = (
        (3, 156) if nvsp_version >= 0x50000 else (2, 144) if nvsp_version >= 0x40000 else (1, 112)
    )
    return struct.pack("<BBH", 0xA7, rev, size).ljust(size, b"\0")


def offload_params(nvsp_version: int) -> bytes:
    """rndis_set_offload_params as netvsc_drv sets it (rev 3; size 22 below NVSP 5)."""
    size = 28 if nvsp_version >= 0x50000 else 22
    fields = [1, 4, 4 if size == 28 else 0, 4, 4 if size == 28 else 0, 0, 0, 2, 2]
    body = struct.pack("<BBH9B", 0x80, 3, size, *fields)
    return body.ljust(size, b"\0")


def rss_params(table: list[int], key: bytes, flags: int) -> bytes:
    """rndis_set_rss_param_msg: 40-byte header, table at 40, key after it."""
    n = len(table)
    hdr = struct.pack(
        "<BBHHHIH2xIH2xIIII", 0x89, 2, 40, flags, 0, 0x1701, 4 * n, 40, 40, 40 + 4 * n, 0, 0, 0
    )
    return hdr + struct.pack(f"<{n}I", *table) + key


def config_mac(mac: bytes) -> bytes:
    """rndis_filter_set_device_mac: NetworkAddress, lowercase hex, UTF-16."""
    name = "NetworkAddress".encode("utf-16-le")
    value = mac.hex().encode("utf-16-le")
    return struct.pack("<5I", 20, len(name), 2, 20 + len(name), len(value)) + name + value


def linux_device_add(dev: RndisDevice, nvsp_version: int = 0x60001, queues: int = 4) -> LinuxGuest:
    """rndis_filter_device_add, then rndis_set_subchannel and rndis_filter_open."""
    g = LinuxGuest()
    init = answer(dev, g.initialize())
    (t, ln, req, status, major, minor, flags, medium, max_pkt, max_xfer, align, _, _) = (
        struct.unpack_from("<13I", init)
    )
    assert (t, ln, req, status) == (MsgType.INITIALIZE_CMPLT, 52, 1, 0)
    assert (major, minor, flags, medium) == (1, 0, 1, 0) and max_pkt >= 1 and align <= 12
    assert max_xfer >= 0x4000  # what Linux asked for
    mtu = linux_query_result(answer(dev, g.query(Oid.GEN_MAXIMUM_FRAME_SIZE)), 4)
    assert struct.unpack("<I", mtu) == (dev.config.mtu,)
    assert (
        linux_query_result(answer(dev, g.query(Oid.E802_3_PERMANENT_ADDRESS)), 6) == dev.config.mac
    )
    name = linux_query_result(answer(dev, g.query(Oid.GEN_FRIENDLY_NAME)), 512)
    assert name.decode("utf-16-le").rstrip("\0") == "Network Adapter"  # Linux ignores it
    caps = linux_query_result(
        answer(dev, g.query(Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, offload_query(nvsp_version))),
        156,
    )
    obj_type, rev, size = struct.unpack_from("<BBH", caps)
    assert obj_type == 0xA7 and rev >= 1 and 112 <= size <= len(caps)
    assert (
        set_status(answer(dev, g.set(Oid.TCP_OFFLOAD_PARAMETERS, offload_params(nvsp_version))))
        == 0
    )
    link = linux_query_result(answer(dev, g.query(Oid.GEN_MEDIA_CONNECT_STATUS)), 4)
    assert struct.unpack("<I", link) == (0 if dev.config.connected else 1,)
    if nvsp_version < 0x50000:
        return g
    speed = linux_query_result(answer(dev, g.query(Oid.GEN_LINK_SPEED)), 4)
    assert struct.unpack("<I", speed) == (dev.config.link_speed,)
    rss = linux_query_result(
        answer(
            dev,
            g.query(
                Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
                struct.pack("<BBH", 0x88, 2, 18).ljust(18, b"\0"),
            ),
        ),
        18,
    )
    _, _, _, _, n_int, n_queues, n_tab = struct.unpack("<BBHIIIH", rss)
    assert n_queues == dev.config.max_queues and 1 <= n_tab <= 256 and n_int >= 1
    dev.queues = queues  # the VSP granted the sub-channels, Linux opened them
    table = [i % queues for i in range(n_tab)]
    assert (
        set_status(
            answer(
                dev,
                g.set(Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, r.DEFAULT_RSS_KEY, 0x10)),
            )
        )
        == 0
    )
    assert (
        set_status(
            answer(
                dev,
                g.set(Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, r.DEFAULT_RSS_KEY, 0)),
            )
        )
        == 0
    )
    assert (
        set_status(answer(dev, g.set(Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0x0D)))) == 0
    )
    return g


def device(**kw: Any) -> RndisDevice:
    return RndisDevice(NicConfig(mac=MAC, max_queues=4, **kw))


def test_linux_device_add_sequence() -> None:
    dev = device()
    g = linux_device_add(dev)
    assert dev.state is r.State.INITIALIZED and dev.packet_filter == 0x0D
    assert dev.rss is not None and dev.rss.enabled and dev.rss.key == r.DEFAULT_RSS_KEY
    assert dev.rss.table == tuple(i % 4 for i in range(128)) and dev.rss.hash_info == 0x1701
    assert dev.offload_params is not None
    result = dev.control(g.halt())
    state: r.State = dev.state
    assert result.reply is None and result.event == r.Halted() and state is r.State.HALTED


@pytest.mark.parametrize("nvsp_version", [0x30002, 0x40000, 0x50000, 0x60000, 0x60001])
def test_linux_device_add_every_version(nvsp_version: int) -> None:
    linux_device_add(device(), nvsp_version)


def test_offload_capabilities_as_linux_reads_them() -> None:
    caps = device().offload_capabilities(3)
    assert len(caps) == 156
    ip4_tx, ip6_tx = struct.unpack_from("<I", caps, 8)[0], struct.unpack_from("<I", caps, 24)[0]
    assert ip4_tx & 0x14 == 0x14 and ip4_tx & 0x40  # TCPv4, UDPv4 tx checksum
    assert ip6_tx & 0x15 == 0x15 and ip6_tx & 0x40  # TCPv6, UDPv6
    lso4_encap, lso4_max, _, lso6_encap, _, _, lso6_opts = struct.unpack_from("<7I", caps, 80)
    assert lso4_encap & 2 and lso6_encap & 2 and lso6_opts & 5 == 5 and lso4_max == r.LSO_MAX_SIZE
    plain = RndisDevice(NicConfig(tx_checksum=False, lso=False)).offload_capabilities(1)
    assert len(plain) == 112 and struct.unpack_from("<I", plain, 8) == (0,)


def test_every_supported_oid_is_answered() -> None:
    dev = device()
    g = LinuxGuest()
    dev.control(g.initialize())
    listed = linux_query_result(answer(dev, g.query(Oid.GEN_SUPPORTED_LIST)), 4096)
    oids = struct.unpack(f"<{len(listed) // 4}I", listed)
    assert Oid.TCP_OFFLOAD_PARAMETERS in oids and Oid.GEN_RNDIS_CONFIG_PARAMETER in oids
    for oid in r._QUERY_OIDS:
        linux_query_result(answer(dev, g.query(oid)), 4096)
    mac = linux_query_result(answer(dev, g.query(Oid.E802_3_CURRENT_ADDRESS)), 6)
    assert mac == MAC
    opts = linux_query_result(answer(dev, g.query(Oid.GEN_MAC_OPTIONS)), 4)
    assert struct.unpack("<I", opts) == (r.MAC_OPTIONS,)
    reply = answer(dev, g.query(0x00010117))  # OID_GEN_SUPPORTED_GUIDS: not ours
    assert struct.unpack_from("<I", reply, 12) == (Status.NOT_SUPPORTED,)
    reply = answer(dev, g.set(0xFD010100, b"\0" * 8))  # a switch-internal OID: never
    assert set_status(reply) == Status.NOT_SUPPORTED


def test_multicast_list_and_keepalive_and_reset() -> None:
    dev = device()
    g = linux_device_add(dev)
    macs = bytes.fromhex("01005e000001") + bytes.fromhex("333300000001")
    result = dev.control(g.set(Oid.E802_3_MULTICAST_LIST, macs))
    assert result.reply is not None and set_status(result.reply) == 0
    assert result.event == r.MulticastListChanged((macs[:6], macs[6:]))
    got = linux_query_result(answer(dev, g.query(Oid.E802_3_MULTICAST_LIST)), 4096)
    assert got == macs
    ka = answer(dev, struct.pack("<3I", MsgType.KEEPALIVE, 12, 77))
    assert struct.unpack("<4I", ka) == (MsgType.KEEPALIVE_CMPLT, 16, 77, 0)
    result = dev.control(struct.pack("<3I", MsgType.RESET, 12, 0))
    assert result.event == r.ResetDone() and result.reply is not None
    assert struct.unpack("<4I", result.reply) == (MsgType.RESET_CMPLT, 16, 0, 0)


def test_mac_change_by_config_parameter() -> None:
    dev = device()
    g = linux_device_add(dev)
    new = bytes.fromhex("00155d112233")
    assert len(config_mac(new)) == 72  # Linux's extlen
    assert (
        set_status(answer(dev, g.set(Oid.GEN_RNDIS_CONFIG_PARAMETER, config_mac(new))))
        == Status.FAILURE
    )
    dev = device(allow_mac_change=True)
    g = linux_device_add(dev)
    result = dev.control(g.set(Oid.GEN_RNDIS_CONFIG_PARAMETER, config_mac(new)))
    assert result.event == r.MacChangeRequested(new) and dev.current_mac == new
    # other keywords (Windows' offload settings) are accepted without effect
    name = "*LsoV2IPv4".encode("utf-16-le")
    other = struct.pack("<5I", 20, len(name), 2, 20 + len(name), 2) + name + "1".encode("utf-16-le")
    assert set_status(answer(dev, g.set(Oid.GEN_RNDIS_CONFIG_PARAMETER, other))) == 0


def test_indicate_status() -> None:
    msg = r.indicate_status(Status.MEDIA_CONNECT)
    assert struct.unpack("<5I", msg) == (MsgType.INDICATE_STATUS, 20, 0x4001000B, 0, 0)
    msg = r.indicate_status(Status.LINK_SPEED_CHANGE, struct.pack("<I", 400_000_000))
    t, ln, status, buflen, offset = struct.unpack_from("<5I", msg)
    assert (t, status) == (MsgType.INDICATE_STATUS, Status.LINK_SPEED_CHANGE)
    assert ln == len(msg) == 24 and buflen == 4 and offset >= 12  # netvsc_linkstatus_callback
    assert struct.unpack_from("<I", msg, 8 + offset) == (400_000_000,)


# --- PACKET ---


def linux_tx_packet(frame: bytes, ppis: list[tuple[int, int]]) -> bytes:
    """netvsc_xmit: PPIs from offset 36 (init_ppi_data), data after them."""
    area = b"".join(struct.pack("<IIII", 16, t, 12, v) for t, v in ppis)
    head = struct.pack(
        "<II9I",
        1,
        44 + len(area) + len(frame),
        36 + len(area),
        len(frame),
        0,
        0,
        0,
        36,
        len(area),
        0,
        0,
    )
    return head + area + frame


def test_linux_tx_packet_with_every_ppi() -> None:
    frame = bytes(range(256)) * 4 + bytes(20)
    lso = (1 << 30) | (34 << 20) | 1448  # LSOv2, IPv4, TCP at 34, MSS 1448
    vlan = 5 | (100 << 4)
    csum = 0
    pkt = linux_tx_packet(frame, [(8, 0xDEADBEEF), (6, vlan), (2, lso)])
    p = r.parse_packet(pkt, max_frame=1514)
    assert pkt[p.data_start : p.data_start + p.data_len] == frame
    assert p.hash_value == 0xDEADBEEF and p.vlan == r.Vlan(100, 5, False)
    assert p.lso == r.Lso(1448, 34, False) and p.checksum is None
    csum = 0x1 | 0x4 | (34 << 16)  # IPv4, TCP at 34
    p = r.parse_packet(linux_tx_packet(frame[:100], [(0, csum)]), max_frame=1514)
    assert p.checksum == r.TxChecksum(True, False, True, False, False, 34)
    p = r.parse_packet(linux_tx_packet(frame[:60], []), max_frame=1514)
    assert p.checksum is None and p.lso is None and p.vlan is None and p.data_len == 60


def test_batched_packets_split_by_msg_len() -> None:
    one = linux_tx_packet(bytes(61), [])
    pad = (-len(one)) % 8
    padded = struct.pack("<II", 1, len(one) + pad) + one[8:] + bytes(pad)
    batch = padded * 3 + bytes(16)  # trailing section padding
    msgs = r.split_messages(batch)
    assert len(msgs) == 3 and all(t == MsgType.PACKET and len(m) == len(padded) for t, m in msgs)
    assert r.parse_packet(msgs[1][1], max_frame=1514).data_len == 61


def linux_rx_check(msg: bytes) -> dict[str, int]:
    """rndis_filter_receive + rndis_filter_receive_data + rndis_get_ppi as the guest
    runs them on one receive section; returns the PPIs it finds."""
    buflen = len(msg)
    msg_type, msg_len = struct.unpack_from("<II", msg)
    assert msg_len >= 8 and buflen >= msg_len and msg_type == 1
    assert buflen >= 8 + 36
    d_off, d_len, *_, p_off, p_len, _vc, _r = struct.unpack_from("<9I", msg, 8)
    assert d_off < buflen - 8 and buflen - 8 - d_off >= d_len
    found: dict[str, int] = {}
    if p_len:
        rpkt_len = buflen - 8
        assert 36 <= p_off <= rpkt_len and 12 <= p_len <= rpkt_len - p_off
        pos, left = 8 + p_off, p_len
        while left > 0:
            size, type_word, ppi_off = struct.unpack_from("<III", msg, pos)
            assert 12 <= size <= left and ppi_off < size and size - ppi_off >= 4
            found[{0: "csum", 6: "vlan", 8: "hash", 9: "hashinfo"}[type_word]] = struct.unpack_from(
                "<I", msg, pos + ppi_off
            )[0]
            left -= size
            pos += size
    return found


def test_rx_packet_header_as_linux_reads_it() -> None:
    frame = bytes(1514)
    rx_csum = r.RXCSUM_TCP_SUCCEEDED | r.RXCSUM_IP_SUCCEEDED
    head = r.packet_header(
        len(frame),
        rx_checksum=rx_csum,
        vlan=r.Vlan(7, 3, False),
        hash_value=0x12345678,
        hash_info=r.HASH_FUNC_TOEPLITZ | r.HASH_TCP_IPV4,
    )
    msg = head + frame
    assert struct.unpack_from("<I", msg, 4)[0] == len(msg)
    assert len(head) <= r.RX_HEADER_ROOM if hasattr(r, "RX_HEADER_ROOM") else len(head) <= 256
    assert linux_rx_check(msg) == {
        "csum": rx_csum,
        "vlan": 3 | (7 << 4),
        "hash": 0x12345678,
        "hashinfo": 0x201,
    }
    assert linux_rx_check(r.packet_header(60) + bytes(60)) == {}


# --- bad input (CVE-2021-28476 class): each a test ---


def refuses(fn: Any, *args: Any, **kw: Any) -> RndisError:
    with pytest.raises(RndisError) as exc:
        fn(*args, **kw)
    assert exc.value.reason
    return exc.value


def test_msg_len_larger_than_the_packet_or_smaller_than_a_header() -> None:
    pkt = linux_tx_packet(bytes(60), [])
    refuses(r.split_messages, struct.pack("<II", 1, len(pkt) + 1) + pkt[8:])
    for bad_len in (0, 4, 7):
        refuses(r.split_messages, struct.pack("<II", 1, bad_len) + pkt[8:])
    refuses(r.split_messages, b"")
    refuses(r.split_messages, pkt[:5])
    refuses(r.parse_packet, pkt[:43], max_frame=1514)  # shorter than a PACKET header
    short = struct.pack("<II", 1, 40) + pkt[8:40]
    refuses(r.parse_packet, short, max_frame=1514)


def _packet(d_off: int, d_len: int, p_off: int = 0, p_len: int = 0, total: int = 200) -> bytes:
    head = struct.pack("<II9I", 1, total, d_off, d_len, 0, 0, 0, p_off, p_len, 0, 0)
    return head + bytes(total - len(head))


@pytest.mark.parametrize(
    ("d_off", "d_len"),
    [(36, 0), (35, 10), (36, 157), (192, 1), (0xFFFFFFF0, 0x20), (36, 0xFFFFFFFF), (1000, 10)],
)
def test_data_outside_the_message(d_off: int, d_len: int) -> None:
    refuses(r.parse_packet, _packet(d_off, d_len), max_frame=1514)


@pytest.mark.parametrize(
    ("p_off", "p_len"),
    [(36, 200), (38, 16), (20, 16), (0xFFFFFFFC, 8), (36, 0xFFFFFFFF), (192, 16)],
)
def test_ppi_area_outside_the_message(p_off: int, p_len: int) -> None:
    refuses(r.parse_packet, _packet(100, 50, p_off, p_len), max_frame=1514)


def _with_ppis(area: bytes) -> bytes:
    frame = bytes(60)
    head = struct.pack(
        "<II9I", 1, 44 + len(area) + 60, 36 + len(area), 60, 0, 0, 0, 36, len(area), 0, 0
    )
    return head + area + frame


@pytest.mark.parametrize(
    "area",
    [
        struct.pack("<III", 0, 0, 12) + bytes(4),  # size 0: would loop forever
        struct.pack("<III", 8, 0, 12) + bytes(8),  # size below a header
        struct.pack("<III", 18, 0, 12) + bytes(8),  # not a multiple of 4... and past the area
        struct.pack("<III", 32, 0, 12) + bytes(4),  # past the area
        struct.pack("<III", 16, 0, 20) + bytes(4),  # data offset past the element
        struct.pack("<III", 16, 0, 4) + bytes(4),  # data offset inside the header
        struct.pack("<III", 12, 0, 12),  # checksum PPI with no payload
        struct.pack("<IIII", 16, 0, 12, 0x15) * 2,  # the same PPI twice
        struct.pack("<IIII", 16, 6, 12, 4095 << 4),  # VLAN id 4095
        struct.pack("<IIII", 16, 6, 12, 1 << 20),  # VLAN reserved bits
        struct.pack("<IIII", 16, 2, 12, (34 << 20) | 1448),  # LSO v1
        struct.pack("<IIII", 16, 2, 12, (1 << 30) | (34 << 20)),  # LSO MSS 0
        struct.pack("<IIII", 16, 2, 12, (1 << 30) | (200 << 20) | 1448),  # TCP past the frame
        struct.pack("<IIII", 16, 0, 12, 0x3 | 0x4 | (34 << 16)),  # IPv4 and IPv6
        struct.pack("<IIII", 16, 0, 12, 0x1 | 0xC | (34 << 16)),  # TCP and UDP
        struct.pack("<IIII", 16, 0, 12, 0x1 | 0x4 | (2 << 16)),  # L4 inside the MAC header
        b"".join(struct.pack("<IIII", 16, 20 + i, 12, 0) for i in range(17)),  # too many
    ],
)
def test_bad_ppis(area: bytes) -> None:
    refuses(r.parse_packet, _with_ppis(area), max_frame=1514)


def test_ppi_area_overlapping_the_frame() -> None:
    area = struct.pack("<IIII", 16, 8, 12, 1)
    head = struct.pack("<II9I", 1, 44 + 16 + 60, 36, 76, 0, 0, 0, 36, 16, 0, 0)
    refuses(r.parse_packet, head + area + bytes(60), max_frame=1514)


def test_unknown_ppis_are_skipped() -> None:
    area = struct.pack("<IIII", 16, 0x80000001, 12, 7) + struct.pack("<IIIII", 20, 11, 12, 0, 0)
    assert r.parse_packet(_with_ppis(area), max_frame=1514).data_len == 60


def test_oob_and_vc_handle_must_be_zero() -> None:
    pkt = bytearray(linux_tx_packet(bytes(60), []))
    for field_off in (16, 20, 24, 36):
        bad = bytearray(pkt)
        struct.pack_into("<I", bad, field_off, 4)
        refuses(r.parse_packet, bytes(bad), max_frame=1514)


def test_frame_above_the_mtu_without_lso() -> None:
    refuses(r.parse_packet, linux_tx_packet(bytes(1515), []), max_frame=1514)
    big = linux_tx_packet(bytes(9000), [(2, (1 << 30) | (34 << 20) | 1448)])
    assert r.parse_packet(big, max_frame=1514).lso is not None
    refuses(
        r.parse_packet,
        linux_tx_packet(bytes(r.MAX_FRAME_LSO + 1), [(2, (1 << 30) | (34 << 20) | 1448)]),
        max_frame=1514,
    )


def _query_with(oid: int, buflen: int, offset: int, extra: bytes = b"") -> bytes:
    return struct.pack("<7I", MsgType.QUERY, 28 + len(extra), 9, oid, buflen, offset, 0) + extra


@pytest.mark.parametrize(
    ("buflen", "offset", "extra"),
    [
        (4, 20, b""),  # info buffer past the message
        (100, 20, bytes(4)),
        (4, 0, bytes(4)),  # offset inside the request header
        (4, 19, bytes(4)),
        (4, 0xFFFFFFFF, bytes(4)),
        (0xFFFFFFFF, 20, bytes(4)),
        (8, 0xFFFFFFFC, bytes(8)),  # offset + length wraps in 32 bits
    ],
)
def test_oid_information_buffer_out_of_range(buflen: int, offset: int, extra: bytes) -> None:
    for msg_type, cmplt in ((MsgType.QUERY, MsgType.QUERY_CMPLT), (MsgType.SET, MsgType.SET_CMPLT)):
        dev = device()
        dev.control(LinuxGuest().initialize())
        msg = bytearray(_query_with(Oid.GEN_CURRENT_PACKET_FILTER, buflen, offset, extra))
        struct.pack_into("<I", msg, 0, msg_type)
        err = refuses(dev.control, bytes(msg))
        assert err.reply is not None
        t, _ln, req, status = struct.unpack_from("<4I", err.reply)
        assert (t, req, status) == (cmplt, 9, Status.INVALID_LENGTH)


def test_bad_oid_payloads_get_a_failure_status() -> None:
    dev = device()
    g = linux_device_add(dev)
    table = [i % 4 for i in range(128)]
    key = r.DEFAULT_RSS_KEY
    cases = [
        (Oid.GEN_CURRENT_PACKET_FILTER, b"\x0d\x00"),  # wrong size
        (Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0x10000)),  # unknown bits
        (Oid.E802_3_MULTICAST_LIST, bytes(7)),
        (Oid.E802_3_MULTICAST_LIST, bytes.fromhex("01005e000001") * 33),
        (Oid.E802_3_MULTICAST_LIST, MAC),  # unicast
        (Oid.TCP_OFFLOAD_PARAMETERS, bytes(12)),
        (Oid.TCP_OFFLOAD_PARAMETERS, struct.pack("<BBH", 0x80, 3, 200).ljust(28, b"\0")),
        (Oid.TCP_OFFLOAD_PARAMETERS, struct.pack("<BBH", 0x81, 3, 28).ljust(28, b"\0")),
        (
            Oid.TCP_OFFLOAD_PARAMETERS,
            struct.pack("<BBH5B", 0x80, 3, 28, 9, 0, 0, 0, 0).ljust(28, b"\0"),
        ),
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, key, 0)[:39]),
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, key[:39], 0)),  # key past the buffer
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params([0] * 257, key, 0)),  # table too large
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params([0, 1, 2, 4] * 32, key, 0)),  # queue 4 of 4
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, key, 0)[:-41]),  # table cut short
        (Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params([], key, 0)),
        (Oid.GEN_RNDIS_CONFIG_PARAMETER, config_mac(MAC)[:19]),
        (Oid.GEN_RNDIS_CONFIG_PARAMETER, struct.pack("<5I", 20, 0xFFFFFFF0, 2, 20, 0)),
        (Oid.GEN_RNDIS_CONFIG_PARAMETER, struct.pack("<5I", 0xFFFFFFFE, 4, 2, 20, 0) + bytes(4)),
        (Oid.GEN_RNDIS_CONFIG_PARAMETER, struct.pack("<5I", 20, 3, 2, 20, 0) + bytes(4)),  # odd
        (Oid.GEN_RNDIS_CONFIG_PARAMETER, config_mac(bytes.fromhex("01005e000001"))),  # multicast
    ]
    for oid, info in cases:
        err = refuses(dev.control, g.set(oid, info))
        assert err.reply is not None, (oid, info)
        assert set_status(err.reply) != Status.SUCCESS
    # a bad key size in an otherwise well-placed object
    bad = bytearray(rss_params(table, key, 0))
    struct.pack_into("<H", bad, 20, 16)
    refuses(dev.control, g.set(Oid.GEN_RECEIVE_SCALE_PARAMETERS, bytes(bad)))


def test_control_state_machine() -> None:
    dev = device()
    g = LinuxGuest()
    refuses(dev.control, g.query(Oid.GEN_LINK_SPEED))  # before INITIALIZE
    dev.control(g.initialize())
    err = refuses(dev.control, g.initialize())
    assert err.reply is not None and struct.unpack_from("<I", err.reply, 12) == (Status.FAILURE,)
    refuses(dev.control, struct.pack("<5I", MsgType.INDICATE_STATUS, 20, 0, 0, 0))  # host's only
    refuses(dev.control, struct.pack("<3I", 0x80000004, 12, 1))  # a completion from the guest
    refuses(dev.control, struct.pack("<2I", MsgType.KEEPALIVE, 8))  # too short
    bad = struct.pack("<6I", MsgType.INITIALIZE, 24, 1, 2, 0, 0x4000)
    err = refuses(RndisDevice(NicConfig()).control, bad)  # RNDIS 2.0
    assert err.reply is not None and struct.unpack_from("<I", err.reply, 12) == (
        Status.BAD_VERSION,
    )
    pkt = linux_tx_packet(bytes(60), [])
    refuses(r.split_messages, g.query(Oid.GEN_LINK_SPEED) + pkt)  # control batched with data
    refuses(r.split_messages, pkt * (r.MAX_PKT_PER_MSG + 1))


# --- RSS ---

# Microsoft's RSS verification suite ("Verifying the RSS Hash Calculation"):
# (source, source port, destination, destination port, hash without ports, with).
MS_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    (
        "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
        44251,
        "fe80::200:f8ff:fe21:67cf",
        38024,
        0x4B61E985,
        0x02D1FEEF,
    ),
]


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "h2", "h4"), MS_VECTORS)
def test_toeplitz_microsoft_vectors(
    src: str, sport: int, dst: str, dport: int, h2: int, h4: int
) -> None:
    addrs = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    assert r.toeplitz_hash(r.DEFAULT_RSS_KEY, addrs) == h2
    assert r.toeplitz_hash(r.DEFAULT_RSS_KEY, addrs + struct.pack(">HH", sport, dport)) == h4


def test_indirection_table_to_queue() -> None:
    table = tuple(i % 3 for i in range(128))
    assert [r.rss_queue(h, table) for h in (0, 1, 2, 3, 127, 128, 0x51CCC178)] == [
        0,
        1,
        2,
        0,
        127 % 3,
        0,
        table[0x51CCC178 % 128],
    ]
    assert r.rss_queue(12345, ()) == 0
    with pytest.raises(ValueError):
        r.toeplitz_hash(bytes(8), bytes(8))


# --- property: any bytes parse or raise RndisError ---


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=700))
def test_fuzz_rndis_property(data: bytes) -> None:
    fuzz.check_one(data)
