"""The switch backend: an L2 learning switch joining the NICs of every VM one
vmbusd service serves (one process, one trio loop: a switch is a named object in
it, so NICs of different VMs that name the same switch share it).

Options: `switch` (its name, default "default": one switch per service), `vlan`
(the port's own VLAN: 1..4094, or 0 = the untagged segment, the default), `trunk`
(false, the default: an access port whose guest sends and receives untagged frames
of `vlan`; true: a trunk carrying every VLAN tagged, `vlan` untagged; a list of ids:
a trunk carrying only those), `ageing` (seconds a learned MAC is kept without a
frame from it, default 300; the NICs naming one switch must agree on it).

Per frame: the VLAN is the port's (an access port drops a frame tagged with
another id; a trunk drops ids it does not carry), the source MAC is learned on
(VLAN, port), and the frame goes to the port its destination was learned on, or
is flooded to every other port of the VLAN (broadcast, multicast, unknown or aged
unicast). Never back out of the port it came in on; tagged on egress where the
port is a trunk and the VLAN is not its own, untagged otherwise (priority kept).

Each port has a bounded queue drained by its own task, a batch per guest deliver:
a port that cannot keep up (or is not running) drops beyond PORT_QUEUE_DEPTH and
counts it while the others carry on; a frame bigger than a port's MTU is dropped
there, counted. The VSP's own per-queue bound (RX_QUEUE_DEPTH, counted as
OID_GEN_RCV_NO_BUFFER) then covers a guest that stops returning receive sections.
The table is bounded too (MAX_TABLE entries per switch): a guest spraying source
MACs makes the switch flood, not grow. Learning a new MAC, or a MAC moving port,
is logged at info (`vmbusd serve -v`); a port's counters when it leaves.
Each NIC's `PortCounters` last as long as its backend (across the guest's resets)
and reach the metrics through `switch_counters()` (vmbus.stats.switch_snapshot:
vmbusd_switch_port_*{switch,port}), next to the backend's own tx/rx frames and drops.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import trio

from devices.netvsc.backends.base import (
    BackendError,
    Deliver,
    Frame,
    NetBackend,
    NicInfo,
    Offloads,
    vlan_strip,
)
from devices.netvsc.rndis import Vlan

log = logging.getLogger(__name__)

DEFAULT_SWITCH = "default"
DEFAULT_AGEING_S = 300.0
PORT_QUEUE_DEPTH = 1024  # frames waiting for one port's guest before drops
DELIVER_BATCH = 256  # frames handed to one guest per deliver call at most
MAX_TABLE = 4096  # learned (VLAN, MAC) entries per switch
UNTAGGED = 0  # the VLAN of untagged frames on a port whose `vlan` is 0
MAX_VLAN = 4094
ETH_HEADER = 14
BROADCAST = b"\xff" * 6
_ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6"}


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _vlan_text(vlan: int) -> str:
    return "untagged" if vlan == UNTAGGED else f"vlan {vlan}"


def _trunk_text(trunk: frozenset[int] | None, all_vlans: bool) -> str:
    if trunk is None:
        return ""
    return ", trunk: every VLAN" if all_vlans else f", trunk: {', '.join(map(str, sorted(trunk)))}"


def _ethertype(data: bytes) -> str:
    kind = int.from_bytes(data[12:14], "big") if len(data) >= ETH_HEADER else 0
    return _ETHERTYPES.get(kind, f"0x{kind:04x}")


@dataclass
class PortCounters:
    """One port's traffic: frames in from its guest and out to it, and why any
    were dropped."""

    rx_frames: int = 0  # from the guest into the switch
    tx_frames: int = 0  # from the switch to the guest
    flooded: int = 0  # of rx_frames, those sent to every other port of the VLAN
    dropped_queue: int = 0  # the port's queue was full (or the port not running)
    dropped_vlan: int = 0  # tagged with a VLAN the port does not carry
    dropped_mtu: int = 0  # bigger than the port's MTU
    dropped_local: int = 0  # unicast to a MAC learned on the port it came in on
    dropped_runt: int = 0  # shorter than an Ethernet header
    learned: int = 0  # source MACs learned on the port (new, or moved to it)

    def text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.__dict__.items())


@dataclass(eq=False)
class Port:
    """One NIC on a switch: its VLAN membership, its bounded queue and wake-up."""

    name: str
    mtu: int
    vlan: int  # untagged frames belong here (0: the untagged segment)
    trunk: frozenset[int] | None  # tagged VLANs carried (None: an access port)
    all_vlans: bool = False  # a trunk carrying every VLAN
    queue: deque[Frame] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    counters: PortCounters = field(default_factory=PortCounters)

    def carries(self, vlan: int) -> bool:
        if vlan == self.vlan:
            return True
        if self.trunk is None or vlan == UNTAGGED:
            return False
        return self.all_vlans or vlan in self.trunk

    def ingress_vlan(self, tag: Vlan | None) -> int | None:
        """The VLAN a frame from this port's guest is on; None: not one it carries."""
        if tag is None or tag.vlan_id == 0:  # untagged, or priority-tagged only
            return self.vlan
        return tag.vlan_id if self.carries(tag.vlan_id) else None

    def enqueue(self, frame: Frame) -> None:
        if len(frame.data) > self.mtu + ETH_HEADER:
            self.counters.dropped_mtu += 1
        elif len(self.queue) >= PORT_QUEUE_DEPTH:
            self.counters.dropped_queue += 1
        else:
            self.queue.append(frame)
            self.wakeup.set()

    def egress(self, data: bytes, vlan: int, priority: int) -> Frame:
        """The frame as this port's guest gets it: tagged (priority kept) only off
        its own VLAN, which it gets untagged."""
        if vlan == self.vlan:
            return Frame(data)
        return Frame(data, Vlan(vlan, priority, False))


@dataclass
class _Entry:
    port: Port
    seen: float


class Switch:
    """The forwarding table and the ports of one named switch."""

    def __init__(self, name: str, ageing: float) -> None:
        self.name = name
        self.ageing = ageing
        self.ports: list[Port] = []
        self.table: dict[tuple[int, bytes], _Entry] = {}
        self.table_full = 0  # source MACs not learned because the table was full

    def attach(self, port: Port) -> None:
        self.ports.append(port)

    def detach(self, port: Port) -> None:
        """The port goes, and every MAC learned on it (frames to them flood again)."""
        if port in self.ports:
            self.ports.remove(port)
        for key in [k for k, e in self.table.items() if e.port is port]:
            del self.table[key]

    def learned_on(self, port: Port, now: float) -> int:
        """How many live (not aged) table entries point at `port`."""
        return sum(1 for e in self.table.values() if e.port is port and now - e.seen <= self.ageing)

    def entries(self, now: float) -> list[tuple[int, str, str, float]]:
        """(VLAN, MAC, port, age in seconds) of every live entry, for a reader."""
        return sorted(
            (vlan, mac_text(mac), e.port.name, now - e.seen)
            for (vlan, mac), e in self.table.items()
            if now - e.seen <= self.ageing
        )

    def _learn(self, vlan: int, src: bytes, port: Port, now: float, data: bytes) -> None:
        key = (vlan, src)
        entry = self.table.get(key)
        if entry is not None:
            if entry.port is not port:
                log.info(
                    "switch %s: %s (%s) moved from port %s to %s",
                    self.name,
                    mac_text(src),
                    _vlan_text(vlan),
                    entry.port.name,
                    port.name,
                )
                entry.port = port
                port.counters.learned += 1
            entry.seen = now
            return
        if len(self.table) >= MAX_TABLE:
            self._expire(now)
            if len(self.table) >= MAX_TABLE:
                self.table_full += 1
                return
        self.table[key] = _Entry(port, now)
        port.counters.learned += 1
        log.info(
            "switch %s: learned %s (%s) on port %s (first frame: %s)",
            self.name,
            mac_text(src),
            _vlan_text(vlan),
            port.name,
            _ethertype(data),
        )

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self.table.items() if now - e.seen > self.ageing]:
            del self.table[key]

    def _lookup(self, vlan: int, dst: bytes, now: float) -> Port | None:
        entry = self.table.get((vlan, dst))
        if entry is None:
            return None
        if now - entry.seen > self.ageing:
            del self.table[(vlan, dst)]
            return None
        return entry.port

    def forward(self, ingress: Port, frames: list[Frame], now: float) -> None:
        """Frames from `ingress`'s guest, learned from and queued where they go."""
        counters = ingress.counters
        for f in frames:
            data, tag = f.data, f.vlan
            if tag is None:  # an inline tag (a guest that does not use the PPI)
                data, tag = vlan_strip(data)
            if len(data) < ETH_HEADER:
                counters.dropped_runt += 1
                continue
            vlan = ingress.ingress_vlan(tag)
            if vlan is None:
                counters.dropped_vlan += 1
                continue
            counters.rx_frames += 1
            priority = tag.priority if tag is not None else 0
            dst, src = data[0:6], data[6:12]
            if not src[0] & 1:
                self._learn(vlan, src, ingress, now, data)
            out = None if dst[0] & 1 else self._lookup(vlan, dst, now)
            if out is not None:
                if out is ingress:
                    counters.dropped_local += 1
                elif out.carries(vlan):
                    out.enqueue(out.egress(data, vlan, priority))
                continue
            counters.flooded += 1
            for port in self.ports:
                if port is not ingress and port.carries(vlan):
                    port.enqueue(port.egress(data, vlan, priority))


_switches: dict[str, Switch] = {}


def get_switch(name: str, ageing: float) -> Switch:
    """The service's switch called `name`, made on first use; a second NIC naming
    it with another ageing is a one-line BackendError."""
    sw = _switches.get(name)
    if sw is None:
        sw = _switches[name] = Switch(name, ageing)
    elif sw.ageing != ageing:
        raise BackendError(
            f"switch backend: switch {name!r} has ageing {sw.ageing:g} s; "
            f"every NIC on it must say the same (this one says {ageing:g})"
        )
    return sw


def _vlan_id(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_VLAN:
        raise BackendError(
            f"switch backend: {what} {value!r} must be an integer in {low}..{MAX_VLAN}"
        )
    return value


class SwitchBackend(NetBackend):
    """One port of a named learning switch shared by every NIC that names it."""

    name = "switch"
    offloads = Offloads()  # frames go to other guests: finished, checksums filled

    def __init__(
        self,
        *,
        switch: str = DEFAULT_SWITCH,
        vlan: int = UNTAGGED,
        trunk: bool | list[int] = False,
        ageing: float = DEFAULT_AGEING_S,
    ) -> None:
        self.counters = PortCounters()  # this NIC's port, over the backend's life
        self._rx_dropped_base = 0
        super().__init__()
        if not isinstance(switch, str) or not switch:
            raise BackendError("switch backend: switch must be a non-empty string (its name)")
        self.vlan = _vlan_id(vlan, "vlan", 0)
        self.all_vlans = trunk is True
        self.trunk: frozenset[int] | None
        if isinstance(trunk, bool):
            self.trunk = frozenset() if trunk else None
        elif isinstance(trunk, list) and trunk:
            self.trunk = frozenset(_vlan_id(v, "trunk VLAN", 1) for v in trunk)
        else:
            raise BackendError(
                f"switch backend: trunk {trunk!r} must be true, false or a non-empty "
                "list of VLAN ids"
            )
        if (
            isinstance(ageing, bool)
            or not isinstance(ageing, int | float)
            or not math.isfinite(ageing)
            or ageing <= 0
        ):
            raise BackendError(f"switch backend: ageing {ageing!r} must be a positive number")
        self.switch = get_switch(switch, float(ageing))
        self.port: Port | None = None
        self.port_name = ""  # the port's name (the NIC's MAC) once it has run

    @property
    def rx_dropped(self) -> int:
        """Frames dropped on the way to this NIC (its queue full, or over its MTU),
        which happens in other ports' transmits."""
        return self._rx_dropped_base + self.counters.dropped_queue + self.counters.dropped_mtu

    @rx_dropped.setter
    def rx_dropped(self, value: int) -> None:
        self._rx_dropped_base = value - self.counters.dropped_queue - self.counters.dropped_mtu

    def switch_counters(self) -> dict[str, object] | None:
        """This NIC's port for the metrics (vmbus.stats.switch_snapshot): the switch,
        the port (the NIC's MAC), its counters and the MACs the table has on it now;
        None before the NIC first joined the switch."""
        if not self.port_name:
            return None
        port = self.port
        macs = 0 if port is None else self.switch.learned_on(port, trio.current_time())
        return {
            "switch": self.switch.name,
            "port": self.port_name,
            "counters": dict(self.counters.__dict__),
            "macs": macs,
        }

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        port = Port(
            mac_text(nic.mac),
            nic.mtu,
            self.vlan,
            self.trunk,
            self.all_vlans,
            counters=self.counters,
        )
        self.switch.attach(port)
        self.port = port
        self.port_name = port.name
        log.info(
            "switch %s: port %s joined (%s%s)",
            self.switch.name,
            port.name,
            _vlan_text(self.vlan),
            _trunk_text(self.trunk, self.all_vlans),
        )
        try:
            task_status.started()
            while True:
                await port.wakeup.wait()
                port.wakeup = trio.Event()
                while port.queue:
                    n = min(len(port.queue), DELIVER_BATCH)
                    batch = [port.queue.popleft() for _ in range(n)]
                    port.counters.tx_frames += n
                    self.rx_frames += n
                    deliver(batch)
                await trio.lowlevel.checkpoint()  # one port's flood never starves the rest
        finally:
            self.port = None
            self.switch.detach(port)
            log.info(
                "switch %s: port %s left: %s", self.switch.name, port.name, port.counters.text()
            )

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        port = self.port
        if port is None:
            self.tx_dropped += len(frames)
            return
        before = port.counters.rx_frames
        self.switch.forward(port, frames, trio.current_time())
        taken = port.counters.rx_frames - before
        self.tx_frames += taken
        self.tx_dropped += len(frames) - taken  # a VLAN it does not carry, or a runt
