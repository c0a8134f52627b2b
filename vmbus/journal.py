"""A channel's request journal: requests taken off its ring and not yet completed,
kept in the channel's in-flight slot (memory the VMM holds across a vmbusd crash),
so that a restarted vmbusd completes each of them exactly once.

As vhost-user's inflight fd, but over VMBus rings, where the guest reuses a
transaction id as soon as it sees its completion: a completion sent twice could
complete the guest's *next* request with that id (Linux storvsc and netvsc look
ids up in their requestor table), so "at least once" is not good enough.

Two hazards and how each is closed:
- Taking. A batch is read from the ring without moving the read_index
  (`Channel.receive(consume=False)`), each packet is copied into a free entry
  (STAGED), the header notes the ring positions before and after the batch, then
  the read_index moves and the entries become TAKEN. A crash before the move
  leaves the batch in the ring (the STAGED entries are dropped on resume); after
  it, the read_index equals the noted end and the entries are kept.
- Completing. With the channel's send lock held, the header notes the downstream
  write_index (`w_mark`) and the group's entries become COMPLETING; the
  completions are published (in pieces if the ring is full); then the entries are
  freed. On resume the packets between `w_mark` and the write_index are read back
  from our own ring: a COMPLETING entry whose transaction id is among their
  completions was published; the others were not and are completed now. A group is
  at most half the ring, so the span read back never wraps onto itself.

A request whose answer is known before it is sent (storvsc's handshake replies)
keeps the answer instead of the packet (`record_reply`), so a resumed vmbusd
sends the same answer rather than asking a protocol state that moved on.

Pure bookkeeping on a memoryview plus two thin async helpers around a Channel;
`resume` treats the slot as hostile: a value that does not fit drops that entry
with one log line, never more.
"""

from __future__ import annotations

import array
import functools
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from vmbus import native as _native_sel
from vmbus.channel import Channel, PacketBatch
from vmbus.ring import (
    DESC_SIZE,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    TRAILER_SIZE,
    VM_PKT_COMP,
    Buffer,
    OutPacket,
    SendBatch,
)

log = logging.getLogger(__name__)

MAGIC = 0x4C4E524A  # "JRNL"
VERSION = 1
HEADER = struct.Struct("<IIIIIIIIIIQ")  # magic version entry_size nentries staged
#   r_before r_after completing w_mark pad next_seq
HEADER_SIZE = 64
ENTRY = struct.Struct("<IIQIIQ")  # state length trans_id flags pad seq
ENTRY_HEADER = 32

FREE, STAGED, TAKEN, REPLY, COMPLETING = 0, 1, 2, 3, 4
F_TRUNCATED = 1  # the packet was longer than an entry holds: only its start is kept
F_REPLY_DONE = 2  # COMPLETING an entry that held a reply (resume: the reply again)

_U32 = struct.Struct("<I")
_DESC = struct.Struct("<HHHHQ")


def _check_entries(slot: memoryview, entry_size: int, entries: Sequence[int], what: str) -> None:
    """The caller errors both twins refuse (as entries_ok in native/journal.c)."""
    cap = (slot.nbytes - HEADER_SIZE) // entry_size if entry_size > 0 else 0
    if (
        entry_size % 8
        or entry_size < ENTRY_HEADER + DESC_SIZE
        or any(not 0 <= e < cap for e in entries)
    ):
        raise ValueError(f"journal {what}: bad entry size or entry")


def _py_stage(
    slot: memoryview,
    entry_size: int,
    copy: bool,
    out: Buffer,
    index: Sequence[int],
    n: int,
    entries: Sequence[int],
    seq: int,
) -> None:
    """Twin of vmb_journal_stage (native/journal.h): packet i into entry entries[i]."""
    buf = memoryview(out).cast("B")
    room = entry_size - ENTRY_HEADER
    _check_entries(slot, entry_size, entries[:n], "stage")
    for i in range(n):
        off, ln = index[2 * i], index[2 * i + 1]
        if ln < DESC_SIZE or off + ln > buf.nbytes:
            raise ValueError("journal stage: index entry outside the batch")
    for i in range(n):
        off, ln = index[2 * i], index[2 * i + 1]
        base = HEADER_SIZE + entries[i] * entry_size
        kept, flags = 0, 0
        if copy:
            kept = min(ln, room)
            flags = F_TRUNCATED if kept < ln else 0
            slot[base + ENTRY_HEADER : base + ENTRY_HEADER + kept] = buf[off : off + kept]
        tid = int.from_bytes(buf[off + 8 : off + 16], "little")
        struct.pack_into("<IQIIQ", slot, base + 4, kept, tid, flags, 0, (seq + i) & (2**64 - 1))
        _U32.pack_into(slot, base, STAGED)  # the state last


def _py_set_states(slot: memoryview, entry_size: int, entries: Sequence[int], state: int) -> None:
    """Twin of vmb_journal_set_states."""
    _check_entries(slot, entry_size, entries, "set_states")
    for e in entries:
        base = HEADER_SIZE + e * entry_size
        if state == COMPLETING and _U32.unpack_from(slot, base)[0] == REPLY:
            _U32.pack_into(slot, base + 16, F_REPLY_DONE)
        _U32.pack_into(slot, base, state)


class _NativeJournal:
    """vmb_journal_stage / vmb_journal_set_states (buffers taken per call: the slot's
    mapping must stay closable)."""

    def __init__(self) -> None:
        mod = _native_sel if _native_sel.NATIVE else _native_sel.native_module()
        self.ffi, self.lib = mod.ffi, mod.lib

    def stage(
        self,
        slot: memoryview,
        entry_size: int,
        copy: bool,
        out: Buffer,
        index: Sequence[int],
        n: int,
        entries: Sequence[int],
        seq: int,
    ) -> None:
        ffi = self.ffi
        ents = array.array("I", entries)
        idx = index if isinstance(index, array.array) else array.array("I", index)
        rc = self.lib.vmb_journal_stage(
            ffi.from_buffer("uint8_t[]", slot, require_writable=True),
            slot.nbytes,
            entry_size,
            int(copy),
            ffi.from_buffer("uint8_t[]", out),
            memoryview(out).nbytes,
            ffi.from_buffer("uint32_t[]", idx),
            n,
            ffi.from_buffer("uint32_t[]", ents),
            seq & (2**64 - 1),
        )
        if rc:
            raise ValueError("journal stage: bad entry size, entry or index")

    def set_states(
        self, slot: memoryview, entry_size: int, entries: Sequence[int], state: int
    ) -> None:
        if not entries:
            return
        ents = array.array("I", entries)
        ffi = self.ffi
        rc = self.lib.vmb_journal_set_states(
            ffi.from_buffer("uint8_t[]", slot, require_writable=True),
            slot.nbytes,
            entry_size,
            ffi.from_buffer("uint32_t[]", ents),
            len(ents),
            state,
        )
        if rc:
            raise ValueError("journal set_states: bad entry size or entry")


class JournalError(ValueError):
    """The slot holds no journal of this shape (another entry size, a VMM's bytes)."""


class RingHeaders(Protocol):
    """What the journal reads of a channel's ring pair (vmbus.memory.RingPairMapping)."""

    upstream_size: int
    downstream_size: int

    @property
    def upstream_hdr(self) -> memoryview: ...

    @property
    def downstream_hdr(self) -> memoryview: ...

    @property
    def downstream_data(self) -> memoryview: ...


@dataclass(frozen=True)
class Pending:
    """A request the last vmbusd took and did not complete: run it again (`packet`,
    the ring packet as taken, descriptor included) or send `reply` again."""

    entry: int
    trans_id: int
    seq: int
    packet: bytes | None
    reply: bytes | None
    truncated: bool = False


class RequestJournal:
    """One channel's journal; see the module docstring for the protocol."""

    def __init__(
        self, slot: memoryview, entry_size: int, *, copy: bool = True, native: bool | None = None
    ) -> None:
        if entry_size % 8 or entry_size < ENTRY_HEADER + (DESC_SIZE if copy else 0):
            raise ValueError(f"entry_size {entry_size}: a multiple of 8 of at least 32 + 16")
        self.slot = slot
        self.entry_size = entry_size
        self.copy = copy
        self.capacity = (slot.nbytes - HEADER_SIZE) // entry_size
        if self.capacity < 1:
            raise ValueError("the slot holds no entry of this size")
        self._free: list[int] = []
        self._words = slot[:HEADER_SIZE].cast("I")  # the header's words
        self._seq = 0
        self._native = (
            _NativeJournal() if (_native_sel.NATIVE if native is None else native) else None
        )
        self._lock = trio.Lock()
        self._room = trio.Event()
        self._rings: RingHeaders | None = None

    # -- set-up ------------------------------------------------------------------

    @classmethod
    def attach(
        cls, slot: memoryview, rings: RingHeaders, *, entry_size: int, copy: bool = True
    ) -> RequestJournal:
        """A fresh journal for a channel the guest just opened."""
        j = cls(slot, entry_size, copy=copy)
        j._rings = rings
        j.slot[HEADER_SIZE : HEADER_SIZE + j.capacity * entry_size] = bytes(j.capacity * entry_size)
        j._write_header(staged=0, r_before=0, r_after=0, completing=0, w_mark=0)
        j._free = list(range(j.capacity - 1, -1, -1))
        return j

    @classmethod
    def resume(
        cls,
        slot: memoryview,
        rings: RingHeaders,
        *,
        entry_size: int,
        copy: bool = True,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> tuple[RequestJournal, list[Pending]]:
        """The journal the last vmbusd left, with what it did not complete (in the
        order taken). Rings not opened yet by this vmbusd: their indices are the
        truth. JournalError when the slot holds no journal of this shape (a fresh
        slot, a changed config, a VMM's bytes): the caller starts a fresh one."""
        j = cls(slot, entry_size, copy=copy)
        j._rings = rings
        (magic, version, esize, nent, staged, r_before, r_after, completing, w_mark, _, seq) = (
            HEADER.unpack_from(slot, 0)
        )
        if magic != MAGIC or version != VERSION:
            raise JournalError("no journal in the slot")
        if esize != entry_size or nent != j.capacity:
            raise JournalError(
                f"journal of {nent} x {esize} bytes, expected {j.capacity} x {entry_size}"
            )
        keep_staged = False
        if staged:
            read_index = _U32.unpack_from(rings.upstream_hdr, OFF_READ_INDEX)[0]
            if read_index == r_after and r_after != r_before:
                keep_staged = True  # the batch left the ring: it is ours
            elif read_index != r_before:
                log.warning("journal: staged batch fits neither ring position: dropped")
        published: set[int] | None = None
        if completing:
            published = j._published_since(w_mark, log)
        bad = 0
        pending: list[Pending] = []
        for e in range(j.capacity):
            base = HEADER_SIZE + e * entry_size
            state, length, tid, flags, _, eseq = ENTRY.unpack_from(slot, base)
            if state == FREE:
                continue
            body_ok = length <= entry_size - ENTRY_HEADER and flags & ~3 == 0
            if state == STAGED and not keep_staged:
                j._set_state(e, FREE)
                continue
            if state == COMPLETING and completing and (published is None or tid in published):
                j._set_state(e, FREE)  # published, or the span is unreadable: never twice
                continue
            if state not in (STAGED, TAKEN, REPLY, COMPLETING) or not body_ok:
                bad += 1
                j._set_state(e, FREE)
                continue
            data = bytes(slot[base + ENTRY_HEADER : base + ENTRY_HEADER + length])
            is_reply = state == REPLY or (state == COMPLETING and flags & F_REPLY_DONE)
            if not is_reply and copy and length < DESC_SIZE:
                bad += 1
                j._set_state(e, FREE)
                continue
            j._set_state(e, REPLY if is_reply else TAKEN)
            pending.append(
                Pending(
                    e,
                    tid,
                    eseq,
                    None if is_reply or not copy else data,
                    data if is_reply else None,
                    bool(flags & F_TRUNCATED),
                )
            )
            seq = max(seq, eseq + 1)
        if bad:
            log.warning(
                "journal: %d entr%s made no sense: dropped", bad, "y" if bad == 1 else "ies"
            )
        j._seq = seq & (2**64 - 1)
        j._write_header(staged=0, r_before=0, r_after=0, completing=0, w_mark=0)
        busy = {p.entry for p in pending}
        j._free = [e for e in range(j.capacity - 1, -1, -1) if e not in busy]
        pending.sort(key=lambda p: p.seq)
        return j, pending

    def _published_since(
        self, w_mark: int, log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    ) -> set[int] | None:
        """Transaction ids of the completions in our ring from w_mark to its
        write_index. None when the span cannot be read (then every COMPLETING entry
        counts as published: never twice, at worst a request the guest retries)."""
        rings = self._rings
        assert rings is not None
        size = rings.downstream_size
        w = _U32.unpack_from(rings.downstream_hdr, OFF_WRITE_INDEX)[0]
        if w >= size or w_mark >= size or (w | w_mark) % 8:
            log.warning("journal: ring positions out of range: completions taken as sent")
            return None
        data = rings.downstream_data
        doubled = data.nbytes >= 2 * size
        tids: set[int] = set()
        pos, left = w_mark, (w - w_mark) % size
        while left:
            if left < DESC_SIZE + TRAILER_SIZE:
                return None
            if doubled:
                desc = bytes(data[pos : pos + DESC_SIZE])
            else:
                desc = bytes(data[pos : min(size, pos + DESC_SIZE)])
                desc += bytes(data[: DESC_SIZE - len(desc)])
            typ, _off8, len8, _flags, tid = _DESC.unpack(desc)
            total = len8 * 8 + TRAILER_SIZE
            if len8 * 8 < DESC_SIZE or total > left:
                log.warning(
                    "journal: our ring since the mark does not parse: completions taken as sent"
                )
                return None
            if typ == VM_PKT_COMP:
                tids.add(tid)
            pos = (pos + total) % size
            left -= total
        return tids

    # -- bookkeeping ---------------------------------------------------------------

    def _write_header(
        self, *, staged: int, r_before: int, r_after: int, completing: int, w_mark: int
    ) -> None:
        HEADER.pack_into(
            self.slot,
            0,
            MAGIC,
            VERSION,
            self.entry_size,
            self.capacity,
            staged,
            r_before,
            r_after,
            completing,
            w_mark,
            0,
            self._seq,
        )

    def _set_state(self, e: int, state: int) -> None:
        _U32.pack_into(self.slot, HEADER_SIZE + e * self.entry_size, state)

    @property
    def free(self) -> int:
        """Entries available for requests."""
        return len(self._free)

    def _set_states(self, entries: Sequence[int], state: int) -> None:
        if self._native is not None:
            self._native.set_states(self.slot, self.entry_size, entries, state)
        else:
            _py_set_states(self.slot, self.entry_size, entries, state)

    def _release(self, entries: Sequence[int]) -> None:
        self._set_states(entries, FREE)
        self._free.extend(entries)
        self._room.set()

    def drop(self, entry: int) -> None:
        """Free an entry whose request needs no completion."""
        self._release((entry,))

    def record_reply(self, entry: int, payload: bytes) -> None:
        """Keep the answer, not the request: a resumed vmbusd sends it again."""
        base = HEADER_SIZE + entry * self.entry_size
        n = len(payload)
        if n > self.entry_size - ENTRY_HEADER:
            return  # cannot happen for a handshake reply; the request stays as taken
        self.slot[base + ENTRY_HEADER : base + ENTRY_HEADER + n] = payload
        struct.pack_into("<I", self.slot, base + 4, n)
        self._set_state(entry, REPLY)

    # -- taking ----------------------------------------------------------------------

    async def receive(self, channel: Channel, max_pkts: int) -> tuple[PacketBatch, list[int]]:
        """The next batch (at most max_pkts, at most the free entries), each packet
        recorded before the ring's read_index moves; entries[i] is packet i's."""
        while not self._free:
            self._room = trio.Event()
            await self._room.wait()
        batch = await channel.receive(min(max_pkts, len(self._free)), consume=False)
        return batch, self.stage(batch, channel.read_position, channel.unconsumed, channel)

    def stage(
        self, batch: PacketBatch, r_before: int, nbytes: int, channel: Channel | None
    ) -> list[int]:
        """Record the batch (STAGED), note its ring span, consume it, mark it TAKEN."""
        rings = self._rings
        assert rings is not None
        n = len(batch)
        if n > len(self._free):
            raise ValueError(f"{n} packets, {len(self._free)} free entries")
        entries = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        if self._native is not None:
            self._native.stage(
                self.slot,
                self.entry_size,
                self.copy,
                batch.buffer,
                batch.index,
                n,
                entries,
                self._seq,
            )
        else:
            _py_stage(
                self.slot,
                self.entry_size,
                self.copy,
                batch.buffer,
                batch.index,
                n,
                entries,
                self._seq,
            )
        self._seq = (self._seq + n) & (2**64 - 1)
        r_after = (r_before + nbytes) % rings.upstream_size
        self._write_header(staged=1, r_before=r_before, r_after=r_after, completing=0, w_mark=0)
        if channel is not None:
            channel.consume()
        self._set_states(entries, TAKEN)
        self._words[4] = 0  # staged = 0
        return entries

    # -- completing ------------------------------------------------------------------

    def _mark(self, entries: Sequence[int]) -> None:
        """With the send lock held: note where the group starts, mark it COMPLETING."""
        rings = self._rings
        assert rings is not None
        w = _U32.unpack_from(rings.downstream_hdr, OFF_WRITE_INDEX)[0]
        self._set_states(entries, COMPLETING)
        self._write_header(staged=0, r_before=0, r_after=0, completing=1, w_mark=w)

    def _done(self, entries: Sequence[int]) -> None:
        self._release(entries)
        self._words[7] = 0  # completing = 0

    async def send_completions(
        self, channel: Channel, entries: Sequence[int], packets: Sequence[OutPacket]
    ) -> None:
        """Publish packets[i], the completion of entries[i] (entries may hold -1 for a
        packet that completes nothing of ours), each exactly once across crashes."""
        if not packets:
            return
        batch = SendBatch(list(packets))
        sizes = [batch.packet_ring_bytes(i) for i in range(len(packets))]
        groups = self._groups(sizes)
        for a, b in groups:
            group = [e for e in entries[a:b] if e >= 0]
            part = batch if len(groups) == 1 else SendBatch(list(packets[a:b]))
            async with self._lock:  # one COMPLETING group at a time
                await channel.send_batch(part, before=functools.partial(self._mark, group))
                self._done(group)

    async def send_completions_raw(
        self,
        channel: Channel,
        entries: Sequence[int],
        buf: Buffer,
        index: Buffer,
        n: int,
    ) -> None:
        """send_completions for a batch preformed in C (Channel.send_raw's arguments)."""
        if not n:
            return
        raw = memoryview(index).cast("B")
        idx = raw[: 8 * n].cast("I")
        sizes = [idx[2 * i + 1] + TRAILER_SIZE for i in range(n)]
        for a, b in self._groups(sizes):
            group = [e for e in entries[a:b] if e >= 0]
            async with self._lock:
                await channel.send_raw(
                    buf, raw[8 * a : 8 * b], b - a, before=functools.partial(self._mark, group)
                )
                self._done(group)

    def _groups(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Split a batch so no group is more than half the downstream ring."""
        rings = self._rings
        assert rings is not None
        limit = rings.downstream_size // 2
        out: list[tuple[int, int]] = []
        start, acc = 0, 0
        for i, s in enumerate(sizes):
            if i > start and acc + s > limit:
                out.append((start, i))
                start, acc = i, 0
            acc += s
        out.append((start, len(sizes)))
        return out
