"""The disk backend interface: what the SCSI disk emulation needs from storage.

A backend is a plain class with these attributes and async methods. Buffers are
sequences of memoryviews (later: iovecs straight into guest RAM), so data moves
between storage and the guest with no intermediate copy. Offsets and lengths are
in bytes and always multiples of `block_size` (the SCSI layer guarantees it).
Backends raise `BackendIOError` for a failed I/O; the SCSI layer turns it into
MEDIUM ERROR and carries on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


class BackendIOError(Exception):
    """An I/O to the backing store failed; the command gets MEDIUM ERROR.

    `offset`, when the backend knows it, is the byte offset of the first failed
    block: the SCSI layer reports its LBA in the sense INFORMATION field.
    `sense_key` and `asc_ascq`, when given, replace MEDIUM ERROR and the
    operation's ASC/ASCQ (a fault injector's NOT READY, ABORTED COMMAND, ...).
    """

    def __init__(
        self,
        *args: object,
        offset: int | None = None,
        sense_key: int | None = None,
        asc_ascq: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(*args)
        self.offset = offset
        self.sense_key = sense_key
        self.asc_ascq = asc_ascq


class BackendConfigError(Exception):
    """The backend's options are invalid (bad path, size, URL, ...)."""


@runtime_checkable
class DiskBackend(Protocol):
    block_size: int  # logical block size: 512 or 4096
    physical_block_exponent: int  # log2(physical blocks / logical block), usually 0
    capacity: int  # bytes, a multiple of block_size
    read_only: bool
    write_back: bool  # True: writes may sit in a volatile cache until flush() (WCE=1)
    can_unmap: bool
    can_write_zeroes: bool
    max_transfer: int  # bytes per readv/writev the backend accepts at most
    # Optional, read with getattr(backend, "survives_restart", False): True when what
    # was written outlives vmbusd (a file, an NBD server), so a controller with only
    # such LUNs can be restarted under a running guest (docs/attach-protocol.md).

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    async def writev(
        self, offset: int, buffers: Sequence[memoryview], fua: bool = False
    ) -> None: ...
    async def flush(self) -> None: ...
    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None: ...  # (offset, length)
    async def write_zeroes(self, offset: int, length: int) -> None: ...
    async def close(self) -> None: ...


# Optional members a backend may have (looked up with getattr, so backends
# without them keep working):
#   unmap_zeroes: bool                 unmapped blocks read back as zeros (LBPRZ)
#   async open() -> None               I/O the constructor may not do (connect, ...)
#   async resize(new_capacity) -> None change the capacity (the LUN then reports
#                                      UNIT ATTENTION / CAPACITY DATA HAS CHANGED)


async def open_backend(backend: DiskBackend) -> DiskBackend:
    """Run the backend's optional async `open()` step; returns the backend."""
    opener = getattr(backend, "open", None)
    if opener is not None:
        await opener()
    return backend


def load_backend(name: str, options: dict[str, Any]) -> DiskBackend:
    """Build a backend by entry-point name (`vmbusd.disk_backends`) or `module:Class` path.

    The class is called with the options as keyword arguments; constructors do no
    I/O that needs trio (an async `open()` step, where needed, is the backend's own).
    """
    import importlib
    from importlib.metadata import entry_points

    if ":" in name:
        mod_name, _, cls_name = name.partition(":")
        cls = getattr(importlib.import_module(mod_name), cls_name)
    else:
        eps = {ep.name: ep for ep in entry_points(group="vmbusd.disk_backends")}
        if name not in eps:
            raise BackendConfigError(
                f"unknown disk backend {name!r} (known: {', '.join(sorted(eps)) or 'none'})"
            )
        cls = eps[name].load()
    backend: DiskBackend = cls(**options)
    return backend
