"""A VM's devices from a TOML file.

    [[device]]
    type = "echo"            # a `vmbusd.devices` entry point, or "module:Class"
    instance = "..."         # optional instance GUID; by default one derived from the
                             # VM's name and the device's place (the same after a restart)
    ring_size_hint = 65536   # optional; any other key is an option of that device class

    [[device]]
    type = "storvsc"         # the synthetic SCSI controller; its LUNs are tables:
    [[device.lun]]           # backend memory/file/nbd/any `vmbusd.disk_backends` entry
    backend = "file"         # point; lun, serial, wwn; the rest are the backend's options
    path = "disk.img"        # (size, path, readonly, create_size, uri, block_size, ...)

    [[device]]
    type = "netvsc"          # the synthetic NIC: mac, mtu (68..9000), queues (1..64),
    backend = "tap"          # backend: loopback (default), tap or any `vmbusd.net_backends`
    ifname = "vh0"           # entry point; the other keys are the backend's options
    netns = "h"              # (tap: ifname, netns, bridge)

    [vm.db1]                 # the VM whose attach hello names it "db1" gets this list
    [[vm.db1.device]]        # instead of the top-level one (the default for every
    type = "storvsc"         # other VM); each [vm.NAME] holds its device list and limits

    [limits]                 # what each VM may take (vmbus.limits): channels, gpadl_bytes,
    channels = 128           # outstanding_requests, control_rate, control_burst
    [vm.db1.limits]          # one VM's, over [limits]; alone, the VM keeps the default
    control_rate = 500       # devices

Everything is checked when the file is loaded, before anything listens: an unknown key
anywhere (`[[devices]]` would otherwise serve nothing), an unknown device type, a class
that is no device or has no `if_type`, an option the class does not take. Each is a
`ConfigError` whose message names the file, the entry and the fix.

With no file, the default VM gets one echo device (the NIC and disk devices join the
default once their VSPs exist).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import tomllib
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

from vmbus import plugins
from vmbus.cliutil import UserError
from vmbus.device import Device
from vmbus.limits import VmLimits, limits_from_config

MAX_DEVICES = 64
TOP_LEVEL_KEYS = ("device", "vm", "limits")  # [limits]: vmbus.limits, every VM's
VM_KEYS = ("device", "limits")  # [vm.NAME.limits]: that VM's, over [limits]
DEFAULT_CONFIG: dict[str, Any] = {"device": [{"type": "echo"}]}


class ConfigError(UserError):
    """The configuration is invalid; the message says where and what to do."""


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def device_class(kind: str) -> type[Device]:
    """The class a `type = ...` names, checked to be a usable device."""
    found = plugins.resolve(plugins.DEVICES, kind)
    if not (isinstance(found, type) and issubclass(found, Device)):
        raise ConfigError(f"{kind!r} is {found!r}, not a vmbus.device.Device subclass")
    if not isinstance(getattr(found, "if_type", None), uuid.UUID):
        raise ConfigError(
            f"device class {found.__module__}.{found.__qualname__} ({kind!r}) has no if_type: "
            "set `if_type = uuid.UUID(...)` (its interface GUID) on the class"
        )
    return found


def _options_taken(cls: type[Device]) -> tuple[list[str], bool]:
    """The keyword options a device class's constructor takes, and whether it takes any."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return [], True
    names: list[str] = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return names, True
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return names, False


_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_problem(cls: type[Device], name: str, value: object) -> str | None:
    """What is wrong with `value` for a constructor parameter annotated with a simple
    type (int, float, str, bool, uuid.UUID, or a union of them); None if it fits or
    the annotation says nothing we can check."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: leave the check to the class
        return None
    hint = hints.get(name)
    if hint is None:
        return None
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if not all(m in _SIMPLE or m in (uuid.UUID, type(None)) for m in members):
        return None
    for m in members:
        if m is type(None):
            continue
        if m is uuid.UUID and isinstance(value, (str, uuid.UUID)):
            return None
        if m is bool and isinstance(value, bool):
            return None
        if m is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if m in (int, str) and type(value) is m:
            return None
    wanted = " or ".join(_SIMPLE.get(m, "a GUID") for m in members if m is not type(None))
    return f"option {name!r} must be {wanted}, not {value!r}"


# Default instance GUIDs are derived, not random: a restarted vmbusd offers the same
# controller and NIC to the same VM, so its guest sees no new device (issue 11).
INSTANCE_NAMESPACE = uuid.UUID("3c1e9a52-7d0b-5f4e-9a61-0b2d8c4f7e13")


def default_instance(vm_name: str | None, place: str, kind: str) -> uuid.UUID:
    """The instance GUID of the device at `place` in a VM's list, when the config gives
    none: a name-based (v5) GUID of the VM's name, the place and the device type."""
    return uuid.uuid5(INSTANCE_NAMESPACE, f"{vm_name or ''}\n{place}\n{kind}")


def _build(where: str, entry: object, instance: Callable[[str], uuid.UUID] | None = None) -> Device:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table ([[device]] with a type = ... key)")
    if "type" not in entry:
        raise ConfigError(f"{where}: no 'type' key (e.g. type = \"echo\")")
    kind = entry["type"]
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: 'type' must be a string, not {kind!r}")
    try:
        cls = device_class(kind)
    except UserError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    opts = {k: v for k, v in entry.items() if k != "type"}
    taken, any_ok = _options_taken(cls)
    unknown = [k for k in opts if k not in taken]
    if unknown and not any_ok:
        k = unknown[0]
        takes = ", ".join(["type", *taken])
        raise ConfigError(
            f"{where} ({kind}): unknown option {k!r}{_did_you_mean(k, taken)}; "
            f"this device takes: {takes}"
        )
    for k, v in opts.items():
        problem = _type_problem(cls, k, v)
        if problem:
            raise ConfigError(f"{where} ({kind}): {problem}")
    if "instance" in opts:
        try:
            opts["instance"] = uuid.UUID(str(opts["instance"]))
        except ValueError as exc:
            raise ConfigError(
                f"{where} ({kind}): instance {opts['instance']!r} is not a GUID"
            ) from exc
    elif instance is not None and "instance" in taken:
        opts["instance"] = instance(kind)
    try:
        return cls(**opts)
    except UserError as exc:
        raise ConfigError(f"{where} ({kind}): {exc}") from exc
    except Exception as exc:  # the class refused its options (a backend that is not there, ...)
        raise ConfigError(f"{where} ({kind}): {type(exc).__name__}: {exc}") from exc


def _check_keys(cfg: dict[str, Any], source: str) -> dict[str, list[Any]]:
    """Every key must mean something; returns the [vm.NAME] device lists by name."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{source}: unknown key {key!r}{_did_you_mean(key, TOP_LEVEL_KEYS)}; "
                "a device is declared as [[device]] with a type = ... key"
            )
    vms = cfg.get("vm", {})
    if not isinstance(vms, dict):
        raise ConfigError(f"{source}: 'vm' must be tables [vm.NAME] with [[vm.NAME.device]]")
    lists: dict[str, list[Any]] = {}
    for name, section in vms.items():
        where = f"{source}: [vm.{name}]"
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: must be a table with [[vm.{name}.device]] tables")
        for key in section:
            if key not in VM_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {key!r}{_did_you_mean(key, VM_KEYS)}; "
                    f"a VM's device is declared as [[vm.{name}.device]] with a type = ... key"
                )
        if "device" in section or "limits" not in section:  # limits alone: default devices
            lists[str(name)] = _entry_list(section.get("device"), where, f"vm.{name}.device")
    if "device" not in cfg and not lists:
        raise ConfigError(f"{source}: no devices: declare at least one [[device]] table")
    return lists


def _entry_list(entries: object, where: str, table: str) -> list[Any]:
    if isinstance(entries, dict):
        raise ConfigError(f"{where}: write [[{table}]] (an array of tables), not [{table}]")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: no devices: declare at least one [[{table}]] table")
    if len(entries) > MAX_DEVICES:
        raise ConfigError(f"{where}: {len(entries)} devices; at most {MAX_DEVICES} per VM")
    return entries


def devices_from_config(
    cfg: dict[str, Any], source: str = "config", vm_name: str | None = None
) -> list[Device]:
    """Build one VM's devices from a parsed config: its [vm.NAME] list when the config
    has one for `vm_name`, else the top-level [[device]] list (the default)."""
    per_vm = _check_keys(cfg, source)

    def place(where: str) -> Callable[[str], uuid.UUID]:
        return lambda kind: default_instance(vm_name, where, kind)

    if vm_name is not None and vm_name in per_vm:
        where = f"{source}: [vm.{vm_name}] device"
        return [
            _build(f"{where} #{i + 1}", e, place(f"vm.{vm_name}#{i}"))
            for i, e in enumerate(per_vm[vm_name])
        ]
    if "device" not in cfg:
        named = ", ".join(sorted(per_vm))
        if vm_name is None:
            raise ConfigError(
                f"{source}: no default [[device]] list (only [vm.NAME] lists: {named})"
            )
        raise ConfigError(
            f"{source}: no [vm.{vm_name}] section and no default [[device]] list "
            f"(VMs configured: {named})"
        )
    entries = _entry_list(cfg["device"], source, "device")
    return [
        _build(f"{source}: device #{i + 1}", e, place(f"device#{i}")) for i, e in enumerate(entries)
    ]


_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def read_config(path: str) -> dict[str, Any]:
    """Parse the TOML file; a missing file or bad TOML is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8)") from exc
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _AT.search(msg)
        if m:
            line, col = m.groups()
            raise ConfigError(
                f"{path}:{line}:{col}: invalid TOML: {msg[: m.start()]} (line {line}, column {col})"
            ) from exc
        raise ConfigError(f"{path}: invalid TOML: {msg}") from exc


def _importable_beside(path: str) -> None:
    """A `module:Class` in a config file is looked for next to the file first, so a
    device written beside its config runs from a fresh directory as printed (the
    console script does not put the working directory on sys.path)."""
    where = os.path.dirname(os.path.abspath(path))
    if where not in sys.path:
        sys.path.insert(0, where)


def load_devices(path: str | None) -> list[Device]:
    """Devices for one VM: from the file when given, else the default set."""
    if path is None:
        return devices_from_config(DEFAULT_CONFIG, "default config")
    cfg = read_config(path)
    _importable_beside(path)
    return devices_from_config(cfg, path)


class VmDevices:
    """A fresh set of devices per VM session, chosen by the VM's name from its attach
    hello (`for_vm`); calling it gives the default set. The file is read and every
    list checked once up front (a bad file fails before anything listens), and the
    parsed config reused, so every VM of a name sees the same config."""

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.cfg = cfg
        self.source = source
        self.vm_names = sorted(_check_keys(cfg, source))
        if "device" in cfg:
            devices_from_config(cfg, source)
        for name in self.vm_names:
            devices_from_config(cfg, source, name)
        for name in [None, *(cfg.get("vm") or {})]:
            limits_from_config(cfg, source, name)  # a bad [limits] fails at load too

    def __call__(self) -> list[Device]:
        return devices_from_config(self.cfg, self.source)

    def for_vm(self, name: str) -> list[Device]:
        return devices_from_config(self.cfg, self.source, name)

    def limits_for(self, name: str) -> VmLimits:
        """The VM's limits: [vm.NAME.limits] over [limits] over vmbus.limits' defaults."""
        return limits_from_config(self.cfg, self.source, name)


def devices_factory(path: str | None) -> VmDevices:
    """The per-VM device sets of a config file (the embedded default when None)."""
    cfg = DEFAULT_CONFIG if path is None else read_config(path)
    source = "default config" if path is None else path
    if path is not None:
        _importable_beside(path)
    return VmDevices(cfg, source)
