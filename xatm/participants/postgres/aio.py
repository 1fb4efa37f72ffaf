"""PostgreSQL for asyncio: a branch's I/O on psycopg 3's ``AsyncConnection``.

Only the I/O: the statements, the vote and what each error means come from
``xatm.participants.postgres.participant`` (the same functions its sync participant calls).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from xatm.core import deadline as _deadline
from xatm.core.participant import Cursor, PhaseTwo, Prepared, Statement, Vote
from xatm.core.xid import Xid
from xatm.participants.postgres.participant import (
    CHECKPOINT,
    PostgresParticipant,
    check_committed,
    check_one_phase,
    check_open,
    commit_failed,
    finish_statement,
    not_found,
    prepare_failed,
    prepare_statement,
    promotion_bound,
    server_state,
    socket_of,
    vote_of,
)

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

    async def begin(self, conn: AsyncConn, xid: Xid, timeout: float | None = None) -> None:
        await conn.execute(self.sync.begin_statement(timeout))

    async def execute(self, conn: AsyncConn, query: Any, params: Any = None) -> Cursor:
        return await conn.execute(query, params)

    async def prepare(self, conn: AsyncConn, xid: Xid) -> Prepared:
        check_open(conn)
        try:
            cur = await conn.execute(prepare_statement(xid))
            row = await cur.fetchone()
            cur.nextset()
        except psycopg.Error as e:
            raise prepare_failed(e) from e
        vote = vote_of(cur.statusmessage, row)
        if vote is not None:
            return vote
        try:  # read-only: finish it now (if that fails, an ordinary prepared branch)
            await conn.execute(finish_statement("COMMIT", xid))
        except psycopg.Error:
            return Prepared(Vote.PREPARED)
        return Prepared(Vote.READ_ONLY)

    async def commit_one_phase(
        self, conn: AsyncConn, xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        check_one_phase(conn)
        try:
            if before:
                async with conn.pipeline():  # the statements and the commit: one round trip
                    for query, params in before:
                        await conn.execute(query, params)
                    cur = await conn.execute("COMMIT")
            else:
                cur = await conn.execute("COMMIT")
        except psycopg.Error as e:
            if self.is_connection_error(e):
                raise
            with contextlib.suppress(psycopg.Error):
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    await conn.execute("ROLLBACK")
            raise commit_failed(e) from e
        check_committed(cur.statusmessage)

    async def commit_prepared(self, conn: AsyncConn, xid: Xid) -> PhaseTwo:
        return await self._finish(conn, "COMMIT", xid)

    async def rollback_prepared(self, conn: AsyncConn, xid: Xid) -> PhaseTwo:
        return await self._finish(conn, "ROLLBACK", xid)

    async def _finish(self, conn: AsyncConn, verb: str, xid: Xid) -> PhaseTwo:
        try:
            await conn.execute(finish_statement(verb, xid))
        except psycopg.Error as e:
            if not_found(e):
                return PhaseTwo.NOT_FOUND
            raise
        return PhaseTwo.DONE

    async def rollback_active(self, conn: AsyncConn, xid: Xid) -> None:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")
