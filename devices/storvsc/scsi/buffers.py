"""The request's data buffer: a list of memoryviews (later iovecs into guest RAM).

READ/WRITE hand sliced views of it straight to the backend (no copy); small
command responses are scattered into it, parameter lists gathered (copied once)
out of it. Nothing here ever touches a byte past `len(self)`.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataBuffer:
    """A scatter/gather list of flat byte views with its total length."""

    __slots__ = ("_views", "length", "writable")

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        views: list[memoryview] = []
        writable = True
        for buf in buffers:
            mv = memoryview(buf)
            if not mv.c_contiguous:
                raise ValueError("data buffers must be contiguous")
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            if mv.nbytes:
                views.append(mv)
                writable = writable and not mv.readonly
        self._views = views
        self.length = sum(v.nbytes for v in views)
        self.writable = writable

    def __len__(self) -> int:
        return self.length

    def views(self, nbytes: int) -> list[memoryview]:
        """The first `nbytes` as views into the original buffers (zero copy)."""
        if nbytes > self.length:
            raise ValueError("views past the end of the data buffer")
        out: list[memoryview] = []
        left = nbytes
        for v in self._views:
            if left <= 0:
                break
            take = min(left, v.nbytes)
            out.append(v[:take])
            left -= take
        return out

    def scatter(self, data: bytes | bytearray | memoryview) -> int:
        """Copy `data` into the buffer, truncated to fit; returns bytes copied."""
        src = memoryview(data)
        done = 0
        for v in self._views:
            if done >= src.nbytes:
                break
            take = min(v.nbytes, src.nbytes - done)
            v[:take] = src[done : done + take]
            done += take
        return done

    def gather(self, nbytes: int) -> bytes:
        """Copy the first `nbytes` out (at most the buffer length): one snapshot of guest data."""
        nbytes = min(nbytes, self.length)
        parts = []
        left = nbytes
        for v in self._views:
            if left <= 0:
                break
            take = min(left, v.nbytes)
            parts.append(v[:take].tobytes())
            left -= take
        return b"".join(parts)
