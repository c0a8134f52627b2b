"""The `impair` network backend in front of the real Linux 6.1 guest on KVM (issue 11
part 4: the real guest sees exactly the injected faults).

The guest of test_kvm_netvsc (booted by its `nic_guest` set-up: eth0 from `ip=`, its
NIC's TAP on br0 in a namespace), but the NIC's backend is `impair` wrapping that
TAP. The guest has no user space (kvm_pvm), so the traffic is what its kernel does
by itself: it answers ICMP echo. With 30% loss each way (seeded) set at run time by
`vmbusd ctl nic impair`, every ping the namespace loses is a request impair dropped
on its way to the guest or a reply it dropped on the way back: the lost pings equal
the frames `vmbusd_nic_faults_total{kind="lost"}` counted. With the loss cleared,
every ping is answered.

So that nothing but the pings crosses the wire while they are counted, the guest
has no netconsole and no IPv6 (`ipv6.disable=1`), the namespace no IPv6, and its
neighbour entry for the guest is static (no ARP from the host); the guest learned
the host's MAC during the warm-up pings, before any loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_impair import _nic_faults
from test_kvm_netvsc import G_ADDR, H_ADDR, NIC_MAC, UP, Guest, _run, nic_guest

PINGS = 60
LOSS = 0.3
# test_kvm_netvsc's command line without netconsole and netvsc's message dumps (the
# console is the serial port: nothing of it goes over the NIC)
APPEND = f"ip={G_ADDR}::{H_ADDR}:255.255.255.0::eth0:off ipv6.disable=1 root=/dev/vmbt rootwait"


def impair_tap(ns: str) -> str:
    """impair (no impairment yet, seeded) in front of test_kvm_netvsc's TAP."""
    return (
        'backend = "impair"\nseed = 11\n'
        f'inner = {{ backend = "tap", ifname = "vh0", netns = "{ns}", bridge = "br0" }}\n'
    )


def _pings(g: Guest, count: int) -> tuple[int, int, str]:
    """(sent, answered, output) of `count` pings 0.2 s apart, each given 5 s."""
    r = g.ping("-i", "0.2", count=count)
    found = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert found, r.stdout + r.stderr
    return int(found.group(1)), int(found.group(2)), r.stdout


def _lost(g: Guest) -> dict[str, float]:
    assert g.stats is not None
    faults = _nic_faults(g.stats)
    return {d: faults[(d, "lost")] for d in ("to_guest", "from_guest")}


@pytest.mark.kvm_linux
@pytest.mark.timeout(600)
def test_real_guest_loses_exactly_the_pings_impair_dropped(tmp_path: Path) -> None:
    with nic_guest(tmp_path, 1, impair_tap, append=APPEND, ipv6=False) as g:
        assert UP in g.console.read_text(errors="replace")
        neigh = ("neigh", "replace", G_ADDR, "lladdr", NIC_MAC, "dev", "br0", "nud", "permanent")
        _run("ip", "-n", g.ns, *neigh)
        sent, answered, out = _pings(g, 5)  # the guest learns our MAC (its ARP)
        assert (sent, answered) == (5, 5), out
        before = _lost(g)
        assert before == {"to_guest": 0, "from_guest": 0}, before

        r = g.ctl("nic", "impair", "--vm", g.vm_name, f"loss={LOSS}")
        assert r.returncode == 0, r.stdout + r.stderr
        sent, answered, out = _pings(g, PINGS)
        lost = _lost(g)
        dropped = lost["to_guest"] + lost["from_guest"]
        print(
            f"\n{LOSS:.0%} loss each way: {sent - answered} of {sent} pings lost; impair "
            f"dropped {lost['to_guest']:.0f} requests and {lost['from_guest']:.0f} replies"
        )
        assert sent == PINGS
        assert sent - answered == dropped, (out, lost)
        # both ways lost something, and the seeded draws are not all-or-nothing
        assert lost["to_guest"] > 0 and lost["from_guest"] > 0, lost
        assert 0 < answered < sent, out

        r = g.ctl("nic", "impair", "--vm", g.vm_name, "loss=0")
        assert r.returncode == 0, r.stdout + r.stderr
        sent, answered, out = _pings(g, 20)
        assert (sent, answered) == (20, 20), out
        assert _lost(g) == lost  # nothing more dropped
        served = g.serve_log.read_text(errors="replace")
        for bad in ("channel reset", "Traceback", "ERROR"):
            assert bad not in served, served[-3000:]
