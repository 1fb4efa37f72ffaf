"""The asyncio API: :class:`AsyncTransactionManager` and its :class:`AsyncTransaction`.

::

    from xatm.aio import AsyncTransactionManager

    async with AsyncTransactionManager(resources=..., log=..., node_id=...) as tm:
        async with tm.transaction() as tx:
            await tx.execute("ledger", "UPDATE ...", params)
            await tx.execute("wallet", "UPDATE ...", params)
        report = await tm.recover()

Same arguments, protocol, log, recovery, identity locks, failpoints and audit trail as
:class:`xatm.TransactionManager`: the asyncio manager is built on one (``sync``), sharing
its context, and its transactions run the same protocol steps (``xatm._steps``) with
asyncio drivers: psycopg 3's ``AsyncConnection`` for PostgreSQL, ``mysql.connector.aio``
for MySQL/MariaDB. Starting, closing, recovery and the sweeper run the threaded code on
worker threads (they never block the event loop). docs/api.md has the details.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from ._aio_pool import AsyncParticipant
from ._aio_transaction import AsyncResources, AsyncTransaction
from ._config import validate_timeout
from ._manager import TransactionManager
from ._participant import Participant
from ._report import RecoveryReport
from ._urls import ResourceSpec
from .errors import ConfigurationError, XatmError

__all__ = ["AsyncTransaction", "AsyncTransactionManager"]


def _async_participant(participant: Participant) -> AsyncParticipant:
    from ._mysql import MySQLParticipant
    from ._postgres import PostgresParticipant

    if isinstance(participant, PostgresParticipant):
        from ._aio_postgres import AsyncPostgres

        return AsyncPostgres(participant)
    if isinstance(participant, MySQLParticipant):
        try:
            from ._aio_mysql import AsyncMySQL

            return AsyncMySQL(participant)
        except ImportError:
            raise ConfigurationError(
                f"resource {participant.name!r}: the asyncio API needs mysql.connector.aio"
                " (mysql-connector-python >= 8.3)"
            ) from None
    raise ConfigurationError(f"resource {participant.name!r}: no asyncio driver for it")


class AsyncTransactionManager:
    """Coordinates global transactions for asyncio code; takes the arguments of
    :class:`xatm.TransactionManager`. Use it as ``async with`` (or ``await open()`` and
    ``await close()``)."""

    def __init__(
        self,
        resources: Mapping[str, str | ResourceSpec | Any],
        log: str | os.PathLike[str],
        node_id: str,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self._args: tuple[Any, ...] = (resources, log, node_id, timeout)
        self._kwargs = kwargs
        self._tm: TransactionManager | None = None
        self._aio: AsyncResources | None = None

    async def open(self) -> AsyncTransactionManager:
        """Open the log, take the node's identity and start the sweeper (on a worker
        thread); the argument errors of :class:`xatm.TransactionManager` are raised here."""
        if self._tm is not None:
            return self
        tm = await asyncio.to_thread(TransactionManager, *self._args, **self._kwargs)
        try:
            ctx = tm.context
            participants = {n: _async_participant(p) for n, p in ctx.resources.participants.items()}
        except BaseException:
            await asyncio.to_thread(tm.close)
            raise
        self._aio = AsyncResources(ctx, participants, int(self._kwargs.get("pool_size", 32)))
        self._tm = tm
        return self

    async def __aenter__(self) -> AsyncTransactionManager:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def sync(self) -> TransactionManager:
        """The threaded manager underneath (inspector, ``indoubt()``, ``show()``, sagas...:
        blocking calls, to run with ``asyncio.to_thread``)."""
        if self._tm is None:
            raise XatmError("this AsyncTransactionManager is not open")
        return self._tm

    @property
    def node_id(self) -> str:
        return self.sync.node_id

    @property
    def in_use(self) -> dict[str, int]:
        """Connections handed out to transactions and not given back, per resource."""
        if self._aio is None:
            return {}
        return {n: p.in_use for n, p in self._aio.pools.items()}

    def transaction(self, timeout: float | None = None) -> AsyncTransaction:
        """A new global transaction, for ``async with tm.transaction() as tx:``."""
        tm, aio = self._tm, self._aio
        if tm is None or aio is None:
            raise XatmError("this AsyncTransactionManager is not open")
        limit = tm.timeout if timeout is None else validate_timeout(timeout)
        # registered (as running here) once it enlists a branch
        return AsyncTransaction(tm.context, tm.context.new_gtrid(limit), limit, aio)

    async def recover(
        self,
        *,
        dry_run: bool = False,
        actor: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RecoveryReport:
        """One recovery pass (the threaded manager's, on a worker thread): the same decision
        rules, over the same log and resources."""
        tm = self.sync
        return await asyncio.to_thread(
            lambda: tm.recover(dry_run=dry_run, actor=actor, progress=progress)
        )

    async def close(self) -> None:
        """Close the connections, stop the sweeper, release the log and identity locks."""
        tm, aio = self._tm, self._aio
        self._tm = self._aio = None
        if aio is not None:
            await aio.aclose()
        if tm is not None:
            await asyncio.to_thread(tm.close)
