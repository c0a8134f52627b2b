"""`vmbusd guest-kernel`: the config fragment's checks, the cache key, the tool check,
and (slow) the real build from Debian's linux-source-6.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmbus.cliutil import UserError
from vmbus.kvm import kernel

FRAGMENT = """\
# a comment
CONFIG_HYPERV=y
CONFIG_HYPERV_NET=y

# CONFIG_NETCONSOLE_DYNAMIC is not set
CONFIG_CMDLINE="console=ttyS0"
CONFIG_NR_CPUS=4
"""

# what olddefconfig left: HYPERV_NET gone (as when NETDEVICES is off), NETCONSOLE_DYNAMIC
# on, NR_CPUS changed; HYPERV and CMDLINE as asked
FINAL = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_HYPERV=y
CONFIG_NETCONSOLE_DYNAMIC=y
CONFIG_CMDLINE="console=ttyS0"
CONFIG_NR_CPUS=64
"""


def _say(lines: list[str]) -> kernel.Say:
    return lines.append


# -- the fragment ------------------------------------------------------------------------


def test_shipped_fragment_wants_the_hyperv_drivers_built_in() -> None:
    wanted = kernel.parse_fragment(kernel.fragment_text())
    for name in ("HYPERV", "HYPERV_STORAGE", "HYPERV_NET", "SERIAL_8250_CONSOLE", "EXT4_FS"):
        assert wanted[name] == "y", name
    for name in ("MODULES", "IP_PNP_DHCP", "NETCONSOLE_DYNAMIC", "MAGIC_SYSRQ", "UNWINDER_ORC"):
        assert wanted[name] == "n", name


def test_parse_fragment_values_and_unset() -> None:
    assert kernel.parse_fragment(FRAGMENT) == {
        "HYPERV": "y",
        "HYPERV_NET": "y",
        "NETCONSOLE_DYNAMIC": "n",
        "CMDLINE": '"console=ttyS0"',
        "NR_CPUS": "4",
    }


def test_parse_fragment_refuses_a_line_that_is_not_an_option() -> None:
    with pytest.raises(ValueError, match=r"line 3: .*HYPERV_NET=y"):
        kernel.parse_fragment("CONFIG_HYPERV=y\n\nHYPERV_NET=y\n")


def test_dropped_options_are_named() -> None:
    dropped = kernel.dropped_options(FINAL, kernel.parse_fragment(FRAGMENT))
    assert [str(d) for d in dropped] == [
        "CONFIG_HYPERV_NET (wanted y, got not set)",
        "CONFIG_NETCONSOLE_DYNAMIC (wanted not set, got y)",
        "CONFIG_NR_CPUS (wanted 4, got 64)",
    ]


def test_nothing_dropped_when_the_config_has_it_all() -> None:
    wanted = kernel.parse_fragment(FRAGMENT)
    config = kernel.apply_fragment(FINAL, wanted)
    assert kernel.dropped_options(config, wanted) == []


def test_apply_fragment_rewrites_in_place_and_appends_the_rest() -> None:
    config = "CONFIG_A=y\n# CONFIG_HYPERV is not set\nCONFIG_NETCONSOLE_DYNAMIC=y\nCONFIG_B=y\n"
    out = kernel.apply_fragment(config, kernel.parse_fragment(FRAGMENT)).splitlines()
    assert out[:4] == [
        "CONFIG_A=y",
        "CONFIG_HYPERV=y",
        "# CONFIG_NETCONSOLE_DYNAMIC is not set",
        "CONFIG_B=y",
    ]
    assert out[4:] == ["CONFIG_HYPERV_NET=y", 'CONFIG_CMDLINE="console=ttyS0"', "CONFIG_NR_CPUS=4"]


def test_configure_fails_naming_what_olddefconfig_dropped(tmp_path: Path) -> None:
    """configure() driven through make with a stand-in kernel Makefile whose
    olddefconfig drops HYPERV_NET, as Kconfig does when a dependency is off."""
    tree, objdir = tmp_path / "tree", tmp_path / "obj"
    tree.mkdir()
    objdir.mkdir()
    (tree / "Makefile").write_text(
        "tinyconfig:\n"
        "\tprintf '# CONFIG_HYPERV is not set\\n# CONFIG_NETCONSOLE_DYNAMIC is not set\\n'"
        " > $(O)/.config\n"
        "olddefconfig:\n"
        "\tsed -i '/HYPERV_NET/d' $(O)/.config\n"
    )
    log = tmp_path / "build.log"
    fragment = "CONFIG_HYPERV=y\nCONFIG_HYPERV_NET=y\n# CONFIG_NETCONSOLE_DYNAMIC is not set\n"
    lines: list[str] = []
    with pytest.raises(kernel.KernelBuildError) as info:
        kernel.configure(tree, objdir, fragment, log, _say(lines))
    assert "dropped 1 option(s)" in str(info.value)
    assert "CONFIG_HYPERV_NET (wanted y, got not set)" in str(info.value)
    assert "CONFIG_HYPERV " not in str(info.value)
    assert info.value.log == log
    assert "olddefconfig" in log.read_text()
    assert lines and "tinyconfig" in lines[0]


# -- the cache ---------------------------------------------------------------------------


def test_cache_key_is_stable_and_changes_with_version_and_config() -> None:
    key = kernel.cache_key("6.1.192-3", FRAGMENT)
    assert key == kernel.cache_key("6.1.192-3", FRAGMENT)
    assert key.startswith("6.1.192-3-")
    assert kernel.cache_key("6.1.192-4", FRAGMENT) != key
    assert kernel.cache_key("6.1.192-3", FRAGMENT + "CONFIG_SMP=y\n") != key
    assert kernel.cache_key("6.1.192-3", FRAGMENT.replace("=4", "=8")) != key
    assert kernel.cache_key("6.1.192-3", FRAGMENT.replace("=y", "=n", 1)) != key
    # comments and blank lines are not the config
    assert kernel.cache_key("6.1.192-3", "# why\n\n" + FRAGMENT + "# more\n") == key


def test_cache_root_follows_xdg() -> None:
    assert kernel.cache_root({"XDG_CACHE_HOME": "/x/c", "HOME": "/h"}) == Path("/x/c/vmbusd")
    assert kernel.cache_root({"HOME": "/h"}) == Path("/h/.cache/vmbusd")
    # the spec: a relative (or empty) XDG_CACHE_HOME is ignored
    assert kernel.cache_root({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path("/h/.cache/vmbusd")


# -- tools, and mistakes -----------------------------------------------------------------


def _path_without(tmp_path: Path, *left_out: str) -> str:
    """A PATH directory holding every build tool (and what the CLI needs) except some."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in [*kernel.TOOLS, "apt-get", "sh", "env", "setpriv"]:
        found = shutil.which(tool)
        if found and tool not in left_out:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.fixture
def libelf_installed() -> None:
    """scripts/test installs libelf-dev: its absence is a failure naming it, not a skip."""
    if not kernel.LIBELF_HEADER.is_file():
        pytest.fail(f"libelf-dev is not installed ({kernel.LIBELF_HEADER}): apt-get install it")


@pytest.mark.usefixtures("libelf_installed")
def test_missing_flex_is_named(tmp_path: Path) -> None:
    path = _path_without(tmp_path, "flex")
    assert kernel.missing_packages(path) == ["flex"]
    with pytest.raises(UserError, match=r"missing: flex \(install them: sudo apt-get install flex"):
        kernel.ensure_tools(_say([]), root=False, path=path)


def test_nothing_missing_here() -> None:
    """This machine has the tools (CI installs them); the slow build depends on it."""
    assert kernel.missing_packages() == []


def _cli(args: list[str], env: dict[str, str], as_nobody: bool) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vmbus.cli", "guest-kernel", *args]
    if as_nobody:  # root would install flex instead: drop to a user that cannot
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to test the non-root path as root"
        cmd = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.usefixtures("libelf_installed")
def test_cli_not_root_without_flex_names_it_and_exits_2() -> None:
    # not pytest's tmp_path: its parent is 0700, and the user we drop to must read PATH
    with tempfile.TemporaryDirectory(prefix="vmbusd-gk-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        env = {
            **os.environ,
            "PATH": _path_without(tmp_path, "flex"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "HOME": str(tmp_path),
        }
        done = _cli([], env, as_nobody=os.geteuid() == 0)
        cache_made = (tmp_path / "cache").exists()
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "vmbusd guest-kernel: the kernel build needs these packages, which are missing: flex "
        "(install them: sudo apt-get install flex)"
    ]
    assert not cache_made  # refused before touching anything


def test_cli_source_deb_that_is_not_linux_source_is_refused(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: hello-vmbus\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: t <t@example.org>\nDescription: not a kernel\n"
    )
    deb = tmp_path / "hello.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = _cli(["--source-deb", str(deb)], env, as_nobody=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"vmbusd guest-kernel: --source-deb {deb} is hello-vmbus, not linux-source-6.1"
    ]
    not_a_deb = tmp_path / "junk.deb"
    not_a_deb.write_bytes(b"junk")
    done = _cli(["--source-deb", str(not_a_deb)], env, as_nobody=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"vmbusd guest-kernel: --source-deb {not_a_deb}: ")
    assert len(done.stderr.splitlines()) == 1


def test_cli_a_failing_build_names_its_log(tmp_path: Path) -> None:
    """A linux-source-6.1 .deb whose 'kernel' cannot be configured: the source is taken
    out of the package and unpacked, make fails, and the user is told where the log is."""
    tree = tmp_path / "tree" / "linux-source-6.1"
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("tinyconfig:\n\t@echo 'no kernel in here' && false\n")
    pkg = tmp_path / "pkg"
    (pkg / "usr" / "src").mkdir(parents=True)
    (pkg / "DEBIAN").mkdir()
    subprocess.run(
        ["tar", "-cJf", str(pkg / "usr/src/linux-source-6.1.tar.xz"), "-C", str(tree.parent), "."],
        check=True,
    )
    (pkg / "DEBIAN" / "control").write_text(
        "Package: linux-source-6.1\nVersion: 0.0.1-test\nArchitecture: all\n"
        "Maintainer: t <t@example.org>\nDescription: a stand-in\n"
    )
    deb = tmp_path / "fake.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    cache = tmp_path / "cache"
    done = _cli(["--source-deb", str(deb)], {**os.environ, "XDG_CACHE_HOME": str(cache)}, False)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    key = kernel.cache_key("0.0.1-test", kernel.fragment_text())
    log = cache / "vmbusd" / "guest-kernel" / "logs" / f"{key}.log"
    assert f"building from {deb}: linux-source-6.1 0.0.1-test (not the pin), SHA256 " in (
        done.stderr
    )
    assert "failed: make tinyconfig failed (exit status 2)" in done.stderr
    assert f"the build's output is in {log}; its last lines:" in done.stderr
    assert "no kernel in here" in done.stderr
    assert "no kernel in here" in log.read_text()
    src = cache / "vmbusd" / "guest-kernel" / "src" / "0.0.1-test"
    assert (src / "Makefile").is_file()  # unpacked, and only the tarball's tree
    assert not (src / "usr").exists() and deb.is_file()  # the user's .deb is left alone
    assert not (cache / "vmbusd" / "guest-kernel" / key).exists()  # nothing cached


def test_a_version_apt_does_not_have_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user sees once Debian drops the pinned revision (asked of the real apt)."""
    monkeypatch.setattr(kernel, "PINNED_VERSION", "0.0.0-0")
    with pytest.raises(UserError) as info:
        kernel.download_pinned(tmp_path, _say([]))
    msg = str(info.value)
    assert "linux-source-6.1 0.0.0-0 (the pinned version) is not available from apt" in msg
    assert "--source-deb PATH" in msg
    assert "\n" not in msg


def test_elf_entry_refuses_what_is_not_an_x86_64_executable(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(kernel.KernelBuildError, match="not a 64-bit little-endian ELF"):
        kernel.elf_entry(junk)
    true = Path(shutil.which("true") or "/bin/true")  # a PIE: ET_DYN, not ET_EXEC
    with pytest.raises(kernel.KernelBuildError, match="type 3"):
        kernel.elf_entry(true)


# -- the real build ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_build_the_guest_kernel() -> None:
    """Builds the kernel (~6 min on 2 cores), or reuses `vmbusd guest-kernel`'s cache."""
    lines: list[str] = []
    built = kernel.build(_say(lines))
    entry = kernel.elf_entry(built.vmlinux)  # x86-64 ET_EXEC, or it raises
    assert entry != 0
    with built.vmlinux.open("rb") as f:
        head = f.read(20)
    assert head[:5] == b"\x7fELF\x02" and head[18:20] == (62).to_bytes(2, "little")
    config = built.config.read_text()
    assert "CONFIG_HYPERV_STORAGE=y" in config.splitlines()
    assert kernel.dropped_options(config, kernel.parse_fragment(kernel.fragment_text())) == []
    assert " T startup_64\n" in built.system_map.read_text()
    again = kernel.build(_say(lines))  # the cache: instant, same files
    assert again.cached and again.directory == built.directory
