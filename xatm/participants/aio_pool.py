"""What an asyncio participant offers, and the per-resource pool of its connections.

An asyncio participant (``xatm.participants.postgres.aio``, ``xatm.participants.mysql.aio``) does a
branch's I/O on an asyncio driver connection; the SQL it sends and what each error means come from
the sync adapter of its database (``xatm.participants.postgres.participant``,
``xatm.participants.mysql.participant``), never written twice.

:class:`AsyncPool` is :class:`~xatm.participants.pool.Pool` for asyncio: it never waits (past
``max_idle`` a returned connection is closed), and closing is scheduled on the loop, so that
giving a connection back (``put``/``discard``, called from the protocol's steps) needs no
``await``. It counts the connections handed out and not yet given back (``in_use``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

from xatm.core import deadline as _deadline
from xatm.core.participant import Connection, Cursor, Participant, PhaseTwo, Prepared, Statement
from xatm.core.xid import Xid
from xatm.participants.pool import silent


class AsyncParticipant(Protocol):
    """Drives one resource through an asyncio driver (see ``xatm.core.participant``)."""

    name: str

    @property
    def sync(self) -> Participant:
        """The sync adapter of the same resource (its statements, errors, recovery)."""

    async def connect(self) -> Connection: ...

    async def ping(self, conn: Connection) -> bool: ...

    def is_idle(self, conn: Connection) -> bool: ...

    async def close(self, conn: Connection) -> None: ...

    def is_connection_error(self, exc: BaseException) -> bool: ...

    def socket_of(self, conn: Connection) -> int | None:
        """The file descriptor of ``conn``'s socket (``xatm.core.deadline``), or None."""

    async def begin(self, conn: Connection, xid: Xid, timeout: float | None = None) -> None: ...

    async def execute(self, conn: Connection, query: Any, params: Any = None) -> Cursor: ...

    async def prepare(self, conn: Connection, xid: Xid) -> Prepared: ...

    async def commit_one_phase(
        self, conn: Connection, xid: Xid, before: Sequence[Statement] = ()
    ) -> None: ...

    async def commit_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo: ...

    async def rollback_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo: ...

    async def rollback_active(self, conn: Connection, xid: Xid) -> None: ...


class AsyncPool:
    """Idle asyncio connections of one resource."""

    def __init__(
        self, participant: AsyncParticipant, *, max_idle: int = 8, ping_after: float = 2.0
    ) -> None:
        self.participant = participant
        self.max_idle = max_idle
        self.ping_after = ping_after
        self._idle: list[tuple[Connection, float]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.in_use = 0  # handed out, not given back yet

    async def get(self, *, fresh: bool = False, bound: float = _deadline.GRACE) -> Connection:
        """A live connection (pooled unless ``fresh``, or new: may raise
        ResourceUnavailable); a ping gets ``bound`` seconds, as in ``xatm.participants.pool``."""
        while self._idle and not fresh:
            conn, since = self._idle.pop()
            if time.monotonic() - since < self.ping_after:
                self.in_use += 1
                return conn
            try:
                with _deadline.bounded(self.participant, conn, bound, "a ping") as watch:
                    alive = await self.participant.ping(conn)
            except BaseException:  # cancelled during the ping: the connection is not kept
                self._close(conn)
                raise
            if alive and not watch.fired:
                self.in_use += 1
                return conn
            self._close(conn)
            if watch.fired:
                self.clear()
                raise silent(self.participant.sync, bound)
        conn = await self.participant.connect()
        self.in_use += 1
        return conn

    def put(self, conn: Connection) -> None:
        """Give ``conn`` back; it is closed instead if it is not clean or the pool is full."""
        self.in_use -= 1
        if not self._closed and len(self._idle) < self.max_idle and self.participant.is_idle(conn):
            self._idle.append((conn, time.monotonic()))
            return
        self._close(conn)

    def discard(self, conn: Connection) -> None:
        """Close ``conn``: it failed, or its state is unknown."""
        self.in_use -= 1
        self._close(conn)

    def clear(self) -> None:
        """Close every idle connection (for example after a server restart)."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self.participant.close(conn))
        except RuntimeError:  # no loop any more: drop it (the server ends the session)
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        self._closed = True
        self.clear()
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._closing, return_exceptions=True)
