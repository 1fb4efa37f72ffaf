"""PostgreSQL for asyncio: connections on psycopg 3's ``AsyncConnection``, and the branch.

Connecting, pinging, resetting and closing are here; each branch operation is the one the
sync participant runs (``xatm.participants.postgres.operations``), run by the asyncio runner
(``xatm.participants.runner.arun``) with the asyncio executor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from xatm.core import deadline as _deadline
from xatm.core.participant import Cursor, PhaseTwo, Prepared, Statement
from xatm.core.xid import Xid
from xatm.participants.postgres import operations
from xatm.participants.postgres.executors import ASYNC
from xatm.participants.postgres.participant import (
    CHECKPOINT,
    PostgresParticipant,
    promotion_bound,
    server_state,
    socket_of,
)
from xatm.participants.runner import arun

AsyncConn = psycopg.AsyncConnection[Any]

#: the states of a session that no statement is running in: a ROLLBACK makes it idle
_KNOWN = (TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.INERROR)


class AsyncPostgres:
    """A PostgreSQL resource driven through ``psycopg.AsyncConnection``."""

    def __init__(self, sync: PostgresParticipant) -> None:
        self.sync = sync
        self.name = sync.name

    async def connect(self) -> AsyncConn:
        sync = self.sync
        conn = None
        try:
            with _deadline.waiting(self, "a connect"):  # bounded by connect_timeout
                conn = await psycopg.AsyncConnection.connect(**sync.connect_kwargs)
            setup = sync.session_setup
            if setup:
                with _deadline.bounded(self, conn, _deadline.GRACE, "the session set-up"):
                    try:
                        cur = await conn.execute(setup)
                    except psycopg.Error as e:
                        if not sync.state_refused(e):
                            raise
                        if sync.session_setup:
                            await conn.execute(sync.session_setup)
                    else:
                        if sync.reads_state:
                            await self._observe(conn, await cur.fetchone())
        except psycopg.Error as e:
            if conn is not None:
                await self.close(conn)
            raise sync.unavailable(e) from None
        except BaseException:
            if conn is not None:
                await self.close(conn)
            raise
        return conn

    def socket_of(self, conn: AsyncConn) -> int | None:
        return socket_of(conn)

    async def _observe(self, conn: AsyncConn, row: Any) -> None:
        """``PostgresParticipant.observe`` on the loop: the durable record of a change is
        written on a worker thread."""
        watch = self.sync.watch
        timeline, next_xid = server_state(row)
        if watch is None or timeline is None:
            return
        if watch.changed(self.name, timeline, next_xid) == "same":
            return
        bound = None
        try:
            cur = await conn.execute(CHECKPOINT)
            bound = promotion_bound(await cur.fetchone(), timeline)
        except psycopg.Error as e:
            if self.is_connection_error(e):
                raise
        await asyncio.to_thread(watch.record, self.name, timeline, next_xid, bound)

    async def ping(self, conn: AsyncConn) -> bool:
        try:
            await conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def is_idle(self, conn: AsyncConn) -> bool:
        return not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE

    def recoverable(self, conn: AsyncConn) -> bool:
        """Known when no statement runs: psycopg, cancelled in a statement, sends the server a
        cancel request and waits for the statement to end (the session is then in a failed
        transaction, or idle if it ended first), or closes the connection if that does not
        happen in time (closed: unknown)."""
        return not conn.closed and conn.info.transaction_status in _KNOWN

    async def reset(self, conn: AsyncConn) -> bool:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")
        return self.is_idle(conn)

    async def close(self, conn: AsyncConn) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    def is_connection_error(self, exc: BaseException) -> bool:
        return self.sync.is_connection_error(exc)

    def is_xid_in_use(self, exc: BaseException) -> bool:
        return self.sync.is_xid_in_use(exc)

    async def begin(self, conn: AsyncConn, xid: Xid, timeout: float | None = None) -> None:
        await arun(ASYNC, conn, operations.begin(self.sync.begin_statement(timeout)))

    async def execute(self, conn: AsyncConn, query: Any, params: Any = None) -> Cursor:
        return await conn.execute(query, params)

    async def prepare(self, conn: AsyncConn, xid: Xid) -> Prepared:
        return await arun(ASYNC, conn, operations.prepare(xid))

    async def commit_one_phase(
        self, conn: AsyncConn, xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        await arun(ASYNC, conn, operations.commit_one_phase(before))

    async def commit_prepared(self, conn: AsyncConn, xid: Xid) -> PhaseTwo:
        return await arun(ASYNC, conn, operations.finish("COMMIT", xid))

    async def rollback_prepared(self, conn: AsyncConn, xid: Xid) -> PhaseTwo:
        return await arun(ASYNC, conn, operations.finish("ROLLBACK", xid))

    async def rollback_active(self, conn: AsyncConn, xid: Xid) -> None:
        await arun(ASYNC, conn, operations.rollback_active())
