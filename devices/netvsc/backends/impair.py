"""The `impair` network backend: any other network backend behind a bad wire, for
the people who test guest network drivers and stacks (does TCP recover from 2%
loss? what does the driver do when the link flaps?).

It wraps an inner backend built from its own table (`inner = { backend = "tap",
ifname = "vh0" }`) and impairs frames in both directions, each direction on its own
settings: a key at the top (`loss = 0.02`) sets both, a `to_guest = { ... }` or
`from_guest = { ... }` table overrides one. Per direction:

- `loss`: the fraction of frames dropped;
- `delay_ms` and `jitter_ms`: each frame waits delay +- a uniform jitter (frames
  still leave in the order they came, as on a wire; reordering is its own knob);
- `reorder`: the fraction of frames held back `reorder_gap_ms` (default 5) so that
  frames sent after them overtake them;
- `duplicate`: the fraction of frames sent twice;
- `corrupt`: the fraction of frames with one bit flipped (past the Ethernet header).

And for the link: `flap_up_s` and `flap_down_s` (both > 0) take the wire down for
flap_down_s after every flap_up_s; while it is down every frame both ways is dropped
and `link_up` is False (a listener set in `link_listener`, such as the NIC's
`set_link`, is told).

Everything random comes from `seed`, one stream per direction and purpose, so the
same seed and the same frames give the same impairments. Every impairment is
counted (`counters[(direction, kind)]`, exported as `vmbusd_nic_faults_total`).
Settings change at runtime through `configure(**keys)` (what `vmbusd ctl SOCK nic
impair` calls; `to_guest.loss` names one direction), checked as the config's are.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from devices.netvsc.backends.base import (
    BackendError,
    Deliver,
    Frame,
    NetBackend,
    NicInfo,
    make_backend,
)

DIRECTIONS = ("to_guest", "from_guest")
KINDS = ("lost", "delayed", "reordered", "duplicated", "corrupted", "link_down")
_DIR_KEYS = ("loss", "delay_ms", "jitter_ms", "reorder", "reorder_gap_ms", "duplicate", "corrupt")
_FRACTIONS = ("loss", "reorder", "duplicate", "corrupt")
ETH_HLEN = 14


@dataclass
class Impairments:
    """One direction's settings."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_gap_ms: float = 5.0
    duplicate: float = 0.0
    corrupt: float = 0.0


@dataclass
class _Direction:
    """One direction's settings, random streams and frames waiting to leave."""

    name: str
    imp: Impairments = field(default_factory=Impairments)
    rng: dict[str, random.Random] = field(default_factory=dict)
    heap: list[tuple[float, int, int, Frame]] = field(default_factory=list)  # (t, seq, queue, f)
    last_t: float = 0.0  # when the last in-order frame leaves (delays keep order)
    wake: trio.Event = field(default_factory=trio.Event)

    def seed(self, seed: int) -> None:
        self.rng = {k: random.Random(f"{seed}/{self.name}/{k}") for k in (*KINDS, "jitter", "flip")}


class ImpairBackend(NetBackend):
    """Another network backend, behind an impaired wire (see the module docstring)."""

    name = "impair"

    def __init__(
        self,
        *,
        inner: dict[str, Any] | NetBackend | None = None,
        seed: int = 0,
        loss: float = 0.0,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        reorder: float = 0.0,
        reorder_gap_ms: float = 5.0,
        duplicate: float = 0.0,
        corrupt: float = 0.0,
        to_guest: dict[str, Any] | None = None,
        from_guest: dict[str, Any] | None = None,
        flap_up_s: float = 0.0,
        flap_down_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.inner = _build_inner(inner)
        self.offloads = self.inner.offloads  # the VSP hands us what the inner one takes
        self.counters = {(d, k): 0 for d in DIRECTIONS for k in KINDS}
        self.flaps = 0
        self.link_listener: Callable[[bool], object] | None = None
        self._dirs = {d: _Direction(d) for d in DIRECTIONS}
        self._seq = itertools.count()
        self._link = True
        self.flap_up_s = 0.0
        self.flap_down_s = 0.0
        self._flap_changed = trio.Event()
        self._deliver: Deliver | None = None
        self.seed = seed
        both = {
            "loss": loss,
            "delay_ms": delay_ms,
            "jitter_ms": jitter_ms,
            "reorder": reorder,
            "reorder_gap_ms": reorder_gap_ms,
            "duplicate": duplicate,
            "corrupt": corrupt,
        }
        keys: dict[str, Any] = {"seed": seed, "flap_up_s": flap_up_s, "flap_down_s": flap_down_s}
        keys.update(both)
        for d, table in (("to_guest", to_guest), ("from_guest", from_guest)):
            if table is None:
                continue
            if not isinstance(table, dict):
                raise BackendError(f"impair backend: {d} must be a table of settings")
            keys.update({f"{d}.{k}": v for k, v in table.items()})
        self.configure(**keys)

    # ---- settings ----

    def configure(self, **keys: Any) -> list[str]:
        """Change settings (a top-level key sets both directions, `to_guest.KEY` or
        `from_guest.KEY` one); all are checked before any applies. Returns what changed."""
        staged = [(k, self._check(k, v)) for k, v in keys.items()]
        for key, value in staged:
            direction, _, what = key.rpartition(".")
            if key == "seed":
                self.seed = value
                for dir_ in self._dirs.values():
                    dir_.seed(value)
            elif key in ("flap_up_s", "flap_down_s"):
                setattr(self, key, value)
                self._flap_changed.set()
                self._flap_changed = trio.Event()
            else:
                for d in (direction,) if direction else DIRECTIONS:
                    setattr(self._dirs[d].imp, what, value)
        return [f"{k}={v}" for k, v in staged]

    def _check(self, key: str, value: Any) -> Any:
        direction, _, what = key.rpartition(".")
        if direction and direction not in DIRECTIONS:
            raise BackendError(
                f"impair backend: {key!r}: the direction must be to_guest or from_guest"
            )
        if key == "seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise BackendError(f"impair backend: seed must be an integer, not {value!r}")
            return value
        if key in ("flap_up_s", "flap_down_s") or what in _DIR_KEYS:
            if not _is_number(value) or not 0 <= float(value) < math.inf:
                raise BackendError(f"impair backend: {key} must be a number >= 0, not {value!r}")
            if what in _FRACTIONS and float(value) > 1:
                raise BackendError(f"impair backend: {key} must be a fraction 0..1, not {value!r}")
            return float(value)
        known = ", ".join(["seed", *_DIR_KEYS, "flap_up_s", "flap_down_s"])
        raise BackendError(
            f"impair backend: unknown setting {key!r}; known: {known} "
            "(to_guest.KEY / from_guest.KEY for one direction)"
        )

    def fault_counters(self) -> dict[str, int]:
        """Impairments as "direction.kind" (and "link.flaps"), for
        `vmbusd_nic_faults_total`."""
        out = {f"{d}.{k}": n for (d, k), n in self.counters.items()}
        out["link.flaps"] = self.flaps
        return out

    def settings(self, direction: str) -> Impairments:
        return dataclasses.replace(self._dirs[direction].imp)

    @property
    def link_up(self) -> bool:
        return self._link and self.inner.link_up

    def _set_link(self, up: bool) -> None:
        self._link = up
        if not up:
            self.flaps += 1
        if self.link_listener is not None:
            self.link_listener(up)

    # ---- frames ----

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._deliver = deliver
        try:
            async with trio.open_nursery() as nursery:
                for d in self._dirs.values():
                    d.heap.clear()
                    nursery.start_soon(self._pump, d)
                nursery.start_soon(self._flapper)
                await nursery.start(self.inner.run, nic, self._from_inner)
                task_status.started()
        finally:
            self._deliver = None

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        self.tx_frames += len(frames)
        self._impair(self._dirs["from_guest"], queue, frames)

    def _from_inner(self, frames: list[Frame]) -> None:
        self.rx_frames += len(frames)
        self._impair(self._dirs["to_guest"], 0, frames)

    def _impair(self, d: _Direction, queue: int, frames: list[Frame]) -> None:
        """Each frame lost, corrupted, duplicated, delayed or held back; the ones that
        need no waiting leave at once, in one batch."""
        imp, rng, count = d.imp, d.rng, self.counters
        now_out: list[Frame] = []
        now = trio.current_time() if (imp.delay_ms or imp.jitter_ms or imp.reorder) else 0.0
        for f in frames:
            if not self.link_up:
                count[(d.name, "link_down")] += 1
                continue
            if imp.loss and rng["lost"].random() < imp.loss:
                count[(d.name, "lost")] += 1
                continue
            if imp.corrupt and rng["corrupted"].random() < imp.corrupt:
                count[(d.name, "corrupted")] += 1
                f = _flip_bit(f, rng["flip"])
            copies = 1
            if imp.duplicate and rng["duplicated"].random() < imp.duplicate:
                count[(d.name, "duplicated")] += 1
                copies = 2
            held = bool(imp.reorder) and rng["reordered"].random() < imp.reorder
            delay = imp.delay_ms
            if imp.jitter_ms:
                delay += rng["jitter"].uniform(-imp.jitter_ms, imp.jitter_ms)
            delay = max(0.0, delay) / 1000.0
            for _ in range(copies):
                if held:
                    count[(d.name, "reordered")] += 1
                    t = now + delay + imp.reorder_gap_ms / 1000.0
                    heapq.heappush(d.heap, (t, next(self._seq), queue, f))
                elif delay > 0 or d.heap:
                    if delay > 0:
                        count[(d.name, "delayed")] += 1
                    d.last_t = max(d.last_t, now + delay)  # in order behind the earlier ones
                    heapq.heappush(d.heap, (d.last_t, next(self._seq), queue, f))
                else:
                    now_out.append(f)
        if now_out:
            self._emit(d, queue, now_out)
        if d.heap:
            d.wake.set()

    def _emit(self, d: _Direction, queue: int, frames: list[Frame]) -> None:
        if d.name == "from_guest":
            self.inner.transmit(queue, frames)
        elif self._deliver is not None:
            self._deliver(frames)
        else:
            self.rx_dropped += len(frames)

    async def _pump(self, d: _Direction) -> None:
        """Frames whose time has come leave, a batch per queue."""
        while True:
            now = trio.current_time()
            by_queue: dict[int, list[Frame]] = {}
            while d.heap and d.heap[0][0] <= now:
                _t, _s, queue, f = heapq.heappop(d.heap)
                by_queue.setdefault(queue, []).append(f)
            for queue, frames in by_queue.items():
                self._emit(d, queue, frames)
            next_t = d.heap[0][0] if d.heap else math.inf
            with trio.move_on_at(next_t):
                await d.wake.wait()
            d.wake = trio.Event()

    async def _flapper(self) -> None:
        """Up flap_up_s, down flap_down_s, again; idle while either is 0."""
        while True:
            changed = self._flap_changed
            if not (self.flap_up_s > 0 and self.flap_down_s > 0):
                if not self._link:
                    self._set_link(True)
                await changed.wait()
                continue
            with trio.move_on_after(self.flap_up_s if self._link else self.flap_down_s):
                await changed.wait()
            if changed.is_set():
                continue
            self._set_link(not self._link)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flip_bit(f: Frame, rng: random.Random) -> Frame:
    data = bytearray(f.data)
    start = ETH_HLEN if len(data) > ETH_HLEN else 0
    if not data:
        return f
    pos = rng.randrange(start, len(data))
    data[pos] ^= 1 << rng.randrange(8)
    return dataclasses.replace(f, data=bytes(data))


def _build_inner(inner: dict[str, Any] | NetBackend | None) -> NetBackend:
    """The wrapped backend from its table (`backend` names it, default loopback)."""
    from vmbus import plugins

    if inner is None:
        inner = {"backend": "loopback"}
    if isinstance(inner, NetBackend):
        return inner
    if not isinstance(inner, dict):
        raise BackendError('impair backend: inner must be a table: inner = { backend = "tap" }')
    name = inner.get("backend", "loopback")
    if not isinstance(name, str):
        raise BackendError(f"impair backend: inner.backend must be a string, not {name!r}")
    if name == "impair":
        raise BackendError("impair backend: inner.backend: an impair inside an impair")
    try:
        cls = plugins.resolve(plugins.NET_BACKENDS, name)
    except plugins.PluginError as exc:
        raise BackendError(f"impair backend: inner: {exc}") from exc
    opts = {k: v for k, v in inner.items() if k != "backend"}
    try:
        return make_backend(cls, name, opts)
    except BackendError as exc:
        raise BackendError(f"impair backend: inner: {exc}") from exc
