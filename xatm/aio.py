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
its context, and its transactions run the same protocol steps (``xatm.core.steps``) with
asyncio drivers: psycopg 3's ``AsyncConnection`` for PostgreSQL, ``mysql.connector.aio``
for MySQL/MariaDB. Starting, closing, recovery and the sweeper run the threaded code on
worker threads (they never block the event loop). docs/api.md has the details.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from xatm.coordinator.arguments import (
    ManagerArguments,
    settings_arguments,
    takes_manager_arguments,
)
from xatm.coordinator.manager import TransactionManager
from xatm.core.config import Settings, load_config, validate_timeout, validate_timeout_or_zero
from xatm.core.dbapi import AsyncDBConnection, AsyncDBCursor
from xatm.core.participant import ErrorKind, Participant
from xatm.core.report import RecoveryReport
from xatm.errors import ConfigurationError, XatmError
from xatm.participants.aio_pool import AsyncParticipant
from xatm.sagas.definition import SagaResult
from xatm.transactions import ambient as _ambient
from xatm.transactions import drain as _drain
from xatm.transactions.aio import AsyncResources, AsyncTransaction
from xatm.transactions.retry import RetryPolicy

if TYPE_CHECKING:
    pass

T = TypeVar("T")

__all__ = ["AsyncDBConnection", "AsyncDBCursor", "AsyncTransaction", "AsyncTransactionManager"]


def _async_participant(participant: Participant) -> AsyncParticipant:
    from xatm.participants.mysql.participant import MySQLParticipant
    from xatm.participants.postgres.participant import PostgresParticipant

    if isinstance(participant, PostgresParticipant):
        from xatm.participants.postgres.aio import AsyncPostgres

        return AsyncPostgres(participant)
    if isinstance(participant, MySQLParticipant):
        try:
            from xatm.participants.mysql.aio import AsyncMySQL

            return AsyncMySQL(participant)
        except ImportError:
            raise ConfigurationError(
                f"resource {participant.name!r}: the asyncio API needs mysql.connector.aio"
                " (mysql-connector-python >= 8.3)"
            ) from None
    raise ConfigurationError(f"resource {participant.name!r}: no asyncio driver for it")


class AsyncTransactionManager:
    """Coordinates global transactions for asyncio code; takes the arguments of
    :class:`xatm.TransactionManager`, checked here (a bad one raises
    :class:`~xatm.ConfigurationError`, an unknown one ``TypeError``, before anything is
    opened). Use it as ``async with`` (or ``await open()`` and ``await close()``)."""

    @takes_manager_arguments  # checked here, before anything is opened
    def __init__(self, args: ManagerArguments) -> None:
        if args.max_active is not None:
            raise ConfigurationError(
                "max_active is for the threaded TransactionManager: asyncio tasks share one"
                " thread and do not contend for the GIL; bound them with an asyncio.Semaphore"
            )
        self._args = args
        self._tm: TransactionManager | None = None
        self._aio: AsyncResources | None = None
        self._closing = False

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> AsyncTransactionManager:
        """A manager built from a TOML config file (as :meth:`TransactionManager.from_config`;
        opened by ``async with`` or :meth:`open`)."""
        return cls.from_settings(load_config(path))

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncTransactionManager:
        """A manager built from settings read by :func:`xatm.load_config`."""
        a = settings_arguments(settings)
        return cls(
            a.resources,
            a.log,
            a.node_id,
            a.timeout,
            commit_markers=a.commit_markers,
            sweeper=a.sweeper,
            sweep_interval=a.sweep_interval,
            sagas=a.sagas,
            fail_fast=a.fail_fast,
            decision_retention=a.decision_retention,
            max_active=a.max_active,
        )

    async def open(self) -> AsyncTransactionManager:
        """Open the log, take the node's identity and start the sweeper (on a worker
        thread); with ``fail_fast``, every resource is checked first."""
        if self._tm is not None:
            return self
        if self._closing:
            raise XatmError("this AsyncTransactionManager is closed")
        tm = await asyncio.to_thread(TransactionManager._started, self._args)
        try:
            ctx = tm.context
            participants = {n: _async_participant(p) for n, p in ctx.resources.participants.items()}
        except BaseException:
            await asyncio.to_thread(tm.close, 0)
            raise
        self._aio = AsyncResources(ctx, participants, self._args.pool_size)
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
        return self._args.node_id

    @property
    def timeout(self) -> float:
        return self._args.timeout

    @property
    def in_use(self) -> dict[str, int]:
        """Connections handed out to transactions and not given back, per resource."""
        if self._aio is None:
            return {}
        return {n: p.in_use for n, p in self._aio.pools.items()}

    @property
    def connections_opened(self) -> dict[str, int]:
        """Connections the pools opened so far, per resource (a connection whose call was
        cancelled is reused when its state is known: ``xatm.participants.aio_pool``)."""
        if self._aio is None:
            return {}
        return {n: p.opened for n, p in self._aio.pools.items()}

    def transaction(self, timeout: float | None = None) -> AsyncTransaction:
        """A new global transaction, for ``async with tm.transaction() as tx:``.

        Refused (:class:`~xatm.TransactionError`) inside the block of another transaction
        of this manager in the same task: xatm does not nest transactions."""
        tm, aio = self._tm, self._aio
        if tm is None or aio is None or self._closing:
            raise XatmError(
                "this AsyncTransactionManager is "
                + ("closed" if self._closing else "not open: use async with, or await open()")
            )
        limit = tm.timeout if timeout is None else validate_timeout(timeout)
        _ambient.refuse_nested(tm.context)
        # registered (as running here) once it enlists a branch
        return AsyncTransaction(tm.context, tm.context.new_gtrid(limit), limit, aio)

    def _classify(self, exc: BaseException) -> ErrorKind:
        """What one error is, as the resources' participants read it (``tm.run``'s rule)."""
        tm = self._tm
        return ErrorKind.OTHER if tm is None else tm.context.classify(exc)

    async def run(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        retries: int = 3,
        timeout: float | None = None,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> T:
        """``await fn(tx)`` in a transaction and commit it; run it again (up to
        ``retries`` more times, after a backoff) when it failed in a way that is safe to
        retry, as :meth:`xatm.TransactionManager.run` (the same rule,
        ``xatm.transactions.retry``)."""
        policy = RetryPolicy.of(retries, backoff, max_backoff, self._classify)
        attempt = 0
        while True:
            attempt += 1
            tx = self.transaction(timeout)
            try:
                async with tx:
                    result = await fn(tx)
                return result
            except Exception as e:
                wait = policy.delay(attempt, e, tx.gtrid)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def run_saga(
        self,
        name: str,
        data: Any = None,
        key: str | None = None,
        *,
        wait: float = 30.0,
        actor: str = "api",
    ) -> SagaResult:
        """Run the registered saga ``name`` (as :meth:`xatm.TransactionManager.run_saga`, on a
        worker thread: its steps are plain functions using a threaded ``tx``)."""
        tm = self.sync
        if self._closing:
            raise XatmError("this AsyncTransactionManager is closed")
        _ambient.refuse_nested(tm.context)
        return await asyncio.to_thread(tm.run_saga, name, data, key, wait=wait, actor=actor)

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

    async def close(self, drain: float | None = None) -> None:
        """Let the transactions in flight finish, then close the connections, stop the
        sweeper, release the log and identity locks.

        No transaction begins once this is called; those running (in other tasks) are
        waited for up to ``drain`` seconds (the manager's ``timeout`` by default), and the
        ones still running then are rolled back, with an error saying that the manager was
        closed (``xatm.transactions.drain``, the threaded manager's rule)."""
        tm, aio = self._tm, self._aio
        if self._closing:
            return
        self._closing = True
        if tm is None or aio is None:
            return
        wait = tm.timeout if drain is None else validate_timeout_or_zero(drain)
        own = _ambient.current(tm.context)
        await asyncio.to_thread(
            _drain.drain, tm.context, wait, own=None if own is None else own.gtrid
        )
        self._tm = self._aio = None
        await aio.aclose()
        await asyncio.to_thread(tm.close, 0)
