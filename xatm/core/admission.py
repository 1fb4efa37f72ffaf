"""At most N transactions of a manager in their block at once; the others wait their turn.

A manager's ``max_active`` (``xatm.coordinator.arguments``) bounds how many of its threaded
transactions are inside their ``with`` block at a time. Past it, a transaction waits at the
start of its block, first come first served, for one to leave, never past its own deadline.
Many threads in one process share one GIL: past the concurrency that keeps the servers busy,
more threads only add hand-overs of the GIL and wake-ups, which cost CPU per transaction (see
docs/benchmarks.md); waiting here costs one parked lock instead.

A slot is handed straight to the first waiter when a transaction leaves, so a thread that
arrives later never takes it first.
"""

from __future__ import annotations

import threading
from collections import deque


class Admission:
    """The slots of one manager (``limit`` None: unlimited, nothing is counted)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._free = 0 if limit is None else limit
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()

    def enter(self, seconds: float) -> bool:
        """Take a slot, waiting at most ``seconds`` for one; False if none came in time."""
        if self.limit is None:
            return True
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if turn.acquire(timeout=max(seconds, 0.0)):
            return True
        with self._lock:
            if turn in self._waiters:
                self._waiters.remove(turn)
                return False
        return True  # handed over between the timeout and the lock: the slot is ours

    def leave(self) -> None:
        """Give a slot back: to the first waiter, if one waits."""
        if self.limit is None:
            return
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1

    @property
    def waiting(self) -> int:
        """How many transactions wait for a slot now."""
        return len(self._waiters)

    @property
    def active(self) -> int:
        """How many slots are taken now (0 when unlimited: nothing is counted)."""
        if self.limit is None:
            return 0
        with self._lock:
            return self.limit - self._free
