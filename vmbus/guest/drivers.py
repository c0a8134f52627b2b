"""Guest drivers by interface GUID: how device VSCs plug into the simulated VM.

Like Linux's vmbus_driver table: a driver names the interface type it binds to,
and the simulated VM probes it for every offer of that type. netvsc and storvsc
VSCs register here the same way the echo VSC does.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from vmbus.guest.vm import GuestOffer, SimulatedVm


class GuestDriver(Protocol):
    """A guest-side device driver (VSC)."""

    if_type: ClassVar[uuid.UUID]
    name: ClassVar[str]

    async def probe(self, vm: SimulatedVm, offer: GuestOffer) -> dict[str, Any]:
        """Bind to one offered channel, do the driver's work, return a summary."""
        ...


_REGISTRY: dict[uuid.UUID, type[GuestDriver]] = {}


def register(cls: type[GuestDriver]) -> type[GuestDriver]:
    """Class decorator: bind `cls` to its interface type (one driver per type)."""
    if cls.if_type in _REGISTRY and _REGISTRY[cls.if_type] is not cls:
        raise ValueError(f"a driver for {cls.if_type} is already registered")
    _REGISTRY[cls.if_type] = cls
    return cls


def driver_for(if_type: uuid.UUID) -> type[GuestDriver] | None:
    return _REGISTRY.get(if_type)


def registered() -> dict[uuid.UUID, type[GuestDriver]]:
    return dict(_REGISTRY)
