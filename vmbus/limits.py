"""Per-VM limits: one place for what one VM may take of a shared vmbusd.

A vmbusd serves many VMs from one process; each limit below keeps one VM from
taking what the others need. They are configured in the TOML config (a `[limits]`
table for every VM, `[vm.NAME.limits]` on top of it for one VM) and enforced by the
VM's session through a `VmLimiter`:

* ``channels`` -- channels of the VM offered or open at once, primaries and
  sub-channels together. A device's request for more sub-channels is capped (the
  guest hears how many it got, through the device's own answer: storvsc's and
  netvsc's sub-channel replies); an OPENCHANNEL beyond it gets OPENCHANNEL_RESULT
  with a failure status.
* ``gpadl_bytes`` -- guest memory registered as GPADLs at once (rings and device
  buffers). Also never more than the VM's RAM plus one maximal GPADL. A GPADL_HEADER
  beyond it gets GPADL_CREATED with a failure status.
* ``outstanding_requests`` -- requests the VM's devices have taken off its rings
  and not yet completed, across all its channels (`RequestBudget`, `ctx.requests`).
  A device out of budget stops reading its ring: back-pressure the guest sees as a
  full ring. Devices keep their own per-channel caps (storvsc's queue depth,
  netvsc's MAX_RX_IN_FLIGHT); this one bounds their sum.
* ``control_rate`` / ``control_burst`` -- the guest's VMBus control messages
  (HvPostMessage) per second, a token bucket of ``control_burst`` tokens. Over the
  rate the session stops reading that VM's posts until a token is back:
  back-pressure that the VMM turns into HV_STATUS_INSUFFICIENT_BUFFERS for its
  guest (vmbus.kvm.vmm POST_QUEUE). Other VMs are served by their own sessions and
  never wait for it.

Every hit counts in `VmLimiter.hits` (exported as ``vmbusd_limit_hits_total``) and
leaves one log line: one per refusal, one per back-pressure episode.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import trio

from vmbus.cliutil import UserError

log = logging.getLogger(__name__)

PAGE_SIZE = 4096

# Defaults: generous for one real VM, small enough that a few hundred VMs fit.
DEFAULT_CHANNELS = 128  # a 64-vCPU VM's NIC (64 queues) and disk controller (64)
DEFAULT_GPADL_BYTES = 8 << 30  # and never more than the VM's RAM + one maximal GPADL
DEFAULT_OUTSTANDING_REQUESTS = 4096  # 16 channels at storvsc's queue depth of 256
DEFAULT_CONTROL_RATE = 2000  # messages/s: a Linux boot with 64 channels posts ~1,000
DEFAULT_CONTROL_BURST = 4096  # a whole boot's GPADLs and opens without waiting
EPISODE_QUIET_S = 1.0  # a request-budget episode (one log line) ends after this without a wait

# What a configured value may be (anything outside is a typo or an attack on us).
BOUNDS: dict[str, tuple[int, int]] = {
    "channels": (1, 2047),  # relids 1..2047
    "gpadl_bytes": (PAGE_SIZE, 1 << 52),
    "outstanding_requests": (1, 1 << 20),
    "control_rate": (1, 1_000_000),
    "control_burst": (1, 1_000_000),
}

LIMIT_NAMES = ("channels", "gpadl_bytes", "outstanding_requests", "control_rate")
"""The counters of `VmLimiter.hits`: one per limit (the burst belongs to the rate)."""


class LimitsError(UserError):
    """A `[limits]` table that is wrong; the message names the table and the key."""


@dataclass(frozen=True)
class VmLimits:
    """What one VM may take of the service (see the module docstring for each)."""

    channels: int = DEFAULT_CHANNELS
    gpadl_bytes: int = DEFAULT_GPADL_BYTES
    outstanding_requests: int = DEFAULT_OUTSTANDING_REQUESTS
    control_rate: int = DEFAULT_CONTROL_RATE
    control_burst: int = DEFAULT_CONTROL_BURST

    def __post_init__(self) -> None:
        for f in fields(self):
            lo, hi = BOUNDS[f.name]
            v = getattr(self, f.name)
            if type(v) is not int or not lo <= v <= hi:
                raise LimitsError(f"{f.name} must be an integer in {lo}..{hi}, not {v!r}")

    @property
    def gpadl_pages(self) -> int:
        return self.gpadl_bytes // PAGE_SIZE


def parse_limits(table: object, where: str, base: VmLimits | None = None) -> VmLimits:
    """A `[limits]` table on top of `base` (the built-in defaults when None): every
    key known, every value an integer in its bounds; a LimitsError names the key."""
    base = base or VmLimits()
    if not isinstance(table, Mapping):
        raise LimitsError(f"{where}: must be a table of limits ({', '.join(BOUNDS)})")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in BOUNDS:
            close = difflib.get_close_matches(str(key), list(BOUNDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LimitsError(f"{where}: unknown limit {key!r}{hint}; known: {', '.join(BOUNDS)}")
        lo, hi = BOUNDS[key]
        if type(value) is not int or not lo <= value <= hi:
            raise LimitsError(f"{where}: {key} must be an integer in {lo}..{hi}, not {value!r}")
        changes[key] = value
    return replace(base, **changes)


def limits_from_config(cfg: Mapping[str, Any], source: str, vm_name: str | None) -> VmLimits:
    """One VM's limits from a parsed config: [vm.NAME.limits] over [limits] over the
    defaults."""
    limits = parse_limits(cfg.get("limits", {}), f"{source}: [limits]")
    vms = cfg.get("vm", {})
    section = vms.get(vm_name) if isinstance(vms, dict) and vm_name is not None else None
    if isinstance(section, dict) and "limits" in section:
        limits = parse_limits(section["limits"], f"{source}: [vm.{vm_name}.limits]", limits)
    return limits


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved. `take` never refuses: it
    returns how long the caller must wait for its token (0 when one was there)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at: float | None = None  # read the clock at first use (trio's needs a run)

    def full_before_take(self) -> bool:
        """Whether the bucket is full now (the sender was quiet long enough)."""
        self._refill()
        return self._tokens >= self.burst

    def _refill(self) -> None:
        now = self._clock()
        if self._at is None:
            self._at = now
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> float:
        self._refill()
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RequestBudget:
    """The VM's outstanding-request budget, shared by all its channels' devices.

    A device takes slots for requests it takes off a ring (`acquire`) and gives them
    back when they complete (`release`). Out of slots, `acquire` waits: the device
    stops reading its ring, so the guest sees a full ring, not an error. An
    episode of waiting ends after EPISODE_QUIET_S without one (requests completing
    in bursts empty the budget for an instant, so "free again" would be many
    episodes); `on_wait(first_of_episode)` hears of every wait."""

    def __init__(self, size: int, on_wait: Callable[[bool], None] = lambda _first: None) -> None:
        self.size = size
        self.in_use = 0
        self._on_wait = on_wait
        self._freed = trio.Event()
        self._last_wait = -math.inf  # trio time the last wait ended
        self._waiting = 0  # acquirers waiting now

    @property
    def available(self) -> int:
        return self.size - self.in_use

    async def acquire(self, want: int = 1) -> int:
        """At least one slot and up to `want` of those free; waits while none is."""
        if want < 1:
            raise ValueError("acquire at least one slot")
        if self.available <= 0:
            quiet = trio.current_time() - self._last_wait > EPISODE_QUIET_S
            self._on_wait(quiet and not self._waiting)
            self._waiting += 1
            try:
                while self.available <= 0:
                    await self._freed.wait()
            finally:
                self._waiting -= 1
                self._last_wait = trio.current_time()
        n = min(want, self.available)
        self.in_use += n
        return n

    def release(self, n: int) -> None:
        if not 0 < n <= self.in_use:
            raise ValueError(f"release of {n} slots, {self.in_use} in use")
        self.in_use -= n
        self._freed.set()
        self._freed = trio.Event()


class VmLimiter:
    """One VM session's limits at work: the checks, the counters, the log lines."""

    def __init__(self, limits: VmLimits, label: str, clock: Callable[[], float] | None = None):
        self.limits = limits
        self.label = label
        self.hits: dict[str, int] = dict.fromkeys(LIMIT_NAMES, 0)
        self._clock = clock or trio.current_time
        self._bucket = TokenBucket(limits.control_rate, limits.control_burst, self._clock)
        self._throttling = False
        self._last_throttle = 0.0
        self.requests = RequestBudget(limits.outstanding_requests, self._requests_wait)

    def _hit(self, name: str) -> None:
        self.hits[name] += 1

    # channels ------------------------------------------------------------------------

    def subchannels_allowed(self, device: str, offered: int, have: int, want: int) -> int:
        """How many sub-channels a device asking for `want` (having `have`) may have,
        with `offered` channels of the VM offered now. A cut is one refusal."""
        room = self.limits.channels - offered
        allowed = min(want, have + max(0, room))
        if allowed < want:
            self._hit("channels")
            log.warning(
                "%s: %s asked for %d sub-channel(s), %d allowed: the VM is at its limit of "
                "%d channels (limits.channels)",
                self.label,
                device,
                want,
                max(allowed, have),
                self.limits.channels,
            )
        return allowed

    def may_open(self, open_now: int, relid: int) -> bool:
        """Whether one more channel may open (OPENCHANNEL); no is one refusal."""
        if open_now < self.limits.channels:
            return True
        self._hit("channels")
        log.warning(
            "%s: relid %d: open refused: %d channels open, the limit (limits.channels)",
            self.label,
            relid,
            open_now,
        )
        return False

    # GPADLs ------------------------------------------------------------------------------

    def gpadl_pages(self, ram_pages: int, slack_pages: int) -> int:
        """The VM's GPADL page cap (the bus's max_gpadl_pages): the configured bytes,
        and never more than its RAM plus `slack_pages` (one maximal GPADL). The bus
        refuses a GPADL_HEADER over it, counts it, and its violation is the one log
        line."""
        return min(self.limits.gpadl_pages, ram_pages + slack_pages)

    # control messages --------------------------------------------------------------------

    async def control_message(self) -> None:
        """Before handling one of the guest's posts: wait while the VM is over its rate
        (its later posts stay unread meanwhile). One log line per episode: from the
        first wait until the bucket is full again and EPISODE_QUIET_S passed without a
        wait (a flooding sender that is itself descheduled for a moment is still one
        episode)."""
        if (
            self._throttling
            and self._bucket.full_before_take()
            and self._clock() - self._last_throttle > EPISODE_QUIET_S
        ):
            self._throttling = False
        delay = self._bucket.take()
        if delay <= 0:
            return
        self._last_throttle = self._clock()
        self._hit("control_rate")
        if not self._throttling:
            self._throttling = True
            log.warning(
                "%s: more than %d control messages/s (burst %d): reading its posts more "
                "slowly (limits.control_rate)",
                self.label,
                self.limits.control_rate,
                self.limits.control_burst,
            )
        await trio.sleep(delay)

    # outstanding requests ----------------------------------------------------------------

    def _requests_wait(self, first: bool) -> None:
        self._hit("outstanding_requests")
        if first:
            log.warning(
                "%s: %d requests outstanding, the limit (limits.outstanding_requests): "
                "its devices stop reading their rings until some complete",
                self.label,
                self.requests.size,
            )

    def snapshot(self, gpadl_refusals: int = 0) -> dict[str, object]:
        """The VM's limits and hit counters for `vmbusd stats` (plain data);
        `gpadl_refusals` is the bus's count (it enforces that cap itself)."""
        return {
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(self.limits)},
            "hits": dict(self.hits, gpadl_bytes=gpadl_refusals),
            "requests_in_use": self.requests.in_use,
        }
