"""Shared fixtures: a running service, a simulated VM attached to it, an open channel.

So that a device test is a few lines:

    @pytest.mark.devices(EchoDevice)
    async def test_echo(channel: GuestChannel) -> None:
        await echo_mixed(channel.channel, 100, MAXP)

Two services, both real: `service` is `vmbusd serve` as a separate process (its log
and exit status are the test's to check), `local_service` runs the same
`serve_listener` in the test's own trio run (the test can reach the live
`VmSession`s, e.g. to hot-add a device). Both listen on a socket in `tmp_path`; every
fixture cleans up even when the test fails: channels' views released, VMs closed,
vmbusd terminated (killed if it does not go) and reaped, the socket file removed.

`@pytest.mark.devices(...)` picks the devices (classes, or `vmbusd serve` config
types such as "echo"); one echo device by default.

`require_tool` is how a test asks for an external program: missing, it fails naming
the Debian package (`scripts/test` installs them all); it never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import pytest
import trio
from e2e_support import ServeProcess, guest, serve_process

from vmbus import native

if TYPE_CHECKING:  # imported where used: a conftest that fails to import stops every test
    from vmbus.device import Device
    from vmbus.guest.vm import GuestChannel, SimulatedVm
    from vmbus.server import VmSession

    DeviceSpec: TypeAlias = type[Device] | str

RING = 64 * 1024  # ring size for fixture channels, each direction
VM_RAM = 64 << 20
CLOSE_TIMEOUT_S = 5.0  # a fixture's polite channel close; after that views are dropped


def require_tool(name: str, package: str) -> str:
    """The path of `name`; a test that needs it fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed (apt-get install {package})", pytrace=False)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "devices(*devices): the devices the service fixtures offer (default: echo)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.native` tests fail when the extension is missing: `pip install -e .`
    always builds it, so a missing one is a broken install, not a reason to skip."""
    if item.get_closest_marker("native") is not None and not native.native_available():
        pytest.fail("vmbus._native is not built (pip install -e .)", pytrace=False)


# --- which devices ------------------------------------------------------------------


@pytest.fixture
def device_specs(request: pytest.FixtureRequest) -> list[DeviceSpec]:
    from devices.echo import EchoDevice

    marker = request.node.get_closest_marker("devices")
    specs: list[DeviceSpec] = list(marker.args) if marker is not None else [EchoDevice]
    assert specs, "@pytest.mark.devices needs at least one device"
    return specs


def config_type(spec: DeviceSpec) -> str:
    """The `[[device]] type` for a spec: a config string as is, a class as module:Class."""
    if isinstance(spec, str):
        return spec
    return f"{spec.__module__}:{spec.__qualname__}"


def if_type_of(device: DeviceSpec | uuid.UUID) -> uuid.UUID:
    if isinstance(device, uuid.UUID):
        return device
    if isinstance(device, str):
        from vmbus.config import devices_from_config

        (dev,) = devices_from_config({"device": [{"type": device}]})
        return dev.if_type
    return device.if_type


# --- a running service ----------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path, device_specs: list[DeviceSpec]) -> Iterator[ServeProcess]:
    """`vmbusd serve` as a separate process on a socket in tmp_path."""
    with serve_process(tmp_path, [config_type(s) for s in device_specs]) as sp:
        yield sp
    # serve_process terminated (or killed) and reaped it; the socket goes either way.
    assert sp.proc.returncode is not None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sp.path)


@dataclass
class LocalService:
    """`serve_listener` in the test's trio run: the same code path as `vmbusd serve`."""

    path: str
    sessions: set[VmSession] = field(default_factory=set)

    def session(self) -> VmSession:
        """The one live session (a test with one VM attached)."""
        (s,) = self.sessions
        return s


@pytest.fixture
async def local_service(
    tmp_path: Path, device_specs: list[DeviceSpec]
) -> AsyncIterator[LocalService]:
    from vmbus.server import serve_listener

    classes = [s for s in device_specs if not isinstance(s, str)]
    if len(classes) != len(device_specs):
        from vmbus.config import devices_from_config

        def factory() -> list[Device]:
            return devices_from_config({"device": [{"type": config_type(s)} for s in device_specs]})

    else:

        def factory() -> list[Device]:
            return [cls() for cls in classes]

    svc = LocalService(str(tmp_path / "local.sock"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda **kw: serve_listener(svc.path, factory, sessions=svc.sessions, **kw)
            )
            yield svc
            nursery.cancel_scope.cancel()  # a clean shutdown: every VMM is told, then closed
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(svc.path)


# --- a simulated VM attached to it ----------------------------------------------------


@contextlib.asynccontextmanager
async def attached_vm(path: str, vm_id: str = "test-vm") -> AsyncIterator[SimulatedVm]:
    """e2e_support.guest, plus: channels a test left open are closed (or, when the host
    no longer answers, their views dropped) so the VM's memory can always be freed."""
    async with guest(path, vm_id=vm_id, ram_size=VM_RAM) as vm:
        try:
            yield vm
        finally:
            with trio.CancelScope(shield=True):
                await _drop_channels(vm)


async def _drop_channels(vm: SimulatedVm) -> None:
    for gch in list(vm.channels.values()):
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            with contextlib.suppress(Exception):
                await vm.close_channel(gch)
        if gch.offer.relid in vm.channels:  # the close did not finish: drop our views
            vm.channels.pop(gch.offer.relid)
            gch.channel.release()
            gch.mapping.close()


@pytest.fixture
async def vm(service: ServeProcess) -> AsyncIterator[SimulatedVm]:
    """A simulated VM attached to `service`, VMBus negotiated, offers received."""
    async with attached_vm(service.path) as v:
        yield v


@pytest.fixture
async def local_vm(local_service: LocalService) -> AsyncIterator[SimulatedVm]:
    """A simulated VM attached to `local_service`."""
    async with attached_vm(local_service.path) as v:
        yield v


# --- an open channel of device X ------------------------------------------------------

OpenChannel = Callable[..., Awaitable["GuestChannel"]]


async def open_channel_of(
    vm: SimulatedVm, device: DeviceSpec | uuid.UUID, *, ring_size: int = RING
) -> GuestChannel:
    """Open the first offer of `device` (class, config type or interface GUID) that the
    guest has not opened yet; the guest-side channel."""
    want = if_type_of(device)
    with trio.fail_after(CLOSE_TIMEOUT_S):
        while True:
            free = [o for o in vm.find_offers(want) if o.relid not in vm.channels]
            if free:
                break
            await vm.offer_events.receive()
    return await vm.open_channel(free[0], ring_size)


@pytest.fixture
def open_channel() -> OpenChannel:
    """`await open_channel(vm, EchoDevice)`: one more open channel (closed with the VM)."""
    return open_channel_of


@pytest.fixture
async def channel(vm: SimulatedVm, device_specs: list[DeviceSpec]) -> GuestChannel:
    """An open channel of the first device in `@pytest.mark.devices` (on `service`)."""
    return await open_channel_of(vm, device_specs[0])
