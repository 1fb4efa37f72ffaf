"""A small per-resource connection pool that notices dead connections.

Connections are handed out one per branch and given back only when they are known to be
clean (outside any transaction). A connection that failed in any way is closed instead of
being pooled. A pooled connection that sat idle for more than ``ping_after`` seconds is
pinged before it is handed out, so a restarted server costs one failed ping, not a failed
transaction; the ping is bounded (``xatm.core.deadline``), so a silent server costs that bound,
not its silence. The pool never blocks: past ``max_idle`` a returned connection is closed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from xatm.core import deadline as _deadline
from xatm.core.participant import Connection, Participant
from xatm.errors import ResourceUnavailable


def silent(participant: Participant, seconds: float, what: str = "a ping") -> ResourceUnavailable:
    """The error for a call whose server did not answer in time (``xatm.core.deadline`` cut it)."""
    return ResourceUnavailable(
        f"resource {participant.name!r} ({participant.spec.redacted()}) did not answer {what}"
        f" within {seconds:.3g} s: its connection was cut",
        resource=participant.name,
    )


class Pool:
    """Idle connections of one resource."""

    def __init__(
        self, participant: Participant, *, max_idle: int = 8, ping_after: float = 2.0
    ) -> None:
        self.participant = participant
        self.max_idle = max_idle
        self.ping_after = ping_after
        self._idle: list[tuple[Connection, float]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.checked = False  # set once the resource passed its fitness check

    def get(self, bound: float = _deadline.GRACE) -> Connection:
        """A live connection (pooled, or new: may raise ResourceUnavailable). A ping gets
        ``bound`` seconds; one that gets no answer in that time means the server is silent:
        every idle connection is closed and ResourceUnavailable raised, with no connect."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            if time.monotonic() - since < self.ping_after:
                return conn
            with _deadline.bounded(self.participant, conn, bound, "a ping") as watch:
                alive = self.participant.ping(conn)
            if alive and not watch.fired:
                return conn
            self.participant.close(conn)
            if watch.fired:
                self.clear()
                raise silent(self.participant, bound)
        return self.participant.connect()

    def put(self, conn: Connection) -> None:
        """Give ``conn`` back; it is closed instead if it is not clean or the pool is full."""
        if self.participant.is_idle(conn):
            with self._lock:
                if not self._closed and len(self._idle) < self.max_idle:
                    self._idle.append((conn, time.monotonic()))
                    return
        self.participant.close(conn)

    def discard(self, conn: Connection) -> None:
        """Close ``conn``: it failed, or its state is unknown."""
        self.participant.close(conn)

    def clear(self) -> None:
        """Close every idle connection (for example after a server restart)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self.participant.close(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.clear()

    def __repr__(self) -> str:
        info: dict[str, Any] = {"resource": self.participant.name, "idle": len(self._idle)}
        return f"Pool({info})"
