"""MySQL / MariaDB for asyncio: connections on ``mysql.connector.aio``, and the branch.

Connecting, pinging and closing are here; each branch operation is the one the sync
participant runs (``xatm.participants.mysql.operations``), run by the asyncio runner
(``xatm.participants.runner.arun``) with the asyncio executor. mysql.connector.aio raises
mysql-connector's own error classes, so the operations read errors with the mysql-connector
driver of ``xatm.participants.mysql.drivers``. docs/api.md says why this driver and not
aiomysql or asyncmy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from xatm.core import deadline as _deadline
from xatm.core.participant import Cursor, PhaseTwo, Prepared, Statement
from xatm.core.urls import DEFAULT_CONNECT_TIMEOUT
from xatm.core.xid import Xid
from xatm.participants.mysql import operations
from xatm.participants.mysql.drivers import by_name
from xatm.participants.mysql.executors import AsyncExecutor, XAConnections
from xatm.participants.mysql.participant import MySQLParticipant
from xatm.participants.mysql.statements import XAER_DUPID
from xatm.participants.runner import arun


class AsyncMySQL:
    """A MySQL or MariaDB resource driven through ``mysql.connector.aio``."""

    def __init__(self, sync: MySQLParticipant) -> None:
        import mysql.connector.aio  # noqa: F401 -- a missing module fails here, at start

        self.sync = sync
        self.name = sync.name
        self._driver = by_name("mysqlconnector")
        self._errors = self._driver.errors()
        self._errors_or_os: tuple[type[BaseException], ...] = (*self._errors, OSError)
        spec = sync.spec
        self._kwargs = self._driver.connect_kwargs(
            host=spec.host,
            port=spec.port,
            user=spec.user or "",
            password=spec.password or "",
            database=spec.database,
            timeout=DEFAULT_CONNECT_TIMEOUT,
            options=[(k, v) for k, v in spec.options if k not in ("use_pure", "driver")],
        )
        #: connections whose XA state is not known to be idle: never pooled
        self._in_xa = XAConnections()
        self._executor = AsyncExecutor(self._in_xa)

    async def connect(self) -> Any:
        try:
            with _deadline.waiting(self, "a connect"):
                kwargs = self._kwargs
                try:
                    return await self._connect(kwargs)
                except TypeError:
                    # mysql.connector.aio (9.x) fails after connecting to a server without
                    # TLS (its cipher check unpacks None): that connection was plain text
                    # already, so ask for plain text (a URL that requires TLS still fails)
                    if kwargs.get("ssl_disabled") or _requires_tls(kwargs):
                        raise
                    self._kwargs = kwargs = {**kwargs, "ssl_disabled": True}
                    return await self._connect(kwargs)
        except self._errors_or_os as e:
            raise self.sync.unavailable(e) from None

    async def _connect(self, kwargs: dict[str, Any]) -> Any:
        """A connection, its handshake included within the connect timeout:
        mysql.connector.aio's ``connection_timeout`` bounds the TCP connect only, and a
        server that accepts but never greets would hold the handshake for ever."""
        import mysql.connector.aio

        if _SPECIAL.intersection(kwargs):  # the driver's own connect() handles those
            async with asyncio.timeout(DEFAULT_CONNECT_TIMEOUT):
                return await mysql.connector.aio.connect(**kwargs)
        conn = mysql.connector.aio.MySQLConnection(**kwargs)
        try:
            async with asyncio.timeout(DEFAULT_CONNECT_TIMEOUT):
                await conn.connect()
        except TimeoutError:
            await conn.shutdown()  # closes the socket; sends nothing
            raise self._driver.module.errors.OperationalError(
                errno=2013,
                msg="Lost connection to MySQL server at 'handshake': no answer within the"
                f" connect timeout ({DEFAULT_CONNECT_TIMEOUT} s)",
            ) from None
        except BaseException:
            await conn.shutdown()
            raise
        return conn

    def socket_of(self, conn: Any) -> int | None:
        """The socket under ``conn``'s asyncio stream (None once it is closed)."""
        writer = getattr(getattr(conn, "_socket", None), "_writer", None)
        sock = None if writer is None else writer.get_extra_info("socket")
        try:
            fd = None if sock is None else sock.fileno()
        except OSError:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    async def ping(self, conn: Any) -> bool:
        try:
            await conn.ping(reconnect=False)
        except self._errors_or_os:
            return False
        return True

    def is_idle(self, conn: Any) -> bool:
        if conn in self._in_xa:
            return False
        return bool(conn.is_socket_connected()) and not conn.unread_result

    def recoverable(self, conn: Any) -> bool:
        """Never: mysql.connector.aio cannot cancel a statement, so a call interrupted
        midway leaves its reply unread or half read, and a later statement could read that
        stale reply as its own. Such a connection is closed (the server rolls back its
        unprepared work); closing a MariaDB session costs no fork."""
        return False

    async def reset(self, conn: Any) -> bool:
        return False  # not called: nothing is recoverable

    async def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    def is_connection_error(self, exc: BaseException) -> bool:
        return self._driver.is_connection_error(exc)

    def is_xid_in_use(self, exc: BaseException) -> bool:
        return isinstance(exc, self._errors) and self._driver.errno(exc) == XAER_DUPID

    async def begin(self, conn: Any, xid: Xid, timeout: float | None = None) -> None:
        await arun(self._executor, conn, operations.begin(xid))

    async def execute(self, conn: Any, query: Any, params: Any = None) -> Cursor:
        cur = await conn.cursor(buffered=True)
        await cur.execute(query, params)
        return cur

    async def prepare(self, conn: Any, xid: Xid) -> Prepared:
        return await arun(self._executor, conn, operations.prepare(self._driver, xid))

    async def commit_one_phase(self, conn: Any, xid: Xid, before: Sequence[Statement] = ()) -> None:
        await arun(self._executor, conn, operations.commit_one_phase(self._driver, xid, before))

    async def commit_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return await arun(self._executor, conn, operations.finish(self._driver, "COMMIT", xid))

    async def rollback_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return await arun(self._executor, conn, operations.finish(self._driver, "ROLLBACK", xid))

    async def rollback_active(self, conn: Any, xid: Xid) -> None:
        await arun(self._executor, conn, operations.rollback_active(self._driver, xid))


#: connection arguments that mysql.connector.aio's ``connect()`` turns into something else
#: than one plain connection (failover hosts, option files, DNS SRV, a pool)
_SPECIAL = frozenset(
    {"failover", "option_files", "read_default_file", "dns_srv", "pool_name", "pool_size"}
)


def _requires_tls(kwargs: dict[str, Any]) -> bool:
    return any(k.startswith("ssl_") and k != "ssl_disabled" and v for k, v in kwargs.items())
