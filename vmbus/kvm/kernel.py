"""`vmbusd guest-kernel`: build the real Linux guest's kernel from Debian's source.

The KVM tier (issue 8) boots a small x86-64 kernel whose unmodified hv_vmbus,
hv_storvsc and hv_netvsc drivers talk to vmbusd. The source is Debian's
`linux-source-6.1` package at a pinned version, checked by its SHA256; only the
config (the fragment `guest-kernel.config` next to this module, applied on top of
`make tinyconfig`) is ours. The result (vmlinux, its .config and System.map) is
cached under `$XDG_CACHE_HOME/vmbusd/guest-kernel/<version>-<config hash>/`, so a
second run is instant; the extracted source and the object tree are kept too, so a
config change rebuilds only what it touches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path

from vmbus.cliutil import UserError

PACKAGE = "linux-source-6.1"
# What `apt-cache policy linux-source-6.1` offered on 2026-12-05 (bookworm-security),
# with the SHA256 from `apt-cache show`. A newer Debian revision changes the kernel we
# test against, so moving this pin is a deliberate commit, not something a run does.
PINNED_VERSION = "6.1.192-3"
PINNED_SHA256 = "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67"
TARBALL = f"./usr/src/{PACKAGE}.tar.xz"  # the only member of the .deb we need
FRAGMENT_NAME = "guest-kernel.config"
# Bumped when the way the fragment becomes a kernel changes, so old cache entries
# (built the old way) are not reused.
RECIPE = "tinyconfig + fragment + olddefconfig; ARCH=x86_64; make vmlinux; v1"
ARTEFACTS = ("vmlinux", ".config", "System.map")
# executable -> the Debian package that provides it (apt-get install names)
TOOLS = {
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "make": "build-essential",
    "gcc": "build-essential",
    "ld": "build-essential",
    "perl": "perl",
    "xz": "xz-utils",
    "tar": "tar",
    "dpkg-deb": "dpkg",
}
LIBELF_HEADER = Path("/usr/include/gelf.h")  # objtool needs it (libelf-dev)

Say = Callable[[str], None]


class KernelBuildError(Exception):
    """The kernel build itself failed (not the user's mistake); names the log to read."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


# -- the config fragment ---------------------------------------------------------------

_SET = re.compile(r"CONFIG_([A-Za-z0-9_]+)=(.*)")
_UNSET = re.compile(r"# CONFIG_([A-Za-z0-9_]+) is not set")


def fragment_text() -> str:
    """The fragment shipped with the package (package data, so an install has it)."""
    return resources.files("vmbus.kvm").joinpath(FRAGMENT_NAME).read_text()


def parse_fragment(text: str) -> dict[str, str]:
    """Option name (without CONFIG_) -> wanted value; "n" for `# CONFIG_X is not set`.

    Other comments and blank lines are ignored; any other line is a mistake in the
    fragment and is refused with its line number (a typo must not go unnoticed)."""
    wanted: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        unset = _UNSET.fullmatch(line)
        if unset:
            wanted[unset.group(1)] = "n"
            continue
        if not line or line.startswith("#"):
            continue
        m = _SET.fullmatch(line)
        if m is None:
            raise ValueError(f"config fragment line {number}: not CONFIG_X=value: {raw!r}")
        wanted[m.group(1)] = m.group(2)
    return wanted


def parse_config(text: str) -> dict[str, str]:
    """A kernel .config as name -> value; options not set are "n" (absent: not listed)."""
    return parse_fragment("\n".join(ln for ln in text.splitlines() if _is_option(ln)))


def _is_option(line: str) -> bool:
    line = line.strip()
    return bool(_SET.fullmatch(line) or _UNSET.fullmatch(line))


def _render(name: str, value: str) -> str:
    return f"# CONFIG_{name} is not set" if value == "n" else f"CONFIG_{name}={value}"


def apply_fragment(config: str, wanted: Mapping[str, str]) -> str:
    """`config` with every wanted option set as the fragment says (in place where the
    option already has a line, appended otherwise), ready for `make olddefconfig`."""
    out: list[str] = []
    seen: set[str] = set()
    for line in config.splitlines():
        m = _SET.fullmatch(line.strip()) or _UNSET.fullmatch(line.strip())
        if m is not None and m.group(1) in wanted:
            name = m.group(1)
            seen.add(name)
            out.append(_render(name, wanted[name]))
        else:
            out.append(line)
    out += [_render(n, v) for n, v in wanted.items() if n not in seen]
    return "\n".join(out) + "\n"


@dataclasses.dataclass(frozen=True)
class Dropped:
    """An option the fragment asked for that the final .config does not have."""

    name: str
    wanted: str
    got: str  # "n" when it is not set or not there at all

    def __str__(self) -> str:
        def word(value: str) -> str:
            return "not set" if value == "n" else value

        return f"CONFIG_{self.name} (wanted {word(self.wanted)}, got {word(self.got)})"


def dropped_options(config: str, wanted: Mapping[str, str]) -> list[Dropped]:
    """Every wanted option whose value did not survive olddefconfig, in fragment order.

    Kconfig silently drops an option whose dependencies are not met; this is where
    that becomes loud."""
    final = parse_config(config)
    return [
        Dropped(name, value, final.get(name, "n"))
        for name, value in wanted.items()
        if final.get(name, "n") != value
    ]


# -- the cache -------------------------------------------------------------------------


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/vmbusd` (default `~/.cache/vmbusd`), per the XDG spec: a
    relative or empty XDG_CACHE_HOME is ignored."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base) / "vmbusd"


def cache_key(version: str, fragment: str) -> str:
    """`<source version>-<12 hex of the config's hash>`: a new Debian revision or any
    change to the fragment's options (or to how they are applied) is a new entry; a
    comment or a blank line is not."""
    options = "".join(f"{_render(n, v)}\n" for n, v in parse_fragment(fragment).items())
    digest = hashlib.sha256(f"{RECIPE}\n{options}".encode()).hexdigest()
    return f"{version}-{digest[:12]}"


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """A built kernel: the directory holding vmlinux, .config and System.map."""

    directory: Path
    version: str
    cached: bool  # True when this run found it built already

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def config(self) -> Path:
        return self.directory / ".config"

    @property
    def system_map(self) -> Path:
        return self.directory / "System.map"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _complete(directory: Path, source_sha: str) -> bool:
    stamp = directory / "source.sha256"
    return (
        all((directory / name).is_file() for name in ARTEFACTS)
        and stamp.is_file()
        and stamp.read_text().strip() == source_sha
    )


@contextlib.contextmanager
def _locked(root: Path, say: Say) -> Iterator[None]:
    """One build at a time per cache (two would share the object tree)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another guest-kernel build to finish ({root / 'lock'})")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- build tools -----------------------------------------------------------------------


def missing_packages(path: str | None = None) -> list[str]:
    """Debian packages the build needs that are not installed, judged by the tools on
    PATH (`path` overrides it) and libelf's header; sorted, each once."""
    missing = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=path) is None}
    if not LIBELF_HEADER.is_file():
        missing.add("libelf-dev")
    return sorted(missing)


def ensure_tools(say: Say, *, root: bool | None = None, path: str | None = None) -> None:
    """Install what is missing when we are root (saying so); otherwise a UserError
    naming the packages to install."""
    missing = missing_packages(path)
    if not missing:
        return
    root = os.geteuid() == 0 if root is None else root
    names = " ".join(missing)
    if not root:
        raise UserError(
            f"the kernel build needs these packages, which are missing: {names} "
            f"(install them: sudo apt-get install {names})"
        )
    say(f"installing the build tools with apt-get: {names}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a stale package list is the usual reason
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    still = missing_packages(path)
    if done.returncode != 0 or still:
        why = _apt_error(done.stderr) or f"exit status {done.returncode}"
        raise UserError(f"could not install {' '.join(still or missing)} with apt-get: {why}")


def _apt_error(stderr: str) -> str:
    """apt's own error line (`E: ...`), the part a user needs."""
    lines = [ln[3:].strip() for ln in stderr.splitlines() if ln.startswith("E: ")]
    return lines[0] if lines else ""


# -- the source ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceDeb:
    path: Path
    version: str
    sha256: str
    downloaded: bool  # ours to delete once extracted


def download_pinned(directory: Path, say: Say) -> SourceDeb:
    """`apt-get download linux-source-6.1=<pinned>`, its SHA256 checked against the pin."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{PACKAGE}_{PINNED_VERSION}_all.deb"
    deb = directory / name
    if not (deb.is_file() and _sha256(deb) == PINNED_SHA256):
        say(f"downloading {PACKAGE} {PINNED_VERSION} with apt-get download (~140 MB)")
        done = subprocess.run(
            ["apt-get", "download", "-q", f"{PACKAGE}={PINNED_VERSION}"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            why = _apt_error(done.stderr) or f"apt-get exit status {done.returncode}"
            if "not found" in why or "Unable to locate" in why:
                raise UserError(
                    f"{PACKAGE} {PINNED_VERSION} (the pinned version) is not available from "
                    f"apt ({why}); `apt-get update && apt-cache policy {PACKAGE}` lists the "
                    "versions there are: download one and pass --source-deb PATH"
                )
            raise UserError(f"apt-get download {PACKAGE}={PINNED_VERSION} failed: {why}")
    got = _sha256(deb)
    if got != PINNED_SHA256:
        deb.unlink()
        raise UserError(
            f"{name} has SHA256 {got}, not the pinned {PINNED_SHA256}: refusing to build it"
        )
    return SourceDeb(deb, PINNED_VERSION, got, downloaded=True)


def local_deb(path: Path) -> SourceDeb:
    """A `--source-deb` the user supplied: it must be a linux-source-6.1 package; at the
    pinned version it must also have the pinned hash."""
    if not path.is_file():
        raise UserError(f"--source-deb {path}: no such file")
    done = subprocess.run(
        ["dpkg-deb", "--showformat=${Package} ${Version}", "--show", str(path)],
        capture_output=True,
        text=True,
    )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 2:
        why = done.stderr.strip().splitlines()[-1:] or ["not a .deb"]
        raise UserError(f"--source-deb {path}: {why[0]}")
    package, version = fields
    if package != PACKAGE:
        raise UserError(f"--source-deb {path} is {package}, not {PACKAGE}")
    sha = _sha256(path)
    if version == PINNED_VERSION and sha != PINNED_SHA256:
        raise UserError(
            f"--source-deb {path} claims the pinned version {version} but has SHA256 {sha}, "
            f"not {PINNED_SHA256}"
        )
    return SourceDeb(path, version, sha, downloaded=False)


def _run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Run with all output appended to `log`; a failure names the log."""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise KernelBuildError(f"{what} failed (exit status {rc})", log)


SOURCE_STAMP = ".vmbusd-source.sha256"  # in an extracted tree: the .deb it came from


def _stamp(tree: Path) -> str:
    try:
        return (tree / SOURCE_STAMP).read_text().strip()
    except OSError:
        return ""


def extract_source(deb: SourceDeb, src_root: Path, log: Path, say: Say) -> Path:
    """The unpacked kernel tree for this .deb, extracted once: only the source tarball
    is taken out of the package, then unpacked; the stamp records which .deb it was."""
    tree = src_root / deb.version
    if _stamp(tree) == deb.sha256:
        return tree
    say(f"extracting the {PACKAGE} {deb.version} source")
    src_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_root, prefix=".extract-") as tmp:
        work = Path(tmp)
        with log.open("a") as f:
            f.write(f"\n$ dpkg-deb --fsys-tarfile {deb.path} | tar -x {TARBALL}\n")
            f.flush()
            fsys = subprocess.Popen(
                ["dpkg-deb", "--fsys-tarfile", str(deb.path)],
                stdout=subprocess.PIPE,
                stderr=f,
            )
            assert fsys.stdout is not None
            untar = subprocess.run(
                ["tar", "-x", "-C", str(work), TARBALL], stdin=fsys.stdout, stderr=f
            )
            fsys.stdout.close()
            if fsys.wait() != 0 or untar.returncode != 0:
                raise KernelBuildError(f"taking {TARBALL} out of {deb.path} failed", log)
        tarball = work / TARBALL
        _run_logged(["tar", "-xf", str(tarball), "-C", str(work)], log, "unpacking the source")
        tarball.unlink()
        unpacked = work / PACKAGE
        if not (unpacked / "Makefile").is_file():
            raise KernelBuildError(f"{TARBALL} did not hold {PACKAGE}/Makefile", log)
        (unpacked / SOURCE_STAMP).write_text(deb.sha256 + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        unpacked.rename(tree)
    if deb.downloaded:
        deb.path.unlink()  # the tree is what we keep; the pin re-fetches it if needed
    return tree


# -- the build -------------------------------------------------------------------------


def _make(tree: Path, objdir: Path, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(tree), f"O={objdir}", "ARCH=x86_64", f"-j{jobs}", *targets]


def configure(tree: Path, objdir: Path, fragment: str, log: Path, say: Say) -> None:
    """tinyconfig, the fragment on top, olddefconfig; then every fragment line must
    hold in the final .config, or the build stops naming the options Kconfig dropped."""
    wanted = parse_fragment(fragment)
    say("configuring: make tinyconfig, the fragment, make olddefconfig")
    _run_logged(_make(tree, objdir, "tinyconfig"), log, "make tinyconfig")
    config = objdir / ".config"
    config.write_text(apply_fragment(config.read_text(), wanted))
    _run_logged(_make(tree, objdir, "olddefconfig"), log, "make olddefconfig")
    dropped = dropped_options(config.read_text(), wanted)
    if dropped:
        raise KernelBuildError(
            f"Kconfig dropped {len(dropped)} option(s) of {FRAGMENT_NAME} (a dependency is "
            f"not enabled): {', '.join(map(str, dropped))}",
            log,
        )


def build(
    say: Say,
    *,
    source_deb: Path | None = None,
    cache: Path | None = None,
    jobs: int | None = None,
) -> GuestKernel:
    """The guest kernel, from the cache when it is there, built otherwise."""
    if os.uname().machine != "x86_64":
        raise UserError(
            f"the guest kernel is built natively for x86-64; this is {os.uname().machine}"
        )
    ensure_tools(say)
    fragment = fragment_text()
    parse_fragment(fragment)  # a broken fragment fails before any download
    root = (cache or cache_root()) / "guest-kernel"
    with _locked(root, say):
        deb = local_deb(source_deb) if source_deb is not None else None
        version = deb.version if deb else PINNED_VERSION
        sha = deb.sha256 if deb else PINNED_SHA256
        out = root / cache_key(version, fragment)
        if _complete(out, sha):
            return GuestKernel(out, version, cached=True)
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{out.name}.log"
        log.write_text(f"vmbusd guest-kernel {out.name}, {time.ctime()}\n")
        start, cpu_start = time.monotonic(), _children_cpu()
        tree = root / "src" / version
        if deb is not None:
            pinned = "the pinned version" if version == PINNED_VERSION else "not the pin"
            say(f"building from {deb.path}: {PACKAGE} {version} ({pinned}), SHA256 {sha}")
        if _stamp(tree) != sha:  # the extracted tree is kept; the .deb only to make it
            deb = deb or download_pinned(root / "debs", say)
            tree = extract_source(deb, root / "src", log, say)
        objdir = root / "build" / version  # kept: a config change rebuilds incrementally
        objdir.mkdir(parents=True, exist_ok=True)
        configure(tree, objdir, fragment, log, say)
        jobs = jobs or os.cpu_count() or 1
        say(f"building vmlinux with make -j{jobs} (several minutes; output in {log})")
        _run_logged(_make(tree, objdir, "vmlinux", jobs=jobs), log, "make vmlinux")
        entry = elf_entry(objdir / "vmlinux")  # refuse to cache something that is not one
        with tempfile.TemporaryDirectory(dir=root, prefix=".out-") as tmp:
            staged = Path(tmp) / "kernel"
            staged.mkdir()
            for name in ARTEFACTS:
                shutil.copy2(objdir / name, staged / name)
            (staged / "source.sha256").write_text(sha + "\n")
            if out.exists():
                shutil.rmtree(out)
            staged.rename(out)
        wall, cpu = time.monotonic() - start, _children_cpu() - cpu_start
        say(f"built in {_mins(wall)} ({_mins(cpu)} of CPU time), entry point {entry:#x}")
        return GuestKernel(out, version, cached=False)


def _children_cpu() -> float:
    """CPU seconds our finished child processes used: the build's cost on any machine,
    where the wall time also says how busy the machine was."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mins(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def elf_entry(path: Path) -> int:
    """The entry point of an x86-64 ELF executable; anything else is a KernelBuildError."""
    with path.open("rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF":
        raise KernelBuildError(f"{path} is not an ELF file")
    if head[4] != 2 or head[5] != 1:  # ELFCLASS64, little-endian
        raise KernelBuildError(f"{path} is not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    (e_entry,) = struct.unpack_from("<Q", head, 24)
    if e_type != 2 or e_machine != 62:  # ET_EXEC, EM_X86_64
        raise KernelBuildError(
            f"{path} is not an x86-64 executable (type {e_type}, machine {e_machine})"
        )
    return int(e_entry)


def copy_out(kernel: GuestKernel, out: Path) -> list[Path]:
    """vmlinux, .config and System.map copied into `out` (created if needed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: {exc.strerror or exc}") from None
    copied = []
    for name in ARTEFACTS:
        shutil.copy2(kernel.directory / name, out / name)
        copied.append(out / name)
    return copied


def command(say: Say, *, out: Path | None, source_deb: Path | None) -> int:
    """The `vmbusd guest-kernel` command: build or reuse, print vmlinux's path on stdout.

    Exit 0 when the kernel is there; 1 when the build failed (the log's path and its
    last lines on stderr); a user's mistake is a UserError (exit 2, one line)."""
    try:
        kernel = build(say, source_deb=source_deb)
    except KernelBuildError as exc:
        say(f"failed: {exc}")
        if exc.log is not None:
            tail = exc.log.read_text(errors="replace").splitlines()[-15:]
            say(f"the build's output is in {exc.log}; its last lines:")
            for line in tail:
                say(f"  {line}")
        return 1
    if kernel.cached:
        say(f"cached: {kernel.directory} ({PACKAGE} {kernel.version})")
    else:
        say(f"cached for next time in {kernel.directory}")
    vmlinux = kernel.vmlinux
    if out is not None:
        vmlinux = copy_out(kernel, out)[0]
        say(f"wrote vmlinux, .config and System.map to {out}")
    print(vmlinux, flush=True)
    return 0
