"""A VM's devices from a TOML file.

    [[device]]
    type = "echo"            # a built-in device kind, or "module:Class"
    instance = "..."         # optional instance GUID (stable across restarts)
    ring_size_hint = 65536   # optional

With no file, the default VM gets one echo device (the NIC and disk devices join
the default once their VSPs exist).
"""

from __future__ import annotations

import importlib
import tomllib
import uuid
from typing import Any

from vmbus.device import Device

MAX_DEVICES = 64


class ConfigError(Exception):
    """The configuration file is invalid; the message says where."""


def _builtin(kind: str) -> type[Device]:
    if kind == "echo":
        from devices.echo import EchoDevice

        return EchoDevice
    if ":" in kind:
        mod, _, cls = kind.partition(":")
        try:
            found = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load device class {kind!r}: {exc}") from exc
        if not (isinstance(found, type) and issubclass(found, Device)):
            raise ConfigError(f"{kind!r} is not a vmbus.device.Device subclass")
        return found
    raise ConfigError(f"unknown device type {kind!r}")


def devices_from_config(cfg: dict[str, Any]) -> list[Device]:
    entries = cfg.get("device", [])
    if not isinstance(entries, list) or len(entries) > MAX_DEVICES:
        raise ConfigError(f"'device' must be a list of at most {MAX_DEVICES} tables")
    out: list[Device] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ConfigError(f"device #{i}: a table with a 'type' key is required")
        opts = {k: v for k, v in entry.items() if k != "type"}
        if "instance" in opts:
            try:
                opts["instance"] = uuid.UUID(str(opts["instance"]))
            except ValueError as exc:
                raise ConfigError(f"device #{i}: bad instance GUID") from exc
        try:
            out.append(_builtin(str(entry["type"]))(**opts))
        except TypeError as exc:
            raise ConfigError(f"device #{i} ({entry['type']}): {exc}") from exc
    return out


def load_devices(path: str | None) -> list[Device]:
    """Devices for one VM: from the file when given, else the default set."""
    if path is None:
        return devices_from_config({"device": [{"type": "echo"}]})
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return devices_from_config(cfg)
