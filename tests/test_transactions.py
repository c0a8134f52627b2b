import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.transactions import TransactionError, TransactionTracker


def test_issue_and_complete_round_trip() -> None:
    t: TransactionTracker[str] = TransactionTracker()
    a, b = t.issue("a"), t.issue("b")
    assert a != b and 0 not in (a, b)
    assert t.complete(b) == "b"
    assert t.complete(a) == "a"
    assert len(t) == 0


@pytest.mark.parametrize("bad", [0, 12345])
def test_zero_and_unknown_ids_rejected(bad: int) -> None:
    t: TransactionTracker[int] = TransactionTracker()
    t.issue(1)
    with pytest.raises(TransactionError):
        t.complete(bad)
    assert len(t) == 1


def test_duplicate_completion_rejected() -> None:
    t: TransactionTracker[int] = TransactionTracker()
    tid = t.issue(7)
    t.complete(tid)
    with pytest.raises(TransactionError):
        t.complete(tid)


def test_bounded_table() -> None:
    t: TransactionTracker[int] = TransactionTracker(max_outstanding=3)
    for i in range(3):
        t.issue(i)
    with pytest.raises(OverflowError):
        t.issue(3)


def test_wrap_skips_outstanding_ids() -> None:
    t: TransactionTracker[int] = TransactionTracker()
    t._next = (1 << 63) - 1  # force the wrap
    last = t.issue(0)
    assert last == (1 << 63) - 1
    first = t.issue(1)
    assert first == 1
    # 1 is now outstanding; after another wrap it must be skipped
    t._next = 1
    assert t.issue(2) == 2


@given(st.lists(st.booleans(), max_size=200))
def test_ids_unique_while_outstanding(ops: list[bool]) -> None:
    t: TransactionTracker[int] = TransactionTracker()
    live: set[int] = set()
    for issue in ops:
        if issue or not live:
            tid = t.issue(0)
            assert tid not in live and tid != 0
            live.add(tid)
        else:
            tid = live.pop()
            t.complete(tid)
