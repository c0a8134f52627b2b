"""`vmbusd vm --export-nbd DIR`: real tools on the guest's view of its disks.

`vmbusd serve` (a memory LUN and a file LUN) and `vmbusd vm --export-nbd` run as
real processes; qemu-img, qemu-io, fio's nbd engine and nbdfuse + mkfs.ext4 +
e2fsck use the sockets, so every byte goes tool -> NBD -> guest storvsc VSC ->
VMBus ring -> storvsc VSP -> backend and back; the file LUN's image is then read
directly to see that the bytes landed. The sans-IO server core gets the hostile
client's bytes first."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool

from devices.storvsc.backends.nbd_protocol import (
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_TRIM,
    NBD_INFO_BLOCK_SIZE,
    NBD_MAGIC,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
)
from devices.storvsc.nbd_export import (
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    Disconnect,
    ExportSpec,
    NbdClientError,
    NbdServerConnection,
    Request,
)

TOOL_TIMEOUT_S = 120.0
START_TIMEOUT_S = 30.0
MEM_SIZE = 32 << 20
FILE_SIZE = 64 << 20

# --- the sans-IO core -------------------------------------------------------------------

SPEC = ExportSpec("storvsc0-lun0", 1 << 20, 512, read_only=False, can_trim=True)


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", NBD_OPTS_MAGIC, opt, len(data)) + data


def _go(name: bytes = b"", infos: tuple[int, ...] = (NBD_INFO_BLOCK_SIZE,)) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return _opt(NBD_OPT_GO, body + b"".join(struct.pack(">H", i) for i in infos))


def _req(cmd: int, offset: int, length: int, *, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length)


def _option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        _magic, opt, rtype, n = struct.unpack_from(">QIII", data, pos)
        out.append((opt, rtype, data[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


def _negotiated(spec: ExportSpec = SPEC) -> NbdServerConnection:
    c = NbdServerConnection(spec)
    greeting = c.data_to_send()
    assert struct.unpack(">QQH", greeting)[:2] == (NBD_MAGIC, NBD_OPTS_MAGIC)
    c.receive_data(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
    c.receive_data(_go())
    assert c.next_event() is None and c.transmitting
    replies = _option_replies(c.data_to_send())
    assert [r[1] for r in replies] == [NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]
    bs = spec.block_size
    assert struct.unpack(">HIII", replies[1][2]) == (NBD_INFO_BLOCK_SIZE, bs, 4096, MAX_PAYLOAD)
    return c


def test_handshake_options() -> None:
    """GO/INFO with block sizes, unknown exports and structured replies refused,
    EXPORT_NAME's old reply with its zeroes, ABORT acknowledged."""
    c = NbdServerConnection(SPEC)
    c.data_to_send()
    c.receive_data(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE))
    c.receive_data(_opt(NBD_OPT_STRUCTURED_REPLY) + _go(b"other") + _go(b"storvsc0-lun0"))
    assert c.next_event() is None and c.transmitting
    replies = _option_replies(c.data_to_send())
    assert [r[1] for r in replies][:2] == [NBD_REP_ERR_UNSUP, NBD_REP_ERR_UNKNOWN]
    _t, size, flags = struct.unpack(">HQH", replies[2][2])
    assert size == 1 << 20 and flags & NBD_FLAG_SEND_TRIM and not flags & NBD_FLAG_READ_ONLY

    old = NbdServerConnection(SPEC)
    old.data_to_send()
    old.receive_data(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + _opt(NBD_OPT_EXPORT_NAME))
    assert old.next_event() is None and old.transmitting
    assert len(old.data_to_send()) == 10 + 124  # size, flags, zeroes (no NO_ZEROES)

    ab = NbdServerConnection(SPEC)
    ab.data_to_send()
    ab.receive_data(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + _opt(NBD_OPT_ABORT))
    assert isinstance(ab.next_event(), Disconnect)
    assert _option_replies(ab.data_to_send())[0][1] == NBD_REP_ACK


def test_requests_validated() -> None:
    """Every field checked; answerable mistakes get their error reply, valid requests
    come out whole (a write's payload split across receives), several in a row."""
    c = _negotiated()
    bad = [
        (_req(NBD_CMD_READ, 0, 512, flags=0x80), NBD_EINVAL),  # unknown flag
        (_req(NBD_CMD_READ, 100, 512), NBD_EINVAL),  # unaligned
        (_req(NBD_CMD_READ, 0, 0), NBD_EINVAL),  # empty
        (_req(NBD_CMD_READ, 1 << 20, 512), NBD_EINVAL),  # past the end
        (_req(NBD_CMD_READ, 2**64 - 512, 1024), NBD_EINVAL),  # wraps
        (_req(NBD_CMD_READ, 0, MAX_PAYLOAD + 512), NBD_EINVAL),
        (_req(NBD_CMD_READ, 0, 512, flags=1), NBD_EINVAL),  # FUA on a read
        (_req(NBD_CMD_WRITE, 1 << 20, 512) + bytes(512), NBD_ENOSPC),
        (_req(NBD_CMD_TRIM, 0, 512, flags=2), NBD_EINVAL),  # NO_HOLE not on TRIM
        (_req(NBD_CMD_FLUSH, 0, 0, flags=1), NBD_EINVAL),
        (_req(99, 0, 512), NBD_EINVAL),  # unknown command
    ]
    for i, (raw, err) in enumerate(bad):
        c.receive_data(raw[:20])
        assert c.next_event() is None
        c.receive_data(raw[20:])
        assert c.next_event() is None, i
        magic, error, handle = struct.unpack(">IIQ", c.data_to_send())
        assert (magic, error, handle) == (NBD_SIMPLE_REPLY_MAGIC, err, 7), i
    payload = random.randbytes(4096)
    c.receive_data(_req(NBD_CMD_WRITE, 4096, 4096, flags=1, handle=1) + payload[:100])
    assert c.next_event() is None
    c.receive_data(payload[100:] + _req(NBD_CMD_READ, 0, 1024, handle=2))
    c.receive_data(_req(NBD_CMD_WRITE_ZEROES, 512, 512, flags=2, handle=3))
    c.receive_data(_req(NBD_CMD_FLUSH, 0, 0, handle=4) + _req(NBD_CMD_DISC, 0, 0))
    events = [c.next_event() for _ in range(5)]
    assert events[:4] == [
        Request(1, NBD_CMD_WRITE, 1, 4096, 4096, payload),
        Request(2, NBD_CMD_READ, 0, 0, 1024),
        Request(3, NBD_CMD_WRITE_ZEROES, 2, 512, 512),
        Request(4, NBD_CMD_FLUSH, 0, 0, 0),
    ]
    assert isinstance(events[4], Disconnect)
    assert c.reply(2, 0, b"ab") == struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, 2) + b"ab"


def test_read_only_export() -> None:
    c = _negotiated(ExportSpec("ro", 1 << 20, 4096, read_only=True, can_trim=False))
    for raw in (_req(NBD_CMD_WRITE, 0, 4096) + bytes(4096), _req(NBD_CMD_WRITE_ZEROES, 0, 4096)):
        c.receive_data(raw)
        assert c.next_event() is None
        assert struct.unpack(">IIQ", c.data_to_send())[1] == NBD_EPERM
    c.receive_data(_req(NBD_CMD_READ, 0, 4096, handle=9))
    assert c.next_event() == Request(9, NBD_CMD_READ, 0, 0, 4096)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", 0),  # not fixed newstyle
        struct.pack(">I", 0xFF),  # unknown client flags
        struct.pack(">I", 1) + struct.pack(">QII", 0x1234, NBD_OPT_GO, 0),  # option magic
        struct.pack(">I", 1) + struct.pack(">QII", NBD_OPTS_MAGIC, 1, MAX_OPTION_LENGTH + 1),
        struct.pack(">I", 1) + _opt(NBD_OPT_EXPORT_NAME, b"nope"),
        struct.pack(">I", 1) + _opt(0xDEAD) * 300,  # options forever
        struct.pack(">I", 1) + _go() + _req(NBD_CMD_READ, 0, 512)[:-1] + b"\0" + b"X" * 28,
        struct.pack(">I", 1) + _go() + _req(NBD_CMD_WRITE, 0, MAX_PAYLOAD + 1),
    ],
)
def test_hostile_client_is_dropped(raw: bytes) -> None:
    """What cannot be resynchronised raises NbdClientError (the driver drops the client)
    and nothing else, before any large allocation."""
    c = NbdServerConnection(SPEC)
    c.receive_data(raw)
    with pytest.raises(NbdClientError):
        for _ in range(400):
            c.next_event()


def test_garbage_never_escapes() -> None:
    """Random bytes after a valid handshake: events, None or NbdClientError, nothing else."""
    rng = random.Random(9)
    for _ in range(300):
        c = _negotiated()
        c.receive_data(rng.randbytes(rng.randrange(1, 200)))
        with contextlib.suppress(NbdClientError):
            for _ in range(50):
                if c.next_event() is None:
                    break


# --- vmbusd serve + vmbusd vm --export-nbd as processes --------------------------------


@dataclass
class Exported:
    dir: Path
    image: Path
    serve: subprocess.Popen[bytes]
    vm: subprocess.Popen[bytes]
    vm_log: Path
    serve_log: Path

    def uri(self, lun: int) -> str:
        return f"nbd+unix:///?socket={self.dir}/storvsc0-lun{lun}.sock"

    def sock(self, lun: int) -> Path:
        return self.dir / f"storvsc0-lun{lun}.sock"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the VM (then vmbusd); the VM's exit status. Sockets must be gone."""
        if self.vm.poll() is None:
            self.vm.send_signal(sig)
        try:
            rc = self.vm.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.vm.kill()
            self.vm.wait()
            raise AssertionError(f"vmbusd vm ignored {sig}:\n{self.vm_log.read_text()}") from None
        finally:
            if self.serve.poll() is None:
                self.serve.terminate()
                try:
                    self.serve.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.serve.kill()
                    self.serve.wait()
        return rc


def _vmbusd() -> str:
    return str(Path(sys.executable).with_name("vmbusd"))


def _wait_for(what: str, ok: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ok() if callable(ok) else ok):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


@pytest.fixture
def exported(tmp_path: Path) -> Iterator[Exported]:
    image = tmp_path / "file-lun.img"
    with open(image, "wb") as f:
        f.truncate(FILE_SIZE)
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        f"""[[device]]
type = "storvsc"

[[device.lun]]
size = "{MEM_SIZE >> 20}M"

[[device.lun]]
lun = 1
backend = "file"
path = "{image}"
"""
    )
    sock = tmp_path / "vmbusd.sock"
    export_dir = tmp_path / "exports"
    export_dir.mkdir()
    serve_log, vm_log = tmp_path / "vmbusd.log", tmp_path / "vm.log"
    with open(serve_log, "wb") as out:
        serve = subprocess.Popen(
            [_vmbusd(), "-v", "serve", "--listen", str(sock), "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    vm: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(
            "vmbusd listening", lambda: "listening on" in serve_log.read_text(), serve, serve_log
        )
        with open(vm_log, "wb") as out:
            vm = subprocess.Popen(
                [_vmbusd(), "vm", "--connect", str(sock), "--export-nbd", str(export_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _wait_for("the exports", lambda: "NBD exports in" in vm_log.read_text(), vm, vm_log)
        ex = Exported(export_dir, image, serve, vm, vm_log, serve_log)
        assert sorted(p.name for p in export_dir.iterdir()) == [
            "storvsc0-lun0.sock",
            "storvsc0-lun1.sock",
        ]
        yield ex
        assert ex.stop() == 0, vm_log.read_text()
        assert list(export_dir.iterdir()) == [], "sockets left behind"
        for log in (vm_log, serve_log):
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        for p in (vm, serve):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _run(*args: str, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_qemu_img(exported: Exported, tmp_path: Path) -> None:
    """qemu-img info sees each LUN's size; a pattern image converted into the file LUN
    and back out is identical, and so is the backend's image file afterwards."""
    qemu_img = require_tool("qemu-img", "qemu-utils")
    for lun, size in ((0, MEM_SIZE), (1, FILE_SIZE)):
        info = json.loads(_run(qemu_img, "info", "--output=json", exported.uri(lun)).stdout)
        assert info["virtual-size"] == size
    pattern = random.Random(1).randbytes(FILE_SIZE)
    src, back = tmp_path / "pattern.raw", tmp_path / "back.raw"
    for lun in (0, 1):
        n = MEM_SIZE if lun == 0 else FILE_SIZE
        src.write_bytes(pattern[:n])
        _run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), exported.uri(lun))
        _run(qemu_img, "convert", "-f", "raw", "-O", "raw", exported.uri(lun), str(back))
        assert back.read_bytes() == pattern[:n], f"LUN {lun}"
        back.unlink()
    assert exported.stop() == 0
    assert exported.image.read_bytes() == pattern  # the bytes reached the file backend


def test_qemu_io(exported: Exported) -> None:
    """qemu-io write -P / read -P at several offsets and lengths (unaligned ones too:
    qemu honours the advertised minimum block size), flushes, on both LUNs; then the
    file backend holds the patterns."""
    qemu_io = require_tool("qemu-io", "qemu-utils")
    spots = [
        (0, 512),
        (4096, 65536),
        (1 << 20, 300_000),
        (200 * 512 + 100, 1000),
        (FILE_SIZE - 4096, 4096),
    ]
    for lun in (0, 1):
        size = MEM_SIZE if lun == 0 else FILE_SIZE
        cmds: list[str] = []
        for i, (off, n) in enumerate(spots):
            off = min(off, size - n)
            fua = "-f " if i % 2 else ""  # NBD_CMD_FLAG_FUA: WRITE(16) with FUA
            cmds += ["-c", f"write {fua}-P {0x11 * (i + 1)} {off} {n}", "-c", "flush"]
        for i, (off, n) in enumerate(spots):
            off = min(off, size - n)
            cmds += ["-c", f"read -P {0x11 * (i + 1)} {off} {n}"]
        r = _run(qemu_io, "-f", "raw", *cmds, exported.uri(lun))
        assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
        assert r.stdout.count("read ") == len(spots), r.stdout
    assert exported.stop() == 0
    data = exported.image.read_bytes()
    for i, (off, n) in enumerate(spots):
        assert data[off : off + n] == bytes([0x11 * (i + 1)]) * n, (off, n)


def test_fio_nbd_engine(exported: Exported) -> None:
    """fio's nbd engine, random read/write at queue depth 32 with crc32c verify: many
    requests in flight on one connection, completed out of order."""
    fio = require_tool("fio", "fio")
    for lun in (0, 1):
        r = _run(
            fio,
            "--name=nbd-verify",
            "--ioengine=nbd",
            f"--uri={exported.uri(lun)}",
            "--rw=randrw",
            "--bs=4k",
            "--size=16M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",  # no state file in the working directory
            "--time_based=0",
            "--output-format=json",
        )
        job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_nbdfuse_mkfs_e2fsck(exported: Exported, tmp_path: Path) -> None:
    """nbdfuse turns the file LUN's export into a file; mkfs.ext4 and e2fsck -fn on it;
    then vmbusd's image file itself is a clean ext4 with the same UUID."""
    nbdfuse = require_tool("nbdfuse", "libnbd-bin")
    fusermount = require_tool("fusermount3", "fuse3")
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    dumpe2fs = require_tool("dumpe2fs", "e2fsprogs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = mnt / "disk"
    fuse = subprocess.Popen(
        [nbdfuse, str(disk), "--unix", str(exported.sock(1))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (os.path.ismount(mnt) and disk.exists()):
            assert fuse.poll() is None and time.monotonic() < deadline, fuse.communicate()[0]
            time.sleep(0.05)
        assert disk.stat().st_size == FILE_SIZE
        _run(mkfs, "-q", "-F", "-U", "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d", str(disk))
        check = _run(e2fsck, "-fn", str(disk))
        assert "clean" in check.stdout or "0.0% non-contiguous" in check.stdout, check.stdout
    finally:
        subprocess.run([fusermount, "-u", str(mnt)], capture_output=True, timeout=30)
        try:
            fuse.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
    assert exported.stop() == 0
    _run(e2fsck, "-fn", str(exported.image))
    head = _run(dumpe2fs, "-h", str(exported.image)).stdout
    assert "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d" in head and "clean" in head


def _client_go(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(sock))
    _recv_exact(s, 18)
    s.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) + _go())
    for _ in range(3):
        head = _recv_exact(s, 20)
        _recv_exact(s, struct.unpack(">QIII", head)[3])
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return buf


def test_hostile_clients_and_pipelining(exported: Exported) -> None:
    """Garbage, a bad request magic, a huge write and a client that vanishes mid-write
    are dropped; the VM carries on. A well-behaved raw client pipelines 64 requests
    (more than MAX_IN_FLIGHT) and gets every reply with the right data."""
    sock = exported.sock(0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # not NBD at all
        s.settimeout(20)
        s.connect(str(sock))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        with contextlib.suppress(OSError):
            while s.recv(4096):
                pass
    for raw in (b"X" * 28, _req(NBD_CMD_WRITE, 0, 1 << 31)):
        s = _client_go(sock)
        s.sendall(raw)
        assert s.recv(4096) == b""  # dropped
        s.close()
    s = _client_go(sock)
    s.sendall(_req(NBD_CMD_WRITE, 0, 1 << 20) + bytes(1000))  # and gone
    s.close()

    s = _client_go(sock)
    blocks = {h: random.randbytes(4096) for h in range(64)}
    s.sendall(
        b"".join(_req(NBD_CMD_WRITE, h * 8192, 4096, handle=h) + d for h, d in blocks.items())
    )
    acks = {struct.unpack(">IIQ", _recv_exact(s, 16))[1:] for _ in blocks}
    assert acks == {(0, h) for h in blocks}
    s.sendall(b"".join(_req(NBD_CMD_READ, h * 8192, 4096, handle=h) for h in blocks))
    for _ in blocks:
        magic, err, h = struct.unpack(">IIQ", _recv_exact(s, 16))
        assert (magic, err) == (NBD_SIMPLE_REPLY_MAGIC, 0)
        assert _recv_exact(s, 4096) == blocks[h]
    s.sendall(_req(NBD_CMD_READ, MEM_SIZE, 512, handle=99) + _req(NBD_CMD_DISC, 0, 0))
    assert struct.unpack(">IIQ", _recv_exact(s, 16))[1:] == (NBD_EINVAL, 99)
    assert s.recv(16) == b""
    s.close()
    assert exported.vm.poll() is None


def test_trim_and_write_zeroes(exported: Exported) -> None:
    """TRIM (UNMAP) and WRITE_ZEROES (WRITE SAME) through qemu-io on both LUNs; the
    range reads zeros, through NBD and in the file backend's image."""
    qemu_io = require_tool("qemu-io", "qemu-utils")
    for lun in (0, 1):
        r = _run(
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "discard 0 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 0 128k",
            "-c",
            "read -P 0x77 128k 896k",
            exported.uri(lun),
        )
        assert "Pattern verification failed" not in r.stdout + r.stderr, r.stdout
    assert exported.stop() == 0
    data = exported.image.read_bytes()
    assert data[: 128 << 10] == bytes(128 << 10) and data[128 << 10 : 1 << 20] == b"\x77" * (
        896 << 10
    )


def test_sigint_removes_sockets(exported: Exported) -> None:
    assert exported.stop(signal.SIGINT) == 0
    assert list(exported.dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_export_dir(tmp_path: Path, kind: str) -> None:
    """A DIR that is not a directory: one line, exit status 2, before connecting."""
    target = tmp_path / "nope"
    if kind == "file":
        target.write_text("x")
    r = subprocess.run(
        [_vmbusd(), "vm", "--connect", str(tmp_path / "none.sock"), "--export-nbd", str(target)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--export-nbd" in r.stderr and "Traceback" not in r.stderr
