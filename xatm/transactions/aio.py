"""One global transaction for asyncio: the same protocol as ``xatm.transactions.transaction``,
awaited.

:class:`AsyncTransaction` inherits the protocol (``xatm.transactions.protocol``'s I/O-free
steps, see ``xatm.core.steps``) and what both drivers share around it
(``xatm.transactions.managed``), and only runs its operations: the branches' calls
concurrently on asyncio driver connections, the log's forced write off the loop
(``xatm.log.aio``: the file log's group commit forces a batch of COMMIT records with one
fsync and wakes the loop once for it), so that no fsync blocks the event loop.

**Cancellation.** The end of the transaction (commit or rollback) runs in a task of its own
that the caller awaits without ever cancelling it (a shield). If the caller is cancelled
meanwhile, the transaction is asked to refuse its decision (``refuse_decision``): before the
decision that means it rolls back; once the decision is being made it commits, phase 2
included. Either way the caller waits for that end (its connections given back, nothing
left waiting) and then gets its ``CancelledError``; ``tx.state`` says the outcome. A
cancellation inside the block (at ``await tx.execute(...)``) ends the interrupted branch:
its connection is rolled back and given back to the pool when its state is known after the
cancel (PostgreSQL), closed otherwise; either way its unprepared work is rolled back, and the
block's end rolls back the rest.

**Several tasks** (``asyncio.gather`` over ``tx.execute``): an ``asyncio.Lock`` per resource
is held while its branch is enlisted and while a statement runs on it; the end waits for the
statements still running, and a commit that had to wait rolls back
(``xatm.transactions.protocol.TransactionCore._stop_work_steps``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from xatm.core import deadline as _deadline
from xatm.core.dbapi import AsyncDBConnection, AsyncDBCursor, C, Params, as_kind
from xatm.core.parallel import Outcome
from xatm.core.participant import Connection, PhaseTwo, Prepared
from xatm.core.steps import (
    AwaitWork,
    Branch,
    CommitOnePhase,
    CommitPrepared,
    LogCommit,
    LogEnd,
    Operation,
    Prepare,
    Rollback,
    Steps,
)
from xatm.core.xid import Xid, branch_xid
from xatm.log.aio import AsyncLog
from xatm.participants.aio_pool import AsyncParticipant, AsyncPool
from xatm.transactions import ambient as _ambient
from xatm.transactions.managed import LOCAL_STEPS, ManagedTransaction, after_first_commit
from xatm.transactions.protocol import TransactionState
from xatm.transactions.transaction import check_fit

if TYPE_CHECKING:
    from xatm.node.context import Context

T = TypeVar("T")


class AsyncResources:
    """The asyncio participants and pools of a manager's resources."""

    def __init__(self, ctx: Context, participants: dict[str, AsyncParticipant], size: int):
        self._ctx = ctx
        self.participants = participants
        self.pools = {n: AsyncPool(p, max_idle=size) for n, p in participants.items()}
        self._checked: set[str] = set()
        self._check_lock = asyncio.Lock()
        self.log = AsyncLog(ctx.log, max(size, 4))

    def get(self, name: str) -> tuple[AsyncParticipant, AsyncPool]:
        """ConfigurationError if ``name`` is not configured."""
        self._ctx.resources.get(name)  # the one place that says which names there are
        return self.participants[name], self.pools[name]

    async def check(self, name: str) -> None:
        """The fitness check and set-up of a resource, once, on a worker thread (with a
        sync connection: the same code as the threaded manager's)."""
        if name in self._checked:
            return
        async with self._check_lock:
            if name not in self._checked:
                await asyncio.to_thread(self._check, name)
                self._checked.add(name)

    def _check(self, name: str) -> None:
        with self._ctx.resources.borrow(name) as (participant, conn):
            check_fit(self._ctx, participant, conn)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()
        await asyncio.to_thread(self.log.shutdown)


class AsyncTransaction(ManagedTransaction):
    """A global transaction; use it as ``async with tm.transaction() as tx:``.

    Leaving the block normally commits every branch or none (raising
    :class:`~xatm.TransactionRolledBack` if it had to roll back); leaving it with an
    exception rolls every branch back and lets the exception through. Several tasks may use
    it at once (``asyncio.gather``): each resource is enlisted once and its statements run
    one at a time; the end waits for the statements still running (a commit that had to
    wait rolls back instead: docs/api.md).
    """

    def __init__(self, ctx: Context, gtrid: str, timeout: float, aio: AsyncResources) -> None:
        super().__init__(ctx, gtrid, timeout)
        self._aio = aio
        self._drivers: dict[str, AsyncParticipant] = {}

    async def __aenter__(self) -> Self:
        _ambient.enter(self)  # a second transaction of this manager inside is refused
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end = self._leaving(exc, self.commit, self.rollback)
        if end is not None:
            await end()

    async def execute(self, resource: str, query: Any, params: Params = None) -> AsyncDBCursor:
        """Run ``query`` with ``params`` on ``resource`` inside this transaction; returns the
        driver's (async) cursor, an :class:`~xatm.aio.AsyncDBCursor`. The driver's own
        exception propagates on failure."""
        async with self._lock(resource):
            branch = await self._branch(resource)
            driver = self._drivers[resource]
            watch = branch.watch
            if watch is not None:
                watch.busy += 1  # a call in flight (xatm.core.deadline), inline: per statement
            try:
                cursor: AsyncDBCursor = await driver.execute(branch.conn, query, params)
                return cursor
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError) or driver.is_connection_error(e):
                    # interrupted midway: the branch's connection is discarded (reset or closed)
                    timeout = self._statement_lost(branch, e)
                    if timeout is not None and not isinstance(e, asyncio.CancelledError):
                        raise timeout from e
                raise
            finally:
                if watch is not None:
                    watch.busy -= 1

    @overload
    async def connection(self, resource: str) -> AsyncDBConnection: ...

    @overload
    async def connection(self, resource: str, kind: type[C]) -> C: ...

    async def connection(self, resource: str, kind: type[C] | None = None) -> AsyncDBConnection | C:
        """The asyncio driver connection of this transaction's branch on ``resource``
        (psycopg ``AsyncConnection``, ``mysql.connector.aio`` connection). Do not commit,
        roll back or close it: xatm does that. ``kind`` (``psycopg.AsyncConnection``...)
        types the result as that class, after checking it is one (``TypeError`` otherwise)."""
        async with self._lock(resource):
            branch = await self._branch(resource)
        return as_kind(resource, branch.hand_out(), kind)

    # -- several tasks in one transaction (the rule: TransactionCore._stop_work_steps) -------
    def _lock(self, resource: str) -> asyncio.Lock:
        """The lock of ``resource`` in this transaction: held while its branch is enlisted
        and while a statement runs on it."""
        lock = self._locks.get(resource)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[resource] = lock
        assert isinstance(lock, asyncio.Lock)
        return lock

    async def _await_work(self) -> None:
        for lock in list(self._locks.values()):
            assert isinstance(lock, asyncio.Lock)
            async with lock:
                pass

    # -- enlistment -------------------------------------------------------------------------
    async def _branch(self, resource: str) -> Branch:
        """The branch on ``resource``, begun if it is not enlisted yet (its lock is held)."""
        branch = self._enlisted(resource)
        if branch is not None:
            return branch
        driver, pool = self._aio.get(resource)
        identity = self._ctx.identity
        if not identity.holds(resource):  # enlist only where the node's lease is held
            await asyncio.to_thread(identity.require, resource, self.deadline - time.monotonic())
        await self._aio.check(resource)
        xid = branch_xid(self.gtrid, resource)
        conn, watch = await self._begin(driver, pool, xid)
        branch = Branch(resource, xid, driver.sync, pool, conn, watch=watch)
        self.add_branch(branch)
        self._drivers[resource] = driver
        return branch

    async def _begin(
        self, driver: AsyncParticipant, pool: AsyncPool, xid: Xid
    ) -> tuple[Connection, _deadline.Watch]:
        """A connection with the branch begun on it, under the transaction's deadline; tried
        again on a fresh connection after a lost one, if there is time left
        (``ManagedTransaction._retry_begin``)."""
        for attempt in itertools.count(1):
            conn = await pool.get(fresh=attempt > 1)
            watch = self._watch(driver, conn)
            try:
                with _deadline.calling(watch):
                    await driver.begin(conn, xid, max(self.deadline - time.monotonic(), 0.001))
                return conn, watch
            except BaseException as e:
                _deadline.disarm(watch)
                pool.discard(conn)
                lost = driver.is_connection_error(e)
                delay = self._retry_begin(
                    e, attempt, watch, driver.name, lost, driver.is_xid_in_use(e)
                )
                if lost:
                    pool.clear()  # the server probably restarted: the others are dead too
                self._begin_time_left(e)
                if delay:
                    await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- the end ----------------------------------------------------------------------------
    async def commit(self) -> None:
        """End the transaction with commit (what leaving the block normally does)."""
        await self._run_to_end(self.commit_steps())

    async def rollback(self) -> None:
        """Roll every branch back (what leaving the block with an exception does)."""
        if self.state is TransactionState.ACTIVE:
            await self._run_to_end(self.abort_steps())
        else:
            self._ended()

    async def _run_to_end(self, steps: Steps[None]) -> None:
        """Run ``steps`` to their end, even if the caller is cancelled meanwhile (see the
        module docstring); then let the cancellation through."""
        self._hold()
        task = asyncio.get_running_loop().create_task(self._drive(steps))
        cancelled = False
        try:
            while not task.done():
                try:
                    await asyncio.shield(task)  # a cancellation stops here, not in the task
                except asyncio.CancelledError:
                    cancelled = True
                    if not task.done():
                        self.refuse_decision("cancelled")
                except BaseException:  # the task's error: raised below
                    pass
        finally:
            if task.done():
                self._ended()
        if cancelled:
            if not task.cancelled() and task.exception() is not None:
                raise asyncio.CancelledError() from task.exception()
            raise asyncio.CancelledError()
        task.result()

    async def _drive(self, steps: Steps[None]) -> None:
        send = steps.send
        result: Any = None
        while True:
            try:
                op = send(result)
            except StopIteration:
                return
            result = await self._run(op)

    async def _run(self, op: Operation) -> Any:
        if isinstance(op, Prepare):
            return await _all(self._prepare(b) for b in op.branches)
        if isinstance(op, LOCAL_STEPS):
            return self._local(op)
        if isinstance(op, CommitPrepared):
            return await self._commit_prepared(op)
        if isinstance(op, Rollback):
            b = op.branch
            with _deadline.calling(b.watch):
                if op.prepared:
                    return await _outcome(self._driver(b).rollback_prepared(b.conn, b.xid))
                return await _outcome(self._driver(b).rollback_active(b.conn, b.xid))
        if isinstance(op, CommitOnePhase):
            b = op.branch
            with _deadline.calling(b.watch):
                return await _outcome(self._driver(b).commit_one_phase(b.conn, b.xid, op.before))
        if isinstance(op, LogCommit):
            # the forced write off the loop (xatm.log.aio)
            log = self._aio.log
            return await _outcome(log.log_commit(op.gtrid, op.resources, op.txids, self.deadline))
        if isinstance(op, AwaitWork):
            return await _outcome(self._await_work())
        assert isinstance(op, LogEnd)
        try:
            waiting = self._aio.log.log_end(op.gtrid)
        except BaseException as e:
            return Outcome(None, e)
        return Outcome(None) if waiting is None else await _outcome(waiting)

    async def _commit_prepared(self, op: CommitPrepared) -> list[Outcome[PhaseTwo]]:
        first_done = False

        async def one(branch: Branch) -> PhaseTwo:
            nonlocal first_done
            with _deadline.calling(branch.watch):
                result = await self._driver(branch).commit_prepared(branch.conn, branch.xid)
            if not first_done:
                first_done = True
                after_first_commit()
            return result

        return await _all(one(b) for b in op.branches)

    async def _prepare(self, branch: Branch) -> Prepared:
        with _deadline.calling(branch.watch):
            return await self._driver(branch).prepare(branch.conn, branch.xid)

    def _driver(self, branch: Branch) -> AsyncParticipant:
        return self._drivers[branch.resource]

    def __repr__(self) -> str:
        return f"<AsyncTransaction {self.gtrid} {self.state.value} branches={list(self._branches)}>"


async def _outcome(call: Awaitable[T]) -> Outcome[T]:
    try:
        return Outcome(await call)
    except BaseException as e:  # the protocol decides what it means
        return Outcome(None, e)


async def _all(calls: Any) -> list[Outcome[Any]]:
    """Run the calls concurrently; their outcomes in order (every call runs to its end).

    All but the last run in tasks of their own, the last in this one (a task fewer, and no
    gather): a branch's call then overlaps with the others' round trips."""
    *others, last = [_outcome(c) for c in calls]
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in others]
    try:
        outcomes = [await last]
    finally:
        # every call runs to its end, whatever happens to this task meanwhile
        for task in tasks:
            while not task.done():
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    continue
    return [t.result() for t in tasks] + outcomes
