"""Plug-ins by entry points: devices, disk backends and network backends from any package.

A package offers a device to vmbusd by naming its class in its own pyproject.toml:

    [project.entry-points."vmbusd.devices"]
    upper = "mypackage.upper:Upper"

and a VM's config then says `type = "upper"`. vmbusd's own echo device is registered
the same way, so built-ins and plug-ins are found, listed and loaded by one path.
A `module:Class` string works too, without registering anything.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from vmbus.cliutil import UserError

DEVICES = "vmbusd.devices"
DISK_BACKENDS = "vmbusd.disk_backends"
NET_BACKENDS = "vmbusd.net_backends"
GROUPS = (DEVICES, DISK_BACKENDS, NET_BACKENDS)


class PluginError(UserError):
    """A plug-in name or path that does not resolve; the message lists what would."""


@dataclass(frozen=True)
class Plugin:
    """One installed entry point: where it is registered and what it points at."""

    group: str
    name: str
    target: str  # "module:attr"
    package: str  # the distribution that registered it


def _entries(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def installed(group: str | None = None) -> list[Plugin]:
    """Every registered entry point of our groups (or of one), sorted by group and name."""
    out = []
    for g in (group,) if group else GROUPS:
        for ep in _entries(g):
            dist = ep.dist.name if ep.dist is not None else "?"
            out.append(Plugin(g, ep.name, ep.value, dist))
    return out


def names(group: str) -> list[str]:
    return [ep.name for ep in _entries(group)]


def _what(group: str) -> str:
    return {DEVICES: "device type", DISK_BACKENDS: "disk backend", NET_BACKENDS: "net backend"}[
        group
    ]


def resolve(group: str, spec: str) -> object:
    """The object named by `spec`: an entry-point name in `group`, or `module:attr`.

    Raises PluginError naming what is installed, so a typo is one line to fix.
    """
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise PluginError(f"cannot import {mod_name!r} for {spec!r}: {exc}") from exc
        try:
            return getattr(module, attr)
        except AttributeError as exc:
            raise PluginError(f"module {mod_name!r} has no {attr!r} (from {spec!r})") from exc
    for ep in _entries(group):
        if ep.name == spec:
            try:
                return ep.load()
            except (ImportError, AttributeError) as exc:
                raise PluginError(
                    f"{_what(group)} {spec!r} is registered ({ep.value}) but does not load: {exc}"
                ) from exc
    known = ", ".join(names(group)) or "none installed"
    raise PluginError(
        f"unknown {_what(group)} {spec!r}; valid: {known}, or a 'module:Class' path "
        f"(`vmbusd plugins` lists the {group} entry points)"
    )
