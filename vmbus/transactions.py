"""Transaction ids for requests that expect a completion.

A guest completion (VM_PKT_COMP) echoes the trans_id of our request; the guest
controls that field, so an id we did not issue, one already completed, and the
reserved id 0 are all rejected rather than trusted (Linux's requestor table does
the same the other way round).
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

MAX_OUTSTANDING_DEFAULT = 4096


class TransactionError(Exception):
    """A completion that names no outstanding request (unknown, duplicate or zero id)."""


class TransactionTracker(Generic[T]):
    """Issues ids for outstanding requests and matches completions to them.

    Ids start at 1 and wrap within 1..2**63-1, skipping ids still outstanding, so an
    id is never reused while its request is in flight. The table is bounded.
    """

    _ID_LIMIT = 1 << 63

    def __init__(self, max_outstanding: int = MAX_OUTSTANDING_DEFAULT) -> None:
        self._max = max_outstanding
        self._next = 1
        self._pending: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self._max

    def issue(self, context: T) -> int:
        """Reserve an id for a request; raise OverflowError when the table is full."""
        if self.full:
            raise OverflowError(f"{self._max} requests already outstanding")
        tid = self._next
        while tid in self._pending:
            tid = tid + 1 if tid + 1 < self._ID_LIMIT else 1
        self._next = tid + 1 if tid + 1 < self._ID_LIMIT else 1
        self._pending[tid] = context
        return tid

    def complete(self, trans_id: int) -> T:
        """Match a completion; the id must be outstanding (0, unknown and repeated ids fail)."""
        if trans_id == 0:
            raise TransactionError("completion with reserved transaction id 0")
        try:
            return self._pending.pop(trans_id)
        except KeyError:
            raise TransactionError(
                f"completion for unknown or already completed transaction id {trans_id:#x}"
            ) from None

    def cancel_all(self) -> list[T]:
        """Forget every outstanding request (channel reset) and return their contexts."""
        items = list(self._pending.values())
        self._pending.clear()
        return items
