"""Run one step of the protocol on several branches at once.

Prepare and commit are each one round trip per branch, and the branches live on different
servers: doing them side by side makes a two-branch commit cost about one round trip per
phase instead of two. The first branch runs on the calling thread; the others on a shared
pool of worker threads. Every call runs to its end (no call is abandoned half-way), and the
results, or the exceptions, come back in the order of the calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Outcome(Generic[T]):
    """The result of one call, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: T | None = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error


def _call(fn: Callable[[], T]) -> Outcome[T]:
    try:
        return Outcome(fn())
    except BaseException as e:  # reported to the caller
        return Outcome(None, e)


class Fanout:
    """Runs a list of calls concurrently (or one after another if ``parallel`` is off)."""

    def __init__(self, parallel: bool = True, max_workers: int = 32) -> None:
        self.parallel = parallel
        self._pool: ThreadPoolExecutor | None = None
        self._max_workers = max_workers

    def run(self, calls: Sequence[Callable[[], T]]) -> list[Outcome[T]]:
        if not self.parallel or len(calls) < 2:
            return [_call(fn) for fn in calls]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="xatm-branch")
        futures: list[Future[Outcome[T]]] = [self._pool.submit(_call, fn) for fn in calls[1:]]
        first = _call(calls[0])
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
