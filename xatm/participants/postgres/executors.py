"""PostgreSQL executors: perform an operation's commands on psycopg connections, sync or asyncio.

The only code that calls psycopg for a branch's operations
(``xatm.participants.postgres.operations``); it decides nothing: a driver error is raised to
the runner, which throws it into the operation. A :class:`~.operations.Send` is one simple
query (its statements joined by ``;``, the bound ones through psycopg's client-side cursor);
the sync executor can also send one in pipeline mode without waiting for its answer (each
statement on its own, all on the wire at once), for ``xatm.participants.runner.start``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import psycopg

from xatm.participants.postgres.operations import Command, Reply, Send, Status


def _query(command: Send, client: Any) -> str:
    """The one simple query of ``command`` (``client``: a client-side cursor, to bind the
    parameters of its bound statements)."""
    if not command.bound:
        return "; ".join(command.statements)
    return "; ".join([*(client.mogrify(q, p) for q, p in command.bound), *command.statements])


class SyncExecutor:
    """Performs commands on a ``psycopg.Connection`` (autocommit)."""

    def perform(self, conn: psycopg.Connection[Any], command: Command) -> Any:
        if isinstance(command, Status):
            return conn.info.transaction_status
        cur: psycopg.Cursor[Any]
        if command.bound:
            cur = client = psycopg.ClientCursor(conn)
            client.execute(_query(command, client))
        elif len(command.statements) == 1:  # most commands: one statement, one result
            cur = conn.execute(command.statements[0])
            return Reply(cur.statusmessage, cur.fetchone() if command.row else None)
        else:
            cur = conn.execute(_query(command, None))
        row = cur.fetchone() if command.row else None
        while cur.nextset():
            pass
        return Reply(cur.statusmessage, row)

    def send(self, conn: psycopg.Connection[Any], command: Command) -> Callable[[], Reply] | None:
        """Put ``command``'s statements on the wire in pipeline mode, each as a statement of
        its own; the returned call waits for the answers (one round trip in all)."""
        if not isinstance(command, Send) or command.bound:
            return None
        pipeline = conn.pipeline()
        try:
            pipeline.__enter__()
            cursors = [conn.execute(statement) for statement in command.statements]
        except BaseException as e:
            _leave(pipeline, e)
            raise

        def wait() -> Reply:
            pipeline.__exit__(None, None, None)
            row = cursors[0].fetchone() if command.row else None
            return Reply(cursors[-1].statusmessage, row)

        return wait


class AsyncExecutor:
    """Performs commands on a ``psycopg.AsyncConnection`` (autocommit)."""

    async def perform(self, conn: psycopg.AsyncConnection[Any], command: Command) -> Any:
        if isinstance(command, Status):
            return conn.info.transaction_status
        cur: psycopg.AsyncCursor[Any]
        if command.bound:
            cur = client = psycopg.AsyncClientCursor(conn)
            await client.execute(_query(command, client))
        else:
            cur = await conn.execute(_query(command, None))
        row = await cur.fetchone() if command.row else None
        while cur.nextset():
            pass
        return Reply(cur.statusmessage, row)


def _leave(pipeline: Any, error: BaseException) -> None:
    """Leave a pipeline block after ``error``, as ``with`` would."""
    with contextlib.suppress(Exception):
        pipeline.__exit__(type(error), error, error.__traceback__)


#: the executors (they keep no state)
SYNC = SyncExecutor()
ASYNC = AsyncExecutor()
