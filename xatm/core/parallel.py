"""Run one step of the protocol on several branches at once, without threads.

Prepare and commit are each a round trip per branch, to different servers. A participant
whose driver can send without waiting (psycopg's pipeline mode) *starts* the step: the
command is on the wire when ``start`` returns, and the returned call waits for the answer.
So the coordinator starts those branches first, then works through the others (which run
their step when started), then collects the answers: the round trips overlap on one thread,
with none of the cost of handing work to other threads. Every step runs to its end (none is
abandoned half-way), and the results, or the exceptions, come back in the order of the
branches. With ``overlap=False`` each branch's step is finished before the next begins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
X = TypeVar("X")


class Outcome(Generic[T]):
    """The result of one step, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: T | None = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error


def overlapped(
    items: Sequence[X],
    start: Callable[[X], Callable[[], T]],
    *,
    sends_first: Callable[[X], bool],
    overlap: bool = True,
) -> list[Outcome[T]]:
    """Start every item's step (``sends_first`` ones before the others), then finish each."""
    order = sorted(range(len(items)), key=lambda i: not sends_first(items[i]))
    outcomes: list[Outcome[T]] = [Outcome() for _ in items]
    pending: list[tuple[int, Callable[[], T]]] = []
    for i in order:
        try:
            finish = start(items[i])
        except BaseException as e:  # reported to the caller
            outcomes[i] = Outcome(None, e)
            continue
        if overlap:
            pending.append((i, finish))
        else:
            outcomes[i] = _finish(finish)
    for i, finish in pending:
        outcomes[i] = _finish(finish)
    return outcomes


def _finish(finish: Callable[[], T]) -> Outcome[T]:
    try:
        return Outcome(finish())
    except BaseException as e:  # reported to the caller
        return Outcome(None, e)
