"""What a user meets: every mistake is one line on stderr and exit status 2, every
command stops cleanly on SIGTERM and Ctrl-C. Each case runs the real `vmbusd` console
script as a separate process, as a user would."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

VMBUSD = str(Path(sys.executable).with_name("vmbusd"))
START_TIMEOUT_S = 20.0


def vmbusd(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VMBUSD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed as a user's mistake: exit 2, exactly one line, no traceback."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "ExceptionGroup" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Running:
    """A vmbusd process in the background; its stderr goes to a file we can poll."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [VMBUSD, *args], stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env
            )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the output of {self.proc.args}:\n{self.text()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Running]:
    r = Running(args, log, env)
    try:
        yield r
    finally:
        r.kill()


def stale_socket(path: Path) -> None:
    """A socket file whose process is gone (bound, never unlinked)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    s.close()
    assert path.is_socket()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (children left behind)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text.encode() in cmd and state != "Z":
            pids.append(int(entry))
    return pids


# -- config --------------------------------------------------------------------------


def serve_with_config(tmp_path: Path, config_text: str | None) -> str:
    """`vmbusd serve --config FILE` must refuse the file before it listens."""
    cfg = tmp_path / "vm.toml"
    if config_text is not None:
        cfg.write_text(config_text)
    sock = tmp_path / "vmbusd.sock"
    r = vmbusd("serve", "--listen", str(sock), "--config", str(cfg))
    line = one_line_error(r)
    assert "listening on" not in r.stderr
    assert not sock.exists()
    return line


def test_config_file_missing(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, None)
    assert "vm.toml does not exist" in line


def test_config_invalid_toml_names_line_and_column(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "echo\n')
    assert "vm.toml:2:" in line and "invalid TOML" in line and "line 2, column" in line


def test_config_unknown_device_type_lists_the_valid_ones(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "ecko"\n')
    assert "unknown device type 'ecko'" in line
    assert "valid: echo" in line and "module:Class" in line


def test_config_unknown_key_is_refused_not_ignored(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[devices]]\ntype = "echo"\n')
    assert "unknown key 'devices'" in line and "did you mean 'device'" in line


def test_config_device_as_a_table_not_an_array(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[device]\ntype = "echo"\n')
    assert "[[device]]" in line


def test_config_option_the_device_does_not_take(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "echo"\nring_size = 4096\n')
    assert "device #1 (echo): unknown option 'ring_size'" in line
    assert "did you mean 'ring_size_hint'" in line
    assert "takes: type, instance, ring_size_hint" in line


def test_config_option_of_the_wrong_type(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "echo"\nring_size_hint = "big"\n')
    assert "option 'ring_size_hint' must be an integer, not 'big'" in line


def test_config_device_that_refuses_its_options(tmp_path: Path) -> None:
    (tmp_path / "picky.py").write_text(
        "import uuid\n\nfrom vmbus.device import Device\n\n\n"
        "class Picky(Device):\n"
        "    if_type = uuid.uuid4()\n\n"
        "    def __init__(self, level: int = 1) -> None:\n"
        "        super().__init__()\n"
        "        if level > 3:\n"
        "            raise ValueError(f'level {level} is above 3')\n"
    )
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[[device]]\ntype = "picky:Picky"\nlevel = 9\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = vmbusd("serve", "--listen", str(tmp_path / "s.sock"), "--config", str(cfg), env=env)
    one_line_error(r, "device #1 (picky:Picky): ValueError: level 9 is above 3")


def test_config_bad_instance_guid(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "echo"\ninstance = "nope"\n')
    assert "instance 'nope' is not a GUID" in line


def test_config_device_class_without_if_type(tmp_path: Path) -> None:
    (tmp_path / "noiftype.py").write_text(
        "from vmbus.device import Device\n\n\nclass Faceless(Device):\n    name = 'faceless'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[[device]]\ntype = "noiftype:Faceless"\n')
    r = vmbusd("serve", "--listen", str(tmp_path / "s.sock"), "--config", str(cfg), env=env)
    one_line_error(r, "noiftype.Faceless", "has no if_type")


def test_config_module_class_that_is_not_a_device(tmp_path: Path) -> None:
    line = serve_with_config(tmp_path, '[[device]]\ntype = "os:getcwd"\n')
    assert "not a vmbus.device.Device subclass" in line


def test_config_is_checked_by_attach_too(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[[devices]]\ntype = "echo"\n')
    r = vmbusd("attach", str(tmp_path / "vm.sock"), "--config", str(cfg))
    one_line_error(r, "unknown key 'devices'")


# -- plug-ins --------------------------------------------------------------------------


def fake_plugin_package(root: Path) -> dict[str, str]:
    """An installed distribution that registers a device, as `pip install` leaves one:
    a module and a .dist-info with entry_points.txt, on PYTHONPATH."""
    (root / "upperdev.py").write_text(
        "import uuid\n\nfrom devices.echo import EchoDevice\n\n\n"
        "class Upper(EchoDevice):\n"
        "    if_type = uuid.UUID('6d3f1c0a-0000-4000-8000-000000000001')\n"
        "    name = 'upper'\n"
    )
    info = root / "upperdev-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: upperdev\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vmbusd.devices]\nupper = upperdev:Upper\n")
    return dict(os.environ, PYTHONPATH=str(root))


def test_plugins_lists_every_group(tmp_path: Path) -> None:
    r = vmbusd("plugins")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["vmbusd.devices", "echo", "devices.echo:EchoDevice", "vmbusd"] in rows
    assert [
        "vmbusd.disk_backends",
        "memory",
        "devices.storvsc.backends.memory:MemoryBackend",
        "vmbusd",
    ] in rows
    assert [
        "vmbusd.net_backends",
        "tap",
        "devices.netvsc.backends.tap:TapBackend",
        "vmbusd",
    ] in rows
    assert "nothing installed in" not in r.stdout

    env = fake_plugin_package(tmp_path)
    r = vmbusd("plugins", env=env)
    assert ["vmbusd.devices", "upper", "upperdev:Upper", "upperdev"] in [
        line.split() for line in r.stdout.splitlines()
    ]


def test_entry_point_device_is_served_and_listed_as_valid(tmp_path: Path) -> None:
    env = fake_plugin_package(tmp_path)
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[device]]\ntype = "uper"\n')
    r = vmbusd("serve", "--listen", str(tmp_path / "s.sock"), "--config", str(cfg), env=env)
    one_line_error(r, "unknown device type 'uper'", "valid: echo, netvsc, storvsc, upper")

    cfg.write_text('[[device]]\ntype = "upper"\n[[device]]\ntype = "echo"\n')
    stats = tmp_path / "stats.sock"
    args = ["serve", "--listen", str(tmp_path / "s.sock"), "--config", str(cfg)]
    with running([*args, "--stats", str(stats)], tmp_path / "serve.log", env) as srv:
        srv.wait_for("listening on")
        with running(
            ["vm", "--connect", str(tmp_path / "s.sock"), "--workload", "idle"],
            tmp_path / "vm.log",
        ) as vm:
            vm.wait_for("idle until")
            snap = json.loads(vmbusd("stats", str(stats), "--json").stdout)
            (vmsnap,) = snap["vms"]
            assert sorted(ch["device"] for ch in vmsnap["channels"]) == ["echo", "upper"]
            assert vm.stop() == 0
        assert srv.stop() == 0


# -- serve ---------------------------------------------------------------------------


def test_serve_socket_directory_missing(tmp_path: Path) -> None:
    r = vmbusd("serve", "--listen", str(tmp_path / "nodir" / "s.sock"))
    one_line_error(r, f"directory {tmp_path / 'nodir'} does not exist")


def test_serve_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    stale_socket(sock)
    with running(["serve", "--listen", str(sock)], tmp_path / "first.log") as first:
        first.wait_for("listening on")  # the stale file was replaced
        r = vmbusd("serve", "--listen", str(sock))
        one_line_error(r, str(sock), "another process is listening")
        assert "listening on" not in r.stderr
        # the first service still owns its socket and answers
        assert sock.is_socket()
        r = vmbusd("vm", "--connect", str(sock), "--packets", "200")
        assert r.returncode == 0, r.stderr
        assert first.stop() == 0
    assert not sock.exists()


def test_serve_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    r = vmbusd("serve", "--listen", str(path))
    one_line_error(r, "exists and is not a socket")
    assert path.read_text() == "mine"


def test_serve_metrics_not_a_port(tmp_path: Path) -> None:
    r = vmbusd("serve", "--listen", str(tmp_path / "s.sock"), "--metrics", "abc")
    one_line_error(r, "--metrics 'abc'", "[HOST:]PORT")
    assert not (tmp_path / "s.sock").exists()


def test_serve_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sock, stats = tmp_path / "s.sock", tmp_path / "stats.sock"
        r = vmbusd(
            "serve",
            "--listen",
            str(sock),
            "--stats",
            str(stats),
            "--metrics",
            f"127.0.0.1:{port}",
        )
    one_line_error(r, f"cannot serve metrics on 127.0.0.1:{port}", "choose another port")
    assert "listening on" not in r.stderr
    assert not sock.exists() and not stats.exists()


def test_serve_stats_directory_missing(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    r = vmbusd("serve", "--listen", str(sock), "--stats", str(tmp_path / "no" / "stats.sock"))
    one_line_error(r, "cannot create stats socket", f"directory {tmp_path / 'no'} does not exist")
    assert "listening on" not in r.stderr
    assert not sock.exists()  # bound first, removed on the way out


def test_serve_stats_socket_of_a_live_service_is_not_stolen(tmp_path: Path) -> None:
    stats = tmp_path / "stats.sock"
    args = ["serve", "--listen", str(tmp_path / "a.sock"), "--stats", str(stats)]
    with running(args, tmp_path / "a.log") as first:
        first.wait_for("listening on")
        r = vmbusd("serve", "--listen", str(tmp_path / "b.sock"), "--stats", str(stats))
        one_line_error(r, str(stats), "another process is listening")
        assert not (tmp_path / "b.sock").exists()
        assert vmbusd("stats", str(stats)).returncode == 0
        assert first.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    sock, stats = tmp_path / "s.sock", tmp_path / "stats.sock"
    args = ["serve", "--listen", str(sock), "--stats", str(stats), "--metrics", "0"]
    with running(args, tmp_path / "serve.log") as srv:
        text = srv.wait_for("listening on")
        assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", text)
        with running(
            ["vm", "--connect", str(sock), "--workload", "idle"], tmp_path / "vm.log"
        ) as vm:
            vm.wait_for("idle until")
            assert srv.stop(signum) == 0
            lines = srv.text().splitlines()
            name = signal.Signals(signum).name
            assert lines[-1] == (
                f"vmbusd serve: {name}: stopped; 1 VM(s) were attached and told 'shutdown'"
            ), lines
            assert len(lines) == 2 and "Traceback" not in srv.text()
            vm.proc.wait(timeout=20)  # the VM was told; it leaves on its own
    assert not sock.exists() and not stats.exists()


# -- attach --------------------------------------------------------------------------


def test_attach_nobody_listens(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    one_line_error(vmbusd("attach", str(path)), f"nobody listens on {path}")
    stale_socket(path)
    one_line_error(vmbusd("attach", str(path)), f"nobody listens on {path}", "stale")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a socket")
    one_line_error(vmbusd("attach", str(notes)), f"cannot connect to {notes}: not a socket")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_attach_and_vm_stop_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    path = tmp_path / "vm.sock"
    name = signal.Signals(signum).name
    with running(["vm", "--listen", str(path), "--workload", "idle"], tmp_path / "vm.log") as vm:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not path.exists():
            assert time.monotonic() < deadline, vm.text()
            time.sleep(0.02)
        with running(["attach", str(path)], tmp_path / "attach.log") as att:
            vm.wait_for("idle until")
            assert not path.exists()  # the VMM's listening socket went with the accept
            assert att.stop(signum) == 0
            (line,) = att.text().splitlines()
            assert line.startswith(f"vmbusd attach: {name}: detached from VM sim")
        # vmbusd told the VM 'shutdown': an idle VM then ends on its own
        assert vm.proc.wait(timeout=10) == 0
        assert vm.text().splitlines()[-1] == (
            "vmbusd vm: vmbusd ended the session (shutdown: vmbusd is detaching from this VM)"
        )
        assert "Traceback" not in vm.text()


# -- vm ------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    sock, stats = tmp_path / "s.sock", tmp_path / "stats.sock"
    with running(
        ["serve", "--listen", str(sock), "--stats", str(stats)], tmp_path / "serve.log"
    ) as srv:
        srv.wait_for("listening on")
        yield sock, stats
        assert srv.stop() == 0


def test_vm_prints_one_line_summary(service: tuple[Path, Path]) -> None:
    sock, _ = service
    r = vmbusd("vm", "--connect", str(sock), "--packets", "300")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("vmbusd vm: VMBus 5.3, 1 offer(s); echo relid ")
    assert "300 packets" in line and line.endswith("all verified")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_vm_idle_opens_channels_and_stops_on_signal(
    service: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    sock, stats = service
    with running(["vm", "--connect", str(sock), "--workload", "idle"], tmp_path / "vm.log") as vm:
        vm.wait_for("1 channel(s) open; idle until SIGTERM or Ctrl-C")
        snap = json.loads(vmbusd("stats", str(stats), "--json").stdout)
        (vmsnap,) = snap["vms"]
        assert [ch["device"] for ch in vmsnap["channels"]] == ["echo"]
        assert vm.stop(signum) == 0
        lines = vm.text().splitlines()
        name = signal.Signals(signum).name
        assert lines[-1] == f"vmbusd vm: {name}: closed 1 channel(s), unloaded VMBus, detached"
        assert len(lines) == 2
    deadline = time.monotonic() + 10
    while json.loads(vmbusd("stats", str(stats), "--json").stdout)["vms"]:
        assert time.monotonic() < deadline, "the VM's session did not end"
        time.sleep(0.1)


def test_vm_echo_interrupted_says_so(service: tuple[Path, Path], tmp_path: Path) -> None:
    sock, _ = service
    args = ["vm", "--connect", str(sock), "--packets", "3000000"]
    with running(args, tmp_path / "vm.log") as vm:
        time.sleep(3.0)  # negotiated and pushing traffic by now (3 M packets take 20 s)
        assert vm.stop(signal.SIGINT) == 128 + signal.SIGINT
        (line,) = vm.text().splitlines()
        assert line == "vmbusd vm: SIGINT: stopped before the workload ended; detached"


def test_vm_json_unwritable_is_refused_before_the_run(tmp_path: Path) -> None:
    r = vmbusd("vm", "--connect", str(tmp_path / "none.sock"), "--json", str(tmp_path / "no" / "x"))
    one_line_error(r, "cannot write --json", "does not exist")


def test_vm_connect_nobody_listens(tmp_path: Path) -> None:
    one_line_error(vmbusd("vm", "--connect", str(tmp_path / "none.sock")), "nobody listens on")


# -- demo and bench ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_stops_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    with running(["demo", "--packets", "3000000"], tmp_path / "demo.log", env) as demo:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not processes_mentioning(str(tmp)):  # the VM child, its socket in TMPDIR
            assert time.monotonic() < deadline, demo.text()
            time.sleep(0.05)
        time.sleep(2.0)
        assert demo.stop(signum) == 128 + signum
        name = signal.Signals(signum).name
        (line,) = demo.text().splitlines()
        assert line == f"vmbusd demo: {name}: stopped before the end; nothing verified"
    assert processes_mentioning(str(tmp)) == []  # the VM child is gone too
    assert list(tmp.iterdir()) == []  # and the socket's directory


def test_bench_refuses_bad_options_before_running(tmp_path: Path) -> None:
    for seconds in ("0", "-1", "nan"):
        one_line_error(vmbusd("bench", "ring", "--seconds", seconds), "--seconds", "more than 0")
    t0 = time.monotonic()
    one_line_error(
        vmbusd("bench", "ring", "--json", str(tmp_path / "nodir" / "r.json")),
        "cannot write --json",
        "does not exist",
    )
    one_line_error(vmbusd("bench", "ring", "--json", str(tmp_path)), "is a directory")
    # a directory no file can be created in, even by root: /proc
    one_line_error(
        vmbusd("bench", "ring", "--json", "/proc/vmbusd-bench.json"),
        "cannot write --json /proc/vmbusd-bench.json",
    )
    one_line_error(
        vmbusd("bench", "ring", "--plot", "/proc/vmbusd-bench.png"), "cannot write --plot"
    )
    assert time.monotonic() - t0 < 20  # refused up front, not after a run of minutes


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_bench_plain_progress_and_clean_stop(tmp_path: Path, signum: int) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    out = tmp_path / "r.json"
    args = ["bench", "ring", "--seconds", "0.5", "--json", str(out)]
    with running(args, tmp_path / "bench.log", env) as bench:
        bench.wait_for("bench: [8/24] socketpair 256 B", timeout=60)  # the children run
        assert processes_mentioning(str(tmp))
        assert bench.stop(signum) == 128 + signum
        lines = bench.text().splitlines()
        name = signal.Signals(signum).name
        assert re.fullmatch(
            rf"vmbusd bench: {name}: stopped at point \d+ of 24; children stopped, "
            "nothing written",
            lines[-1],
        ), lines
        assert all(line.startswith("bench: [") for line in lines[:-1]), lines
    assert not out.exists()
    assert processes_mentioning(str(tmp)) == []
    assert list(tmp.iterdir()) == []


def test_bench_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [VMBUSD, "bench", "ring", "--seconds", "0.5"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=dict(os.environ, TERM="xterm", COLUMNS="100"),
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"\xe2\x94\x81" not in seen and time.monotonic() < deadline:  # the bar
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                seen += os.read(master, 65536)
        assert b"\xe2\x94\x81" in seen and b"/24" in seen, seen[-2000:]
        assert b"bench: [" not in seen  # not the plain lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            while os.read(master, 65536):
                pass
        os.close(master)


# -- the command line itself ---------------------------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    r = vmbusd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vmbusd {version('vmbusd')}"


def test_help_shows_every_default() -> None:
    from vmbus.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, subparser in sub.choices.items():
        text = vmbusd(name, "--help").stdout
        for action in subparser._actions:
            if not action.option_strings or action.required or "-h" in action.option_strings:
                continue
            if any(
                action in g._group_actions and g.required
                for g in subparser._mutually_exclusive_groups
            ):
                continue  # one of these is required: no default to show
            flag = action.option_strings[-1]
            block = re.search(rf"^  (?:-\w, )?{re.escape(flag)}\b.*?(?=^  -|\Z)", text, re.M | re.S)
            assert block, (name, flag, text)
            assert "default" in block.group(0), (name, flag, block.group(0))


def test_usage_mistake_is_one_line() -> None:
    one_line_error(vmbusd("serve"), "--listen", "see vmbusd serve --help")
    one_line_error(vmbusd("nosuch"), "invalid choice")
    # the echo workload plans its packets up front: a huge count is refused at once
    one_line_error(vmbusd("vm", "--connect", "/x", "--packets", "1e12"), "whole number")
    one_line_error(vmbusd("demo", "--packets", str(10**11)), "at most 10,000,000")


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["plugins"], "WARNING"),
        (["-v", "plugins"], "INFO"),
        (["plugins", "-v"], "INFO"),
        (["-vv", "plugins"], "DEBUG"),
        (["-q", "plugins"], "ERROR"),
    ],
)
def test_verbosity_levels(argv: list[str], level: str) -> None:
    code = (
        "import logging, sys\n"
        "from vmbus.cli import main\n"
        f"main({argv!r})\n"
        "print(logging.getLevelName(logging.getLogger().level), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == level


def test_verbose_and_quiet_change_what_serve_says(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    outputs = {}
    for flag in ("-q", None, "-v"):
        args = ["serve", "--listen", str(sock)] + ([flag] if flag else [])
        log = tmp_path / f"serve{flag}.log"
        with running(args, log) as srv:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not sock.exists():
                assert time.monotonic() < deadline, srv.text()
                time.sleep(0.02)
            assert vmbusd("vm", "--connect", str(sock), "--packets", "50").returncode == 0
            assert srv.stop() == 0
            outputs[flag] = srv.text()
    assert outputs["-q"] == ""
    assert "listening on" in outputs[None] and " INFO " not in outputs[None]
    assert "listening on" in outputs["-v"] and " INFO vmbus.server" in outputs["-v"]
