"""One fsync for every caller waiting on it: group commit of one file or directory."""

from __future__ import annotations

import threading
from collections.abc import Callable


class GroupSync:
    """``sync()`` returns once a call of ``flush`` that began after it was called has
    finished. Concurrent callers share flushes: the first one leads (flushes for everyone
    who asked so far), the others wait for it; an error reaches the leader only (its
    waiters lead the next flush, which meets the error again or succeeds)."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition(threading.Lock())
        self._asked = 0
        self._done = 0
        self._busy = False

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            mine = self._asked
            while self._done < mine:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, target = True, self._asked
                self._cond.release()
                try:
                    self._flush()
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
                self._done = max(self._done, target)
