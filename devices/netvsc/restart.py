"""What the netvsc VSP keeps across a vmbusd restart (docs/attach-protocol.md#restart).

Two parts, each for what it must survive:

- The negotiated state (`save_nic` / `load_nic`), in the saved-state blob: NVSP
  version, NDIS version and config, the receive and send buffers (GPADL handles and
  layout), the sub-channels granted, the RNDIS state (initialised, packet filter,
  multicast list, MAC, offloads, RSS key and table) and the link state. The VSP
  awaits `ctx.save_state()` before it tells the guest of any of it, so a restarted
  vmbusd never knows less than the guest. `load_nic` treats the state as hostile
  (the VMM hands it back): every type and range checked, ValueError naming the
  first problem.

- The receive sections in the guest's hands (`Sections`), in the primary channel's
  in-flight slot: one bit per section, set before a transfer-page packet naming it
  is published and cleared when the guest completes it. The packet's transaction
  id names its sections itself (`section_id`: a byte of the bitmap and a 48-bit
  mask of sections from there), so a resumed vmbusd needs no table to match the
  completions the guest sends later with the old vmbusd's ids, and it never hands
  out a section whose bit is set: a frame the guest already accepted is never
  overwritten. Each channel keeps in its own slot the ids of the group it is
  publishing (`PostRecord`), with the downstream write_index before it: after a
  crash, ids not found in our ring since that mark were never published, and their
  sections are free again.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from devices.netvsc import protocol as nv
from devices.netvsc import rndis as rn
from vmbus.packet import PacketType
from vmbus.ring import DESC_SIZE, OFF_WRITE_INDEX, TRAILER_SIZE

STATE_VERSION = 1

# -- the in-flight slot: [0, 64) rx header (primary), [64, 512) posting record,
# [512, 512 + bitmap) the section bitmap (primary), then the request journal.
RX_MAGIC = 0x5852564E  # "NVRX"
RX_HEADER = struct.Struct("<III")  # magic, receive GPADL handle, sections
OPEN_NONCE_OFF = 12  # u32: which open of the primary channel the slot records
POST_OFF = 64
POST_MAGIC = 0x54534F50  # "POST"
POST_HEADER = struct.Struct("<IIII")  # magic, downstream write_index before, ids, 0
POST_GROUP = 32  # transfer-page packets one publication records
BITMAP_OFF = 512
MASK_BITS = 48
MASK = (1 << MASK_BITS) - 1
_U32 = struct.Struct("<I")
_DESC = struct.Struct("<HHHHQ")


def bitmap_bytes(slot_size: int) -> int:
    """The bitmap's size for a slot: 4 KiB (32768 sections) in a 16 KiB slot, 16 KiB
    (131072, more than a 31 MiB buffer of the smallest sections holds) in a larger one."""
    return 16384 if slot_size >= 64 * 1024 else 4096


def journal_offset(slot_size: int) -> int:
    """Where the request journal starts in a channel's slot."""
    return BITMAP_OFF + bitmap_bytes(slot_size) + 64


def open_nonce(slot: memoryview | bytearray) -> int:
    """The nonce the primary channel's current open wrote (0: none: vmbusd clears
    the slot's first 64 bytes when the guest opens a channel)."""
    return int(_U32.unpack_from(slot, OPEN_NONCE_OFF)[0])


def set_open_nonce(slot: memoryview | bytearray, nonce: int) -> None:
    _U32.pack_into(slot, OPEN_NONCE_OFF, nonce)


def section_id(section: int) -> tuple[int, int]:
    """(bitmap byte, bit) of a section: its id's base and mask bit."""
    return section >> 3, 1 << (section & 7)


def sections_of(trans_id: int) -> list[int]:
    """The sections a transaction id names (no checks)."""
    base, m = trans_id >> MASK_BITS, trans_id & MASK
    out = []
    while m:
        low = m & -m
        out.append(base * 8 + low.bit_length() - 1)
        m ^= low
    return out


class Sections:
    """The bitmap of receive sections in the guest's hands (see the module doc).

    `slot` is the primary channel's in-flight slot (or private memory without
    restart support); only sections below `count` are ever used."""

    def __init__(self, slot: memoryview | bytearray, count: int) -> None:
        self.slot = slot
        self.nbytes = bitmap_bytes(len(slot))
        self.count = min(count, self.nbytes * 8)
        self.bad = 0  # completions that named sections not in the guest's hands

    def reset(self, handle: int) -> None:
        """A fresh receive buffer: nothing in the guest's hands."""
        end = BITMAP_OFF + self.nbytes + 8
        self.slot[BITMAP_OFF:end] = bytes(end - BITMAP_OFF)
        RX_HEADER.pack_into(self.slot, 0, RX_MAGIC, handle, self.count)

    def matches(self, handle: int) -> bool:
        """The slot records this receive buffer (a resumed one)."""
        magic, h, count = RX_HEADER.unpack_from(self.slot, 0)
        return bool(magic == RX_MAGIC and h == handle and count == self.count)

    def busy(self) -> set[int]:
        """The sections whose bit is set (a resumed buffer's: the guest holds them)."""
        raw = int.from_bytes(self.slot[BITMAP_OFF : BITMAP_OFF + self.nbytes], "little")
        out: set[int] = set()
        while raw:
            low = raw & -raw
            s = low.bit_length() - 1
            if s < self.count:
                out.add(s)
            raw ^= low
        return out

    def mark(self, ids: Iterable[int]) -> None:
        """Set the sections of transfer-page packets about to be published."""
        slot = self.slot
        for tid in ids:
            off = BITMAP_OFF + (tid >> MASK_BITS)
            cur = int.from_bytes(slot[off : off + 6], "little")
            slot[off : off + 6] = (cur | (tid & MASK)).to_bytes(6, "little")

    def release(self, trans_id: int) -> list[int] | None:
        """The guest completed `trans_id`: its sections, now free; None when the id
        names a section outside the buffer or one not in the guest's hands (the
        guest's id, so checked; nothing changes)."""
        base, m = trans_id >> MASK_BITS, trans_id & MASK
        if not m or base * 8 + m.bit_length() > self.count:
            self.bad += 1
            return None
        off = BITMAP_OFF + base
        slot = self.slot
        cur = int.from_bytes(slot[off : off + 6], "little")
        if cur & m != m:
            self.bad += 1
            return None
        slot[off : off + 6] = (cur & ~m).to_bytes(6, "little")
        return sections_of(trans_id)


class RingView(Protocol):
    downstream_size: int

    @property
    def downstream_hdr(self) -> memoryview: ...

    @property
    def downstream_data(self) -> memoryview: ...


class PostRecord:
    """One channel's record of the transfer-page packets it is publishing."""

    def __init__(self, slot: memoryview | bytearray, rings: RingView | None) -> None:
        self.area = slot[POST_OFF:BITMAP_OFF]
        self.rings = rings
        self._last: Sequence[int] | None = None  # the group recorded now

    def clear(self) -> None:
        self.area[: POST_HEADER.size] = bytes(POST_HEADER.size)

    def before(self, ids: Sequence[int]) -> None:
        """With the channel's send lock held, right before the group is written."""
        self._last = ids
        if self.rings is None:
            return
        with self.rings.downstream_hdr as hdr:
            w = _U32.unpack_from(hdr, OFF_WRITE_INDEX)[0]
        struct.pack_into(f"<{len(ids)}Q", self.area, POST_HEADER.size, *ids)
        POST_HEADER.pack_into(self.area, 0, POST_MAGIC, w, len(ids), 0)

    def done(self, ids: Sequence[int]) -> None:
        """The group is in the ring (unless another group was recorded since: that
        one is the record now, and its own `done` clears it)."""
        if self._last is ids:
            self._last = None
            _U32.pack_into(self.area, 8, 0)

    def unpublished(self, log: logging.LoggerAdapter[logging.Logger]) -> list[int]:
        """After a crash: the ids of the recorded group that never reached our ring
        (their sections are free). A record that does not fit counts as published:
        its sections stay busy (lost for this buffer, never written while the guest
        may read them)."""
        magic, w0, n, _ = POST_HEADER.unpack_from(self.area, 0)
        if magic != POST_MAGIC or not n or self.rings is None:
            return []
        if n > POST_GROUP:
            log.warning("netvsc: receive posting record of %d packets: ignored", n)
            return []
        ids = list(struct.unpack_from(f"<{n}Q", self.area, POST_HEADER.size))
        seen = published_xfer_ids(self.rings, w0)
        if seen is None:
            log.warning("netvsc: our ring since the receive posting mark does not parse")
            return []
        return [t for t in ids if t not in seen]


def published_xfer_ids(rings: RingView, mark: int) -> set[int] | None:
    """Transaction ids of the transfer-page packets in our ring from `mark` to its
    write_index; None when that span does not parse (memory the guest can write)."""
    size = rings.downstream_size
    with rings.downstream_hdr as hdr:
        w = _U32.unpack_from(hdr, OFF_WRITE_INDEX)[0]
    if w >= size or mark >= size or (w | mark) % 8:
        return None
    ids: set[int] = set()
    with rings.downstream_data as data:
        if data.nbytes < 2 * size:
            return None
        pos, left = mark, (w - mark) % size
        while left:
            if left < DESC_SIZE + TRAILER_SIZE:
                return None
            typ, _off8, len8, _flags, tid = _DESC.unpack_from(data, pos)
            total = len8 * 8 + TRAILER_SIZE
            if len8 * 8 < DESC_SIZE or total > left:
                return None
            if typ == PacketType.XFER_PAGES:
                ids.add(tid)
            pos = (pos + total) % size
            left -= total
    return ids


# -- the negotiated state ---------------------------------------------------------------


def save_nic(
    nvsp: nv.NvspServer,
    rndis: rn.RndisDevice,
    recv_handle: int | None,
    send_handle: int | None,
    nonce: int = 0,
) -> dict[str, Any]:
    """The NIC's negotiated state as msgpack data; `nonce` names the open of the
    primary channel it belongs to (its slot holds the same: `open_nonce`)."""
    rl, sl = nvsp.receive_layout, nvsp.send_layout
    rss = rndis.rss
    return {
        "nonce": nonce,
        "phase": nvsp.phase.value,
        "version": nvsp.version,
        "ndis": list(nvsp.ndis_version) if nvsp.ndis_version is not None else None,
        "mtu": nvsp.mtu,
        "caps": nvsp.capabilities,
        "ndis_config": nvsp.ndis_config_seen,
        "recv": None if rl is None or not recv_handle else [rl.buffer_id, rl.size, recv_handle],
        "send": None if sl is None or not send_handle else [sl.buffer_id, sl.size, send_handle],
        "subchannels": nvsp.subchannels,
        "rndis": {
            "state": rndis.state.value,
            "filter": rndis.packet_filter,
            "multicast": list(rndis.multicast),
            "mac": rndis.current_mac,
            "queues": rndis.queues,
            "rss": None if rss is None else [rss.enabled, rss.hash_info, rss.key, list(rss.table)],
            "offload": None if rndis.offload_params is None else rndis.offload_params.values,
            "nvsp_version": rndis.nvsp_version,
        },
    }


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _uint(d: dict[str, Any], key: str, hi: int, *, none: bool = False) -> Any:
    v = d.get(key)
    if v is None and none:
        return None
    _need(type(v) is int and 0 <= v <= hi, f"{key} must be an int 0..{hi}, not {str(v)[:40]}")
    return v


def load_nic(
    state: object, config: rn.NicConfig
) -> tuple[nv.NvspServer, rn.RndisDevice, int | None, int | None, int]:
    """A saved NIC state back as (nvsp, rndis, receive GPADL, send GPADL, nonce);
    ValueError naming the first thing that is not what `save_nic` writes for this
    config."""
    _need(type(state) is dict, "nic state must be a map")
    assert isinstance(state, dict)
    nonce = _uint(state, "nonce", 0xFFFFFFFF)
    nvsp = nv.NvspServer(max_subchannels=config.max_queues - 1)
    phases = {p.value: p for p in nv.Phase}
    phase = state.get("phase")
    _need(type(phase) is str and phase in phases, f"phase {str(phase)[:20]!r}")
    nvsp.phase = phases[str(phase)]
    version = _uint(state, "version", 0xFFFFFFFF, none=True)
    _need(version is None or version in nvsp.versions, f"NVSP version {version}")
    _need((version is None) == (nvsp.phase is nv.Phase.AWAIT_INIT), "phase and version differ")
    nvsp.version = version
    ndis = state.get("ndis")
    if ndis is not None:
        _need(
            type(ndis) is list
            and len(ndis) == 2
            and ndis[0] in (5, 6)
            and type(ndis[1]) is int
            and 0 <= ndis[1] <= 0xFFFFFFFF,
            f"NDIS version {str(ndis)[:40]}",
        )
        nvsp.ndis_version = (ndis[0], ndis[1])
    mtu = _uint(state, "mtu", nv.NDIS_MTU_MAX)
    _need(mtu >= nv.NDIS_MTU_MIN or mtu == nv.NDIS_MTU_DEFAULT, f"mtu {mtu}")
    nvsp.mtu = mtu
    nvsp.capabilities = _uint(state, "caps", (1 << 64) - 1)
    seen = state.get("ndis_config")
    _need(type(seen) is bool, "ndis_config must be a bool")
    nvsp.ndis_config_seen = bool(seen)
    handles: list[int | None] = []
    for key, cap in (("recv", nv.MAX_RECV_BUFFER), ("send", nv.MAX_SEND_BUFFER)):
        raw = state.get(key)
        if raw is None:
            handles.append(None)
            continue
        _need(
            type(raw) is list and len(raw) == 3 and all(type(x) is int for x in raw),
            f"{key} buffer must be [id, size, handle]",
        )
        buf_id, size, handle = raw
        _need(0 <= buf_id <= 0xFFFF, f"{key} buffer id {buf_id}")
        _need(0 < size <= cap and size % nv.PAGE_SIZE == 0, f"{key} buffer of {size} bytes")
        _need(0 < handle <= 0xFFFFFFFF, f"{key} buffer GPADL handle {handle}")
        _need(version is not None, f"{key} buffer before NVSP INIT")
        if key == "recv":
            section = nv.receive_section_size(mtu)
            count = size // section
            _need(count >= nv.MIN_RECV_SECTIONS, f"receive buffer holds {count} sections")
            nvsp.receive_layout = nv.ReceiveLayout(buf_id, size, section, count)
        else:  # (without a receive buffer: the guest revoked that one first)
            count = size // nv.SEND_SECTION_SIZE
            _need(count >= nv.MIN_SEND_SECTIONS, f"send buffer holds {count} sections")
            nvsp.send_layout = nv.SendLayout(buf_id, size, nv.SEND_SECTION_SIZE, count)
        handles.append(handle)
    _need(
        (nvsp.receive_layout is not None) == (nvsp.phase is nv.Phase.READY)
        or nvsp.phase is nv.Phase.REVOKED,
        "phase and receive buffer differ",
    )
    nvsp.subchannels = _uint(state, "subchannels", config.max_queues - 1)
    r = state.get("rndis")
    _need(type(r) is dict, "rndis must be a map")
    assert isinstance(r, dict)
    rndis = rn.RndisDevice(config)
    states = {s.value: s for s in rn.State}
    st = r.get("state")
    _need(type(st) is str and st in states, f"RNDIS state {str(st)[:20]!r}")
    rndis.state = states[str(st)]
    pf = _uint(r, "filter", 0xFFFFFFFF)
    _need(not pf & ~rn.FILTER_KNOWN, f"packet filter {pf:#x}")
    rndis.packet_filter = pf
    mc = r.get("multicast")
    _need(
        type(mc) is list
        and len(mc) <= rn.MAX_MULTICAST
        and all(type(m) is bytes and len(m) == rn.ETH_ALEN and m[0] & 1 for m in mc),
        "multicast must be a list of multicast MACs",
    )
    rndis.multicast = tuple(mc or ())
    mac = r.get("mac")
    _need(type(mac) is bytes and len(mac) == rn.ETH_ALEN and not mac[0] & 1, "mac")
    assert isinstance(mac, bytes)
    _need(mac == config.mac or config.allow_mac_change, "mac differs from the config's")
    rndis.current_mac = mac
    queues = _uint(r, "queues", config.max_queues)
    _need(queues >= 1, "queues must be at least 1")
    rndis.queues = queues
    rss = r.get("rss")
    if rss is not None:
        _need(type(rss) is list and len(rss) == 4, "rss must be [enabled, hash, key, table]")
        enabled, hash_info, key, table = rss
        _need(type(enabled) is bool, "rss enabled must be a bool")
        _need(type(hash_info) is int and 0 <= hash_info <= 0xFFFFFFFF, "rss hash_info")
        _need(
            type(key) is bytes and len(key) in ((rn.RSS_KEY_SIZE,) if enabled else (0, 40)),
            "rss key",
        )
        _need(
            type(table) is list
            and len(table) <= rn.ITAB_NUM_MAX
            and (bool(table) or not enabled)
            and all(type(q) is int and 0 <= q < config.max_queues for q in table),
            "rss table",
        )
        rndis.rss = rn.RssParams(enabled, hash_info, key, tuple(table))
    off = r.get("offload")
    if off is not None:
        _need(type(off) is bytes and len(off) <= rn.OFFLOAD_PARAMS_MAX_SIZE, "offload")
        assert isinstance(off, bytes)
        rndis.offload_params = rn.OffloadParams(off)
    rndis.nvsp_version = _uint(r, "nvsp_version", 0xFFFFFFFF)
    return nvsp, rndis, handles[0], handles[1], nonce


def check_state(state: object, config: rn.NicConfig) -> tuple[bool, object]:
    """The device-level map: (link up, the NIC's state or None)."""
    _need(type(state) is dict, f"netvsc state must be a map, not {type(state).__name__}")
    assert isinstance(state, dict)
    _need(state.get("v") == STATE_VERSION, f"netvsc state version {str(state.get('v'))[:20]}")
    link = state.get("link")
    _need(type(link) is bool, "link must be a bool")
    _need(set(state) <= {"v", "link", "nic"}, "unknown keys in the netvsc state")
    return bool(link), state.get("nic")
