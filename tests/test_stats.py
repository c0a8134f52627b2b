"""`vmbusd stats` and the Prometheus endpoint, against a real service with traffic."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import guest, serve_process
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from devices.echo import ECHO_IF_TYPE
from vmbus.guest.workloads import echo_mixed
from vmbus.stats import render_prometheus

RING = 64 * 1024

pytestmark = pytest.mark.timeout(60)


def _families(text: str) -> dict[str, Metric]:
    """The exposition as prometheus-client's own parser reads it (by family name)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_rendering_parses_and_escapes() -> None:
    snap = {
        "vms": [
            {
                "vm": 'odd"vm\\',
                "session": "s1",
                "vcpus": 2,
                "version": "5.3",
                "resets": 1,
                "channels": [
                    {
                        "relid": 3,
                        "device": "echo",
                        "sub_channel": 0,
                        "vcpu": 0,
                        "stats": {"packets_in": 7, "wakeups": 2},
                    }
                ],
            }
        ]
    }
    text = render_prometheus(snap)
    assert "# TYPE vmbusd_channel_wakeups_total counter\n" in text
    fams = _families(text)
    assert [s.value for s in fams["vmbusd_vms"].samples] == [1]
    vm = {"vm": 'odd"vm\\', "session": "s1"}
    assert [(s.labels, s.value) for s in fams["vmbusd_channels_open"].samples] == [(vm, 1)]
    assert fams["vmbusd_channel_resets"].type == "counter"
    assert [(s.name, s.labels, s.value) for s in fams["vmbusd_channel_resets"].samples] == [
        ("vmbusd_channel_resets_total", vm, 1)
    ]
    (pin,) = fams["vmbusd_channel_packets_in"].samples
    assert pin.labels == {**vm, "relid": "3", "device": "echo", "sub": "0"} and pin.value == 7
    (bout,) = fams["vmbusd_channel_bytes_out"].samples  # a counter the snapshot lacks: 0
    assert bout.value == 0
    # OpenMetrics when the scraper asks for it, and it parses the same
    om = render_prometheus(snap, "application/openmetrics-text; version=1.0.0")
    assert om.endswith("# EOF\n")


def _scrape(port: int) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    head, _, text = body.decode().partition("\r\n\r\n")
    return head, text


async def test_two_vms_with_one_name_get_distinct_series(tmp_path: Path) -> None:
    """Two VMMs that both call their VM "sim": every series stays unique (session)."""
    with serve_process(tmp_path, ["echo"], ("--metrics", "127.0.0.1:0")) as sp:
        port = int(
            re.search(
                r"metrics on http://127.0.0.1:(\d+)/metrics", sp.wait_log("metrics on")
            ).group(1)
        )
        async with guest(sp.path, vm_id="sim") as a, guest(sp.path, vm_id="sim") as b:
            cha = await a.open_channel(a.find_offers(ECHO_IF_TYPE)[0], RING)
            chb = await b.open_channel(b.find_offers(ECHO_IF_TYPE)[0], RING)
            await echo_mixed(cha.channel, 30, 1000)
            await echo_mixed(chb.channel, 50, 1000)
            head, text = _scrape(port)
            assert head.startswith("HTTP/1.1 200")
            fams = _families(text)
            opened = fams["vmbusd_channels_open"].samples
            assert [s.labels["vm"] for s in opened] == ["sim", "sim"]
            assert len({s.labels["session"] for s in opened}) == 2
            for fam in fams.values():  # no two samples of a family share their labels
                keys = [(s.name, tuple(sorted(s.labels.items()))) for s in fam.samples]
                assert len(keys) == len(set(keys)), fam.name
            pin = fams["vmbusd_channel_packets_in"].samples
            assert sorted(s.value for s in pin) == [30, 50]
            await a.close_channel(cha)
            await b.close_channel(chb)


async def test_stats_and_metrics_of_a_running_service(tmp_path: Path) -> None:
    stats_path = str(tmp_path / "vmbusd.stats")
    with serve_process(
        tmp_path, ["echo", "echo"], ("--stats", stats_path, "--metrics", "127.0.0.1:0")
    ) as sp:
        port = int(
            re.search(
                r"metrics on http://127.0.0.1:(\d+)/metrics", sp.wait_log("metrics on")
            ).group(1)
        )
        assert (os.stat(stats_path).st_mode & 0o777) == 0o600
        async with guest(sp.path, vm_id="stats-vm") as vm:
            offer = vm.find_offers(ECHO_IF_TYPE)[0]
            ch = await vm.open_channel(offer, RING)
            res = await echo_mixed(ch.channel, 500, RING // 4 - 64)

            r = subprocess.run(
                [sys.executable, "-m", "vmbus.cli", "stats", stats_path, "--json"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert r.returncode == 0, r.stderr
            snap = json.loads(r.stdout)
            (vmsnap,) = snap["vms"]
            assert vmsnap["vm"] == "stats-vm" and vmsnap["version"] == "5.3"
            (chs,) = vmsnap["channels"]
            assert chs["relid"] == offer.relid and chs["device"] == "echo"
            assert chs["stats"]["packets_in"] == res.packets
            assert chs["stats"]["packets_out"] == res.packets

            table = subprocess.run(
                [sys.executable, "-m", "vmbus.cli", "stats", stats_path],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert table.returncode == 0 and "stats-vm: VMBus 5.3" in table.stdout
            assert f"session {vmsnap['session']}" in table.stdout
            assert f"{res.packets:,}" in table.stdout

            head, text = _scrape(port)
            assert head.startswith("HTTP/1.1 200") and "version=0.0.4" in head
            (pin,) = _families(text)["vmbusd_channel_packets_in"].samples
            assert pin.value == res.packets
            assert pin.labels == {
                "vm": "stats-vm",
                "session": vmsnap["session"],
                "relid": str(offer.relid),
                "device": "echo",
                "sub": "0",
            }
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /other HTTP/1.1\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 404")
            await vm.close_channel(ch)
        bad = subprocess.run(
            [sys.executable, "-m", "vmbus.cli", "stats", str(tmp_path / "nope")],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert bad.returncode == 2 and "nobody listens on" in bad.stderr
        assert len(bad.stderr.splitlines()) == 1
