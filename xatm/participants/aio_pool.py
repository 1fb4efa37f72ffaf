"""What an asyncio participant offers, and the per-resource pool of its connections.

An asyncio participant (``xatm.participants.postgres.aio``, ``xatm.participants.mysql.aio``) does a
branch's I/O on an asyncio driver connection; the SQL it sends and what each error means come from
the sync adapter of its database (``xatm.participants.postgres.participant``,
``xatm.participants.mysql.participant``), never written twice.

:class:`AsyncPool` is :class:`~xatm.participants.pool.Pool` for asyncio: it never waits (past
``max_idle`` a returned connection is closed), and closing is scheduled on the loop, so that
giving a connection back (``put``/``discard``, called from the protocol's steps) needs no
``await``. It counts the connections handed out and not yet given back (``in_use``) and the
connections it opened (``opened``).

**A connection whose call failed or was cancelled** (``discard``) is closed only if its state
is unknown. If its participant can tell that it is known (``recoverable``: for PostgreSQL,
no statement running, as psycopg leaves it once the cancel of an interrupted statement has
completed), a task on the loop rolls it back (``reset``, bounded like a ping) and pools it
again (counted in ``resets``): a cancelled transaction then costs a ROLLBACK round trip, not
a new session (a server fork, authentication, session settings). A reset that fails, times
out or is itself cancelled closes the connection. Only ``aclose`` waits for it, and ``get``
when no connection is idle (a round trip is cheaper than a new session).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Sequence
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

    def recoverable(self, conn: Connection) -> bool:
        """After a call on ``conn`` failed or was interrupted: is its state known, so that
        ``reset`` can bring it back to idle? False when it is unknown (a statement may still
        be running, a reply half read, the session closed)."""

    async def reset(self, conn: Connection) -> bool:
        """Roll back whatever ``conn``'s session holds (``recoverable`` said it is known);
        True if it is idle afterwards. A driver error may be raised: the caller closes it."""

    async def close(self, conn: Connection) -> None: ...

    def is_connection_error(self, exc: BaseException) -> bool: ...

    def is_xid_in_use(self, exc: BaseException) -> bool:
        """As ``Participant.is_xid_in_use``, for this driver's errors."""

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
        self._resetting: set[asyncio.Task[None]] = set()  # resets under way (in _closing too)
        self._closed = False
        self.in_use = 0  # handed out, not given back yet
        self.opened = 0  # connections opened
        self.resets = 0  # connections pooled again after a failed or cancelled call

    async def get(self, *, fresh: bool = False, bound: float = _deadline.GRACE) -> Connection:
        """A live connection (pooled unless ``fresh``, or new: may raise
        ResourceUnavailable); a ping gets ``bound`` seconds, as in ``xatm.participants.pool``.
        With no idle connection but resets under way, it waits for one (a round trip, bounded
        like a ping) rather than open a connection more."""
        while not self._idle and self._resetting and not fresh:
            await asyncio.wait(set(self._resetting), return_when=asyncio.FIRST_COMPLETED)
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
        self.opened += 1
        self.in_use += 1
        return conn

    def put(self, conn: Connection) -> None:
        """Give ``conn`` back; it is closed instead if it is not clean or the pool is full."""
        self.in_use -= 1
        self._keep(conn)

    def _keep(self, conn: Connection) -> None:
        if not self._closed and len(self._idle) < self.max_idle and self.participant.is_idle(conn):
            self._idle.append((conn, time.monotonic()))
            return
        self._close(conn)

    def discard(self, conn: Connection, *, bound: float = _deadline.GRACE) -> None:
        """Give back ``conn`` after a call on it failed or was cancelled: reset and pooled
        again if its state is known (on the loop, within ``bound`` seconds), else closed."""
        self.in_use -= 1
        if self._closed or not self.participant.recoverable(conn):
            self._close(conn)
            return
        task = self._spawn(self._reset(conn, bound))
        if task is not None:
            self._resetting.add(task)
            task.add_done_callback(self._resetting.discard)

    async def _reset(self, conn: Connection, bound: float) -> None:
        clean = False
        try:
            with _deadline.bounded(self.participant, conn, bound, "a reset") as watch:
                clean = await self.participant.reset(conn)
            clean = clean and not watch.fired
        except BaseException:  # a driver error, or cancelled (the loop is closing)
            clean = False
        if clean and not self._closed:
            self.resets += 1
            self._keep(conn)
        else:
            await self.participant.close(conn)

    def clear(self) -> None:
        """Close every idle connection (for example after a server restart)."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        self._spawn(self.participant.close(conn))

    def _spawn(self, call: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``call`` (a close or a reset) on the loop; ``aclose`` waits for it."""
        try:
            task = asyncio.get_running_loop().create_task(call)
        except RuntimeError:  # no loop any more: drop it (the server ends the session)
            call.close()
            return None
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def aclose(self) -> None:
        self._closed = True
        self.clear()
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._closing, return_exceptions=True)
