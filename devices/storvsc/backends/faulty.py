"""The `faulty` disk backend: any other disk backend with faults injected, for the
people who test guest storage drivers (how does the guest's SCSI layer take a
MEDIUM ERROR, a stalled disk, a power cut in the middle of a write?).

It wraps an inner backend built from its own table (`inner = { backend = "memory",
size = "64M" }`) and, per operation (read, write, flush), can

- fail at a rate (`read_error_rate = 0.01`), or fail the next N (`read_fail_next = 3`),
  optionally only for I/O touching `lba_range = [first, end]`, with a chosen sense
  (`read_sense = "medium" | "not_ready" | "hardware" | "aborted"`);
- fail every write after the first N (`fail_after_writes = N`: a worn-out disk);
- take time: `read_latency = { dist = "fixed" | "uniform" | "exponential" | "normal",
  ... }` (ms; exponential and normal capped by `cap_ms`);
- stall: every I/O hangs until the stall ends (`stall = 5.0` seconds from the first
  I/O, or "forever" until cleared at runtime);
- lose power: at `power_cut()` (or `power = "cut"` through `vmbusd ctl`) each write
  still in flight here (waiting out its latency or a stall) reaches the inner backend
  only as a prefix of its sectors (0..all of them, drawn from the seed, the cut's
  number and the write's offset) and fails;
  every I/O after it fails (`power_off_sense`, NOT READY by default) until
  `power_restore()`. A write the guest was told completed is never touched...
- ...unless the disk has a volatile cache (`volatile_cache = true`: WCE=1, so the
  guest must flush): then a power cut also loses every write not yet made durable,
  and after it the disk holds exactly the data of its last completed flush plus the
  FUA writes (and unmaps, write-zeroes) since. The sectors' durable contents are
  kept beside the inner disk until a flush (memory: up to the bytes written).

Everything random comes from `seed`, one stream per purpose, so a run with the same
seed and the same I/O order injects the same faults. Every injected fault is counted
(`counters`, exported as `vmbusd_disk_faults_total`). Settings change at runtime
through `configure(**keys)` (what `vmbusd ctl SOCK disk fault` calls), checked as the
config's are: a bad key is one line naming it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from devices.storvsc.backends.base import (
    BackendConfigError,
    BackendIOError,
    DiskBackend,
    load_backend,
    open_backend,
)
from devices.storvsc.scsi.constants import SenseKey

OPS = ("read", "write", "flush")
# name -> (sense key, ASC/ASCQ); None keeps MEDIUM ERROR with the operation's own
# ASC (11/00 UNRECOVERED READ ERROR for a read, 0C/00 WRITE ERROR for a write/flush).
SENSES: dict[str, tuple[int, tuple[int, int]] | None] = {
    "medium": None,
    "not_ready": (SenseKey.NOT_READY, (0x04, 0x00)),  # LOGICAL UNIT NOT READY
    "hardware": (SenseKey.HARDWARE_ERROR, (0x44, 0x00)),  # INTERNAL TARGET FAILURE
    "aborted": (SenseKey.ABORTED_COMMAND, (0x00, 0x00)),  # Linux retries these
}
DISTS = {
    "fixed": ("ms",),
    "uniform": ("min_ms", "max_ms"),
    "exponential": ("mean_ms", "cap_ms"),
    "normal": ("mean_ms", "stddev_ms", "cap_ms"),
}
COUNTERS = (
    "read_error",  # reads failed by rate or read_fail_next
    "write_error",
    "flush_error",
    "write_limit",  # writes failed because fail_after_writes was reached
    "power_off",  # I/Os failed while the power was off (torn writes not included)
    "torn_write",  # writes in flight at a power cut (a prefix reached the inner disk)
    "power_cut",  # power cuts
    "delayed",  # I/Os given a latency > 0
    "stalled",  # I/Os that waited for a stall to end
    "cache_lost",  # sectors a power cut reverted (volatile_cache: written, not flushed)
)
_INNER_RENAMED = {"readonly": "read_only", "uri": "address"}  # as [[device.lun]] says them


class FaultConfigError(BackendConfigError):
    """A fault setting is wrong; the message names the key."""


@dataclass(frozen=True)
class Latency:
    """A latency distribution in milliseconds."""

    dist: str = "fixed"
    ms: float = 0.0
    min_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    stddev_ms: float = 0.0
    cap_ms: float = math.inf

    @classmethod
    def parse(cls, key: str, value: object) -> Latency:
        """A number is a fixed latency; a table names `dist` and its parameters."""
        if _is_number(value):
            return cls.parse(key, {"dist": "fixed", "ms": value})
        if not isinstance(value, dict):
            raise FaultConfigError(f"{key} must be a number of ms or a table with dist = ...")
        dist = value.get("dist", "fixed")
        if dist not in DISTS:
            raise FaultConfigError(f"{key}.dist must be one of {', '.join(DISTS)}, not {dist!r}")
        args: dict[str, float] = {}
        for k, v in value.items():
            if k == "dist":
                continue
            if k not in DISTS[dist]:
                raise FaultConfigError(
                    f"{key}.{k}: not a parameter of {dist} (it takes {', '.join(DISTS[dist])})"
                )
            if not _is_number(v) or not 0 <= float(v) < math.inf:
                raise FaultConfigError(f"{key}.{k} must be a number >= 0, not {v!r}")
            args[k] = float(v)
        lat = cls(dist=dist, **args)
        if dist == "uniform" and lat.max_ms < lat.min_ms:
            raise FaultConfigError(f"{key}: max_ms {lat.max_ms} < min_ms {lat.min_ms}")
        return lat

    def sample(self, rng: random.Random) -> float:
        """One latency in seconds."""
        if self.dist == "fixed":
            ms = self.ms
        elif self.dist == "uniform":
            ms = rng.uniform(self.min_ms, self.max_ms)
        elif self.dist == "exponential":
            ms = rng.expovariate(1.0 / self.mean_ms) if self.mean_ms > 0 else 0.0
        else:
            ms = rng.gauss(self.mean_ms, self.stddev_ms)
        return max(0.0, min(ms, self.cap_ms)) / 1000.0


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class _OpFaults:
    error_rate: float = 0.0
    fail_next: int = 0
    sense: str = "medium"
    latency: Latency = Latency()


class FaultyBackend:
    """Another disk backend, with faults. See the module docstring for the keys."""

    def __init__(
        self,
        inner: dict[str, Any] | DiskBackend | None = None,
        seed: int = 0,
        read_error_rate: float = 0.0,
        write_error_rate: float = 0.0,
        flush_error_rate: float = 0.0,
        read_fail_next: int = 0,
        write_fail_next: int = 0,
        flush_fail_next: int = 0,
        read_sense: str = "medium",
        write_sense: str = "medium",
        flush_sense: str = "medium",
        read_latency: object = 0,
        write_latency: object = 0,
        flush_latency: object = 0,
        lba_range: Sequence[int] | None = None,
        fail_after_writes: int = -1,
        stall: float | str = 0,
        power_off_sense: str = "not_ready",
        volatile_cache: bool = False,
    ) -> None:
        self.inner = _build_inner(inner)
        # Faults are per run; the data is the inner disk's.
        self.survives_restart = bool(getattr(self.inner, "survives_restart", False))
        self.block_size = self.inner.block_size
        self.physical_block_exponent = self.inner.physical_block_exponent
        self.max_transfer = self.inner.max_transfer
        self.read_only = self.inner.read_only
        if not isinstance(volatile_cache, bool):
            raise FaultConfigError(f"volatile_cache must be true or false, not {volatile_cache!r}")
        self.volatile_cache = volatile_cache
        self.write_back = self.inner.write_back or volatile_cache
        self._durable: dict[int, bytes] = {}  # LBA -> its durable bytes (volatile_cache)
        self._revert_pending = False
        self._revert_lock = trio.Lock()
        self.can_unmap = self.inner.can_unmap
        self.can_write_zeroes = self.inner.can_write_zeroes
        self.unmap_zeroes = bool(getattr(self.inner, "unmap_zeroes", False))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.writes_done = 0  # writes the inner disk completed (for fail_after_writes)
        self.ops = {op: _OpFaults() for op in OPS}
        self.seed = 0
        self._rng: dict[str, random.Random] = {}
        self.lba_range: tuple[int, int] | None = None
        self.fail_after_writes = -1
        self.power_off_sense = "not_ready"
        self.powered = True
        self._stall_pending: float | None = None  # seconds, started at the next I/O
        self._stall_until: float | None = None  # trio time; inf = until cleared
        self._changed = trio.Event()  # set (and replaced) on a power cut or stall change
        self.configure(
            seed=seed,
            read_error_rate=read_error_rate,
            write_error_rate=write_error_rate,
            flush_error_rate=flush_error_rate,
            read_fail_next=read_fail_next,
            write_fail_next=write_fail_next,
            flush_fail_next=flush_fail_next,
            read_sense=read_sense,
            write_sense=write_sense,
            flush_sense=flush_sense,
            read_latency=read_latency,
            write_latency=write_latency,
            flush_latency=flush_latency,
            lba_range=lba_range,
            fail_after_writes=fail_after_writes,
            power_off_sense=power_off_sense,
        )
        if stall:
            self.configure(stall=stall)

    # ---- settings ----

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def configure(self, **keys: Any) -> list[str]:
        """Change settings (the constructor's keys, plus `power = "cut" | "restore"`
        and `stall = seconds | "forever" | "off"`); all are checked before any is
        applied. Returns what changed, for the one-line answer."""
        staged: list[tuple[str, Any]] = []
        for key, value in keys.items():
            staged.append((key, self._check(key, value)))
        done = []
        for key, value in staged:
            self._apply(key, value)
            done.append(f"{key}={value}" if not isinstance(value, Latency) else key)
        return done

    def _check(self, key: str, value: Any) -> Any:
        op, _, what = key.partition("_")
        if op in OPS and what in ("error_rate", "fail_next", "sense", "latency"):
            if what == "error_rate":
                if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
                    raise FaultConfigError(f"{key} must be a number 0..1, not {value!r}")
                return float(value)
            if what == "fail_next":
                return _count(key, value)
            if what == "sense":
                return _sense(key, value)
            return Latency.parse(key, value)
        if key == "seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise FaultConfigError(f"seed must be an integer, not {value!r}")
            return value
        if key == "lba_range":
            if value is None:
                return None
            ok = isinstance(value, (list, tuple)) and len(value) == 2
            if not ok or not all(isinstance(v, int) and v >= 0 for v in value):
                raise FaultConfigError(f"lba_range must be [first, end] LBAs, not {value!r}")
            if value[1] <= value[0]:
                raise FaultConfigError(f"lba_range end {value[1]} must be above {value[0]}")
            return (value[0], value[1])
        if key == "fail_after_writes":
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise FaultConfigError(f"fail_after_writes must be -1 (never) or N >= 0: {value!r}")
            return value
        if key == "power_off_sense":
            return _sense(key, value)
        if key == "power":
            if value not in ("cut", "restore"):
                raise FaultConfigError(f'power must be "cut" or "restore", not {value!r}')
            return value
        if key == "stall":
            if value in ("off", 0, False):
                return 0.0
            if value == "forever":
                return math.inf
            if not _is_number(value) or not 0 < float(value) < math.inf:
                raise FaultConfigError(f'stall must be seconds > 0, "forever" or "off": {value!r}')
            return float(value)
        known = [f"{o}_{w}" for o in OPS for w in ("error_rate", "fail_next", "sense", "latency")]
        known += ["seed", "lba_range", "fail_after_writes", "power_off_sense", "power", "stall"]
        raise FaultConfigError(f"unknown fault setting {key!r}; known: {', '.join(known)}")

    def _apply(self, key: str, value: Any) -> None:
        op, _, what = key.partition("_")
        if op in OPS and what in ("error_rate", "fail_next", "sense", "latency"):
            setattr(self.ops[op], what, value)
        elif key == "seed":
            self.seed = value
            self._rng = {
                p: random.Random(f"{value}/{p}") for p in (*OPS, *(f"{o}_latency" for o in OPS))
            }
        elif key == "power" and value == "cut":
            self.power_cut()
        elif key == "power":
            self.power_restore()
        elif key == "stall":
            self.set_stall(value)
        else:
            setattr(self, key, value)

    def fault_counters(self) -> dict[str, int]:
        """Injected faults by kind (what `vmbusd_disk_faults_total` exports)."""
        return dict(self.counters)

    def power_cut(self) -> None:
        """The power goes: in-flight writes tear, everything after fails."""
        if self.powered:
            self.powered = False
            self.counters["power_cut"] += 1
            self._revert_pending = self.volatile_cache
            self._poke()

    def power_restore(self) -> None:
        self.powered = True

    def set_stall(self, seconds: float) -> None:
        """Stall every I/O for `seconds` from the next one (inf: until cleared; 0: clear)."""
        self._stall_until = None
        self._stall_pending = seconds if seconds > 0 else None
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- the I/O path ----

    def _power_error(self) -> BackendIOError:
        self.counters["power_off"] += 1
        return _error("power is off (injected)", self.power_off_sense, None)

    def _stalled(self) -> bool:
        if self._stall_pending is not None:
            self._stall_until = trio.current_time() + self._stall_pending
            self._stall_pending = None
        return self._stall_until is not None and trio.current_time() < self._stall_until

    async def _wait(self, op: str) -> bool:
        """Stall and latency; False when the power was cut meanwhile."""
        changed = self._changed
        if self._stalled():
            self.counters["stalled"] += 1
            while self.powered and self._stalled():
                assert self._stall_until is not None
                with trio.move_on_at(self._stall_until):
                    await changed.wait()
                changed = self._changed
            if not self.powered:
                return False
        delay = self.ops[op].latency.sample(self._rng[f"{op}_latency"])
        if delay > 0:
            self.counters["delayed"] += 1
            with trio.move_on_after(delay):
                while self.powered:
                    await changed.wait()
                    changed = self._changed
            if not self.powered:
                return False
        return True

    def _hits(self, offset: int, length: int) -> bool:
        if self.lba_range is None:
            return True
        first, last = offset // self.block_size, (offset + max(length, 1) - 1) // self.block_size
        return first < self.lba_range[1] and last >= self.lba_range[0]

    def _inject(self, op: str, offset: int, length: int) -> None:
        """Raise the op's injected error, if this I/O gets one."""
        f = self.ops[op]
        if not self._hits(offset, length):
            return
        fail = False
        if f.fail_next > 0:
            f.fail_next -= 1
            fail = True
        elif f.error_rate > 0 and self._rng[op].random() < f.error_rate:
            fail = True
        if fail:
            self.counters[f"{op}_error"] += 1
            where = offset if op != "flush" else None
            raise _error(f"injected {op} error ({f.sense})", f.sense, where)

    async def _revert(self) -> None:
        """After a power cut, the volatile cache's unflushed sectors go back to their
        durable bytes (before any I/O sees the disk again)."""
        if not self._revert_pending:
            return
        async with self._revert_lock:
            if not self._revert_pending:
                return
            for lba, data in sorted(self._durable.items()):
                await self.inner.writev(lba * self.block_size, [memoryview(data)])
            self.counters["cache_lost"] += len(self._durable)
            self._durable.clear()
            self._revert_pending = False

    async def _write_inner(
        self, offset: int, buffers: Sequence[memoryview], fua: bool = False
    ) -> None:
        """The inner write; with a volatile cache, the sectors' durable bytes are kept
        first (a FUA write makes its own sectors durable)."""
        bs = self.block_size
        first, count = offset // bs, _nbytes(buffers) // bs
        if self.volatile_cache and fua:
            for lba in range(first, first + count):
                self._durable.pop(lba, None)
        elif self.volatile_cache and any(
            lba not in self._durable for lba in range(first, first + count)
        ):
            old = bytearray(count * bs)
            await self.inner.readv(offset, [memoryview(old)])
            for i in range(count):
                self._durable.setdefault(first + i, bytes(old[i * bs : (i + 1) * bs]))
        await self.inner.writev(offset, buffers, fua)

    def _made_durable(self, offset: int, length: int) -> None:
        bs = self.block_size
        for lba in range(offset // bs, (offset + length + bs - 1) // bs):
            self._durable.pop(lba, None)

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if not self.powered:
            raise self._power_error()
        await self._revert()
        if not await self._wait("read"):
            raise self._power_error()
        self._inject("read", offset, _nbytes(buffers))
        await self.inner.readv(offset, buffers)

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        if not self.powered:
            raise self._power_error()
        await self._revert()
        if not await self._wait("write"):
            await self._tear(offset, buffers)
        if 0 <= self.fail_after_writes <= self.writes_done:
            self.counters["write_limit"] += 1
            raise _error("injected: the disk is worn out", self.ops["write"].sense, offset)
        self._inject("write", offset, _nbytes(buffers))
        await self._write_inner(offset, buffers, fua)
        self.writes_done += 1

    async def _tear(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """A write caught by a power cut: a prefix of its sectors lands, then it fails."""
        self.counters["torn_write"] += 1
        sectors = _nbytes(buffers) // self.block_size
        # Drawn per (seed, cut, offset), not from a shared stream: the writes caught by
        # one cut wake in trio's order, which is not theirs.
        torn = random.Random(f"{self.seed}/torn/{self.counters['power_cut']}/{offset}")
        keep = torn.randint(0, sectors) * self.block_size
        prefix: list[memoryview] = []
        for b in buffers:
            if keep <= 0:
                break
            mv = memoryview(b).cast("B")
            prefix.append(mv[:keep])
            keep -= len(prefix[-1])
        if prefix:
            await self._write_inner(offset, prefix)
        raise _error("power cut during the write (injected)", self.power_off_sense, offset)

    async def flush(self) -> None:
        if not self.powered:
            raise self._power_error()
        await self._revert()
        if not await self._wait("flush"):
            raise self._power_error()
        self._inject("flush", 0, 0)
        flushed = list(self._durable)  # what is in the cache as the flush starts
        await self.inner.flush()
        for lba in flushed:
            self._durable.pop(lba, None)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        if not self.powered:
            raise self._power_error()
        await self._revert()
        await self.inner.unmap(ranges)
        for offset, length in ranges:
            self._made_durable(offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if not self.powered:
            raise self._power_error()
        await self._revert()
        await self.inner.write_zeroes(offset, length)
        self._made_durable(offset, length)

    async def open(self) -> None:
        await open_backend(self.inner)

    async def close(self) -> None:
        await self.inner.close()

    async def resize(self, new_capacity: int) -> None:
        resizer = getattr(self.inner, "resize", None)
        if resizer is None:
            raise BackendConfigError(f"{type(self.inner).__name__} cannot resize")
        await resizer(new_capacity)


def _nbytes(buffers: Sequence[memoryview]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def _count(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FaultConfigError(f"{key} must be an integer >= 0, not {value!r}")
    return value


def _sense(key: str, value: object) -> str:
    if value not in SENSES:
        raise FaultConfigError(f"{key} must be one of {', '.join(SENSES)}, not {value!r}")
    return str(value)


def _error(msg: str, sense: str, offset: int | None) -> BackendIOError:
    s = SENSES[sense]
    if s is None:
        return BackendIOError(msg, offset=offset)
    return BackendIOError(msg, offset=offset, sense_key=s[0], asc_ascq=s[1])


def _build_inner(inner: dict[str, Any] | DiskBackend | None) -> DiskBackend:
    """The wrapped backend from its table (`backend` names it, default memory)."""
    if inner is None:
        raise FaultConfigError('inner is required: inner = { backend = "memory", size = "64M" }')
    if not isinstance(inner, dict):
        return inner
    opts = {_INNER_RENAMED.get(str(k), str(k)): v for k, v in inner.items() if k != "backend"}
    name = inner.get("backend", "memory")
    if not isinstance(name, str):
        raise FaultConfigError(f"inner.backend must be a string, not {name!r}")
    if name == "faulty":
        raise FaultConfigError("inner.backend: a faulty disk inside a faulty disk")
    try:
        return load_backend(name, opts)
    except (BackendConfigError, ValueError, TypeError) as exc:
        raise FaultConfigError(f"inner ({name}): {exc}") from exc
