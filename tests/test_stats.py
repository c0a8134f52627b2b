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

from devices.echo import ECHO_IF_TYPE
from vmbus.guest.workloads import echo_mixed
from vmbus.stats import render_prometheus

RING = 64 * 1024

pytestmark = pytest.mark.timeout(60)


def test_prometheus_rendering_is_exact_and_escaped() -> None:
    snap = {
        "vms": [
            {
                "vm": 'odd"vm\\',
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
    assert "vmbusd_vms 1\n" in text
    assert 'vmbusd_channels_open{vm="odd\\"vm\\\\"} 1\n' in text
    assert 'vmbusd_channel_resets_total{vm="odd\\"vm\\\\"} 1\n' in text
    assert (
        'vmbusd_channel_packets_in_total{vm="odd\\"vm\\\\",relid="3",device="echo",sub="0"} 7\n'
        in text
    )
    assert "# TYPE vmbusd_channel_wakeups_total counter\n" in text
    # every sample line is NAME{labels} VALUE or NAME VALUE
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.fullmatch(r"[a-z_]+(\{.*\})? \d+", line), line


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
            assert f"{res.packets:,}" in table.stdout

            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                body = b""
                while chunk := s.recv(65536):
                    body += chunk
            head, _, text = body.decode().partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 200") and "version=0.0.4" in head
            want = (
                f'vmbusd_channel_packets_in_total{{vm="stats-vm",relid="{offer.relid}",'
                f'device="echo",sub="0"}} {res.packets}'
            )
            assert want in text
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
        assert bad.returncode == 1 and "cannot reach" in bad.stderr
