"""MySQL / MariaDB executors: perform operations' commands (a DB-API driver, mysql.connector.aio).

The only code that calls a driver for a branch's operations
(``xatm.participants.mysql.operations``); it decides nothing: a driver error is raised to the
runner, which throws it into the operation. Both note a :class:`~.operations.Mark` in their
participant's :class:`XAConnections`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from xatm.participants.mysql.drivers import MySQLDriver
from xatm.participants.mysql.operations import Command, Consume, Execute, Run


class XAConnections:
    """The connections whose XA state is not known to be idle (a branch was started on them
    and not seen to end): never pooled. Safe to share between threads."""

    def __init__(self) -> None:
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def mark(self, conn: Any, in_xa: bool) -> None:
        with self._lock:
            if in_xa:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def __contains__(self, conn: Any) -> bool:
        with self._lock:
            return conn in self._conns


class SyncExecutor:
    """Performs commands through a DB-API ``driver`` (``xatm.participants.mysql.drivers``)."""

    def __init__(self, driver: MySQLDriver, in_xa: XAConnections) -> None:
        self.driver = driver
        self.in_xa = in_xa

    def perform(self, conn: Any, command: Command) -> None:
        if isinstance(command, Run):
            self.driver.run(conn, list(command.statements))
        elif isinstance(command, Execute):
            cur = self.driver.cursor(conn)
            cur.execute(command.query, command.params)
            cur.close()
        elif isinstance(command, Consume):
            self.driver.consume(conn)
        else:
            self.in_xa.mark(conn, command.in_xa)


class AsyncExecutor:
    """Performs commands on ``mysql.connector.aio`` connections."""

    def __init__(self, in_xa: XAConnections) -> None:
        self.in_xa = in_xa

    async def perform(self, conn: Any, command: Command) -> None:
        if isinstance(command, Run):
            await run(conn, command.statements)
        elif isinstance(command, Execute):
            cur = await conn.cursor(buffered=True)
            await cur.execute(command.query, command.params)
            await cur.close()
        elif isinstance(command, Consume):
            if conn.unread_result:
                await conn.consume_results()
        else:
            self.in_xa.mark(conn, command.in_xa)


async def run(conn: Any, statements: tuple[str, ...]) -> None:
    """Send statements that return no rows on a mysql.connector.aio connection, in one query
    (one round trip), as the sync drivers do (mysql-connector sets MULTI_STATEMENTS by
    default): the server stops at the first that fails, and its error is raised."""
    if len(statements) == 1:
        await conn.cmd_query(statements[0])
        return
    async for _ in conn.cmd_query_iter("; ".join(statements)):
        pass
