"""One global transaction run with blocking drivers: ``with tm.transaction() as tx:``.

The protocol that ends it (the state machine, the failpoints) is
``xatm.transactions.protocol.TransactionCore``, free of I/O; what the threaded and the
asyncio transaction share around it is ``xatm.transactions.managed``. Here: the application's
side (statements, connections, integrations), enlistment with blocking drivers, and the
driver that runs the protocol's operations (the branches' round trips overlapped on one
thread, ``xatm.core.parallel``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast, overload

from xatm.core import deadline as _deadline
from xatm.core.dbapi import C, DBConnection, DBCursor, Params, as_kind
from xatm.core.parallel import Outcome, overlapped
from xatm.core.participant import Connection, Participant, PhaseTwo, Prepared
from xatm.core.steps import (
    AwaitWork,
    Branch,
    CommitOnePhase,
    CommitPrepared,
    LogCommit,
    LogEnd,
    Operation,
    Prepare,
    Steps,
)
from xatm.core.text import first_line
from xatm.core.xid import Xid, branch_xid
from xatm.errors import (
    ConfigurationError,
    ResourceError,
    ResourceNotFit,
    TransactionError,
    TransactionTimeout,
)
from xatm.participants.pool import Pool
from xatm.transactions import ambient as _ambient
from xatm.transactions.managed import LOCAL_STEPS, ManagedTransaction, after_first_commit
from xatm.transactions.protocol import TransactionCore, TransactionState

if TYPE_CHECKING:
    from sqlalchemy import Connection as SAConnection
    from sqlalchemy.orm import Session

    from xatm.node.context import Context

__all__ = ["SagaTransaction", "Transaction", "TransactionCore", "TransactionState", "check_fit"]

T = TypeVar("T")


class SqlAlchemyJoin(Protocol):
    """The SQLAlchemy integration of a manager (``xatm.integrations.sqlalchemy.join``), as
    ``tx.session()`` and ``tx.sa_connection()`` call it."""

    def session(self, tx: Transaction, binds: Any, **session_kwargs: Any) -> Session: ...

    def sa_connection(self, tx: Transaction, resource: str) -> SAConnection: ...


class Transaction(ManagedTransaction):
    """A global transaction; use it as ``with tm.transaction() as tx:``.

    Leaving the block normally commits every branch or none (raising
    :class:`~xatm.TransactionRolledBack` if it had to roll back); leaving it with an
    exception rolls every branch back and lets the exception through. A transaction is meant
    for one thread; if several use it, each resource is enlisted once and its statements run
    one at a time, and a commit that finds a statement still running in another thread waits
    for it, then rolls back.
    """

    def __init__(
        self, ctx: Context, gtrid: str, timeout: float, *, sqlalchemy: SqlAlchemyJoin | None = None
    ) -> None:
        super().__init__(ctx, gtrid, timeout)
        self._sqlalchemy = sqlalchemy

    # -- the application's side -------------------------------------------------------------
    def __enter__(self) -> Self:
        _ambient.enter(self)  # a second transaction of this manager inside is refused
        admission = self._ctx.admission
        if not admission.enter(self.deadline - time.monotonic()):
            _ambient.leave(self)
            self.rollback()  # nothing was begun: this only ends it
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout of {self.timeout:g} s waiting"
                f" for its turn: max_active={admission.limit} transactions were in their block",
                gtrid=self.gtrid,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            end = self._leaving(exc, self.commit, self.rollback)
            if end is not None:
                end()
        finally:
            self._ctx.admission.leave()

    def execute(self, resource: str, query: Any, params: Params = None) -> DBCursor:
        """Run ``query`` with ``params`` on ``resource`` inside this transaction.

        Returns the driver's cursor (a :class:`~xatm.DBCursor`). The driver's own exception
        propagates on failure.
        """
        with self._lock(resource):
            branch = self._branch(resource)
            assert branch.conn is not None
            watch = branch.watch
            if watch is not None:
                watch.busy += 1  # a call in flight (xatm.core.deadline), inline: per statement
            try:
                cursor: DBCursor = branch.participant.execute(branch.conn, query, params)
                return cursor
            except BaseException as e:
                if branch.participant.is_connection_error(e):
                    timeout = self._statement_lost(branch, e)
                    if timeout is not None:
                        raise timeout from e
                raise
            finally:
                if watch is not None:
                    watch.busy -= 1

    @overload
    def connection(self, resource: str) -> DBConnection: ...

    @overload
    def connection(self, resource: str, kind: type[C]) -> C: ...

    def connection(self, resource: str, kind: type[C] | None = None) -> DBConnection | C:
        """The driver connection of this transaction's branch on ``resource``.

        Use it for anything the driver offers (cursors, COPY, ...), but do not commit, roll
        back or close it: xatm does that. ``kind`` (``psycopg.Connection``,
        ``mysql.connector.MySQLConnection``...) types the result as the driver's own class,
        after checking it is one (``TypeError`` otherwise).
        """
        branch = self.enlist(resource)
        assert branch.conn is not None
        return as_kind(resource, branch.hand_out(), kind)

    def session(self, binds: Mapping[Any, str] | None = None, **session_kwargs: Any) -> Session:
        """A SQLAlchemy ORM ``Session`` whose work joins this transaction (see docs/api.md).

        ``binds`` maps models (or tables) to resource names. The session is flushed before
        prepare; commit and rollback happen through xatm when the block ends.
        """
        return self._join("session").session(self, binds, **session_kwargs)

    def sa_connection(self, resource: str) -> SAConnection:
        """A SQLAlchemy ``Connection`` on this transaction's branch on ``resource``."""
        return self._join("sa_connection").sa_connection(self, resource)

    def _join(self, what: str) -> SqlAlchemyJoin:
        if self._sqlalchemy is None:
            raise ConfigurationError(f"{what} is not available in this transaction manager")
        return self._sqlalchemy

    # -- for integrations (SQLAlchemy sessions, see xatm.integrations.sqlalchemy.session) --------
    def annotate(self, key: object, value: Any) -> None:
        """Keep ``value`` with this transaction under ``key`` (an object of the integration's
        own, such as a class: compared by identity); None forgets it."""
        if value is None:
            self._annotations.pop(key, None)
        else:
            self._annotations[key] = value

    def annotation(self, key: object) -> Any:
        """What an integration keeps with this transaction under ``key`` (None: nothing)."""
        return self._annotations.get(key)

    def add_before_prepare_hook(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when commit starts, before anything is prepared (it may still do
        work and enlist branches); if it raises, the transaction rolls back."""
        self._before_prepare.append(callback)

    def add_after_end_hook(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the transaction has ended, whatever its outcome (a failure
        of it is logged, never raised)."""
        self._after_end.append(callback)

    def enlist(self, resource: str) -> Branch:
        """The branch on ``resource``, begun now if it is not enlisted yet; its connection
        is the integration's to use (``Branch.hand_out``)."""
        with self._lock(resource):
            branch = self._branch(resource)
        branch.hand_out()
        return branch

    def branch_connection(self, resource: str) -> Connection | None:
        """The driver connection the branch on ``resource`` holds now (None if none)."""
        branch = self._branches.get(resource)
        return None if branch is None else branch.conn

    # -- enlistment -------------------------------------------------------------------------
    def _lock(self, resource: str) -> threading.Lock:
        """The lock of ``resource`` in this transaction: held while its branch is enlisted
        and while a statement runs on it."""
        lock = self._locks.get(resource)
        if lock is None:
            with self._fence:
                lock = self._locks.setdefault(resource, threading.Lock())
        return cast("threading.Lock", lock)

    def _branch(self, resource: str) -> Branch:
        """The branch on ``resource``, begun if it is not enlisted yet (its lock is held)."""
        return self._enlist(resource, None)[0]

    def _enlist(self, resource: str, insert: str | None) -> tuple[Branch, bool | None]:
        """``_branch``; if it is begun now and ``insert`` is given, with ``insert`` in the
        begin's round trip (``Participant.begin_with``): also whether it inserted its row
        (None: the branch was enlisted already, ``insert`` was not run)."""
        branch = self._enlisted(resource)
        if branch is not None:
            return branch, None
        participant, pool = self._ctx.resources.get(resource)
        # enlist only where the node's lease is held
        self._ctx.identity.require(resource, self.deadline - time.monotonic())
        participant = self._trace.watch(participant)
        xid = branch_xid(self.gtrid, resource)
        conn, watch, inserted = self._begin(participant, pool, xid, insert)
        branch = Branch(resource, xid, participant, pool, conn, watch=watch)
        self.add_branch(branch)
        return branch, inserted

    def _begin(
        self, participant: Participant, pool: Pool, xid: Xid, insert: str | None = None
    ) -> tuple[Connection, _deadline.Watch, bool | None]:
        """A connection with the branch begun on it (and ``insert`` run in the same round
        trip, if given), under the transaction's deadline; tried again on a fresh connection
        after a lost one, if there is time left (``ManagedTransaction._retry_begin``)."""
        for attempt in itertools.count(1):
            conn = pool.get() if attempt == 1 else participant.connect()
            watch = self._watch(participant, conn)
            try:
                inserted = None
                with _deadline.calling(watch):
                    if not pool.checked:
                        check_fit(self._ctx, participant, conn)
                        pool.checked = True
                    left = max(self.deadline - time.monotonic(), 0.001)
                    if insert is None:
                        participant.begin(conn, xid, left)
                    else:
                        inserted = participant.begin_with(conn, xid, left, insert)
                return conn, watch, inserted
            except ResourceError:
                _deadline.disarm(watch)
                pool.discard(conn)
                raise
            except BaseException as e:
                _deadline.disarm(watch)
                pool.discard(conn)
                lost = participant.is_connection_error(e)
                delay = self._retry_begin(
                    e, attempt, watch, participant.name, lost, participant.is_xid_in_use(e)
                )
                if lost:
                    pool.clear()  # the server probably restarted: the others are dead too
                self._begin_time_left(e)
                if delay:
                    time.sleep(delay)
        raise AssertionError("unreachable")

    # -- the end ----------------------------------------------------------------------------
    def commit(self) -> None:
        """End the transaction with commit (what leaving the block normally does)."""
        try:
            self._commit()
        finally:
            self._ended()

    def rollback(self) -> None:
        """Roll every branch back (what leaving the block with an exception does)."""
        try:
            if self.state is TransactionState.ACTIVE:
                self._rollback_all()
        finally:
            self._ended()

    def _commit(self) -> None:
        if self.state is not TransactionState.ACTIVE:
            raise TransactionError(
                f"transaction {self.gtrid} is already {self.state.value}", gtrid=self.gtrid
            )
        if self._before_prepare and self._rollback_only is None:
            self._run_before_prepare()
        self._hold()
        self._drive(self.commit_steps())

    def _run_before_prepare(self) -> None:
        """Run the before-prepare callbacks (flush ORM sessions); any failure rolls back."""
        callbacks, self._before_prepare = self._before_prepare, []
        try:
            for callback in callbacks:
                callback()
        except BaseException as e:
            self._rollback_all()
            if not isinstance(e, Exception):
                raise
            if isinstance(e, TransactionTimeout):
                self._raise_rolled_back("timeout", e)
            text = first_line(str(e), type(e).__name__)
            self._raise_rolled_back(f"the work to do before prepare failed: {text}", e)

    def _rollback_all(self) -> None:
        """Roll back every branch that may still hold work (once the work still running in
        other threads is over); never raises a driver error."""
        self._hold()
        self._drive(self.abort_steps())

    # -- the driver: runs the protocol's operations with the blocking drivers ---------------
    def _drive(self, steps: Steps[None]) -> None:
        send = steps.send
        result: Any = None
        while True:
            try:
                op = send(result)
            except StopIteration:
                return
            result = self._run(op)

    def _run(self, op: Operation) -> Any:
        # most frequent first: a strict two-branch commit is Prepare, PassFence, LogCommit,
        # CommitPrepared, LogEnd
        if isinstance(op, Prepare):
            return self._prepare(op.branches)
        if isinstance(op, LOCAL_STEPS):
            return self._local(op)
        if isinstance(op, LogCommit):
            return _call(self._ctx.log.log_commit, op.gtrid, op.resources, op.txids, self.deadline)
        if isinstance(op, CommitPrepared):
            return self._commit_prepared(op)
        if isinstance(op, LogEnd):
            return _call(self._ctx.log.log_end, op.gtrid)
        if isinstance(op, AwaitWork):
            return _call(self._await_work)
        branch = op.branch
        with _deadline.calling(branch.watch):
            if isinstance(op, CommitOnePhase):
                if op.before:
                    return _call(
                        branch.participant.commit_one_phase, branch.conn, branch.xid, op.before
                    )
                return _call(branch.participant.commit_one_phase, branch.conn, branch.xid)
            if op.prepared:
                return _call(branch.participant.rollback_prepared, branch.conn, branch.xid)
            return _call(branch.participant.rollback_active, branch.conn, branch.xid)

    def _await_work(self) -> None:
        for lock in list(self._locks.values()):
            with cast("threading.Lock", lock):
                pass

    def _prepare(self, branches: list[Branch]) -> list[Outcome[Prepared]]:
        overlap = self._ctx.overlap()

        def start(branch: Branch) -> Callable[[], Prepared]:
            assert branch.conn is not None
            with _deadline.calling(branch.watch):
                if overlap:
                    return _waiting(
                        branch, branch.participant.start_prepare(branch.conn, branch.xid)
                    )
                return _now(branch.participant.prepare(branch.conn, branch.xid))

        return overlapped(branches, start, sends_first=_sends_first, overlap=overlap)

    def _commit_prepared(self, op: CommitPrepared) -> list[Outcome[PhaseTwo]]:
        first_done = False
        overlap = self._ctx.overlap()

        def start(branch: Branch) -> Callable[[], PhaseTwo]:
            assert branch.conn is not None
            with _deadline.calling(branch.watch):
                if overlap:
                    finish = _waiting(
                        branch, branch.participant.start_commit_prepared(branch.conn, branch.xid)
                    )
                else:
                    finish = _now(branch.participant.commit_prepared(branch.conn, branch.xid))

            def done() -> PhaseTwo:
                nonlocal first_done
                result = finish()
                if not first_done:
                    first_done = True
                    after_first_commit()
                return result

            return done

        return overlapped(op.branches, start, sends_first=_sends_first, overlap=overlap)

    def __repr__(self) -> str:
        return f"<Transaction {self.gtrid} {self.state.value} branches={list(self._branches)}>"


class SagaTransaction(Transaction):
    """The transaction of one saga step (``action(tx, data)``, ``compensation(tx, data)``):
    a :class:`Transaction` whose ``idempotency_key`` is always set,
    ``<saga_id>.<step>.<action|compensation>``, the same on every retry and after recovery,
    for outside services to deduplicate on (docs/sagas.md)."""

    idempotency_key: str

    def __init__(
        self,
        ctx: Context,
        gtrid: str,
        timeout: float,
        idempotency_key: str,
        *,
        sqlalchemy: SqlAlchemyJoin | None = None,
    ) -> None:
        super().__init__(ctx, gtrid, timeout, sqlalchemy=sqlalchemy)
        self.idempotency_key = idempotency_key

    def begin_with(self, resource: str, insert: str) -> bool | None:
        """Enlist ``resource`` with ``insert`` (one row, its values written in it, for the
        resource's kind: ``Participant.begin_with``) in the round trip of its begin: True if
        it inserted its row, False if a row with its key was there; None if ``resource`` was
        enlisted already (``insert`` is then not run). The saga barrier's rows ride so."""
        with self._lock(resource):
            return self._enlist(resource, insert)[1]


def check_fit(ctx: Context, participant: Participant, conn: Connection) -> None:
    """A resource's first connection: refuse it (ResourceNotFit) if it is not fit for
    two-phase commit, else do the context's set-up on it (the marker table)."""
    problems = participant.check(conn)
    if problems:
        raise ResourceNotFit(
            f"resource {participant.name!r} ({participant.spec.redacted()})"
            f" is not fit for two-phase commit: {'; '.join(problems)}",
            resource=participant.name,
        )
    ctx.first_connection(participant, conn)


def _call(fn: Callable[..., T], *args: Any) -> Outcome[T]:
    """``fn(*args)`` as an Outcome: its value, or whatever it raised."""
    try:
        return Outcome(fn(*args))
    except BaseException as e:  # the protocol decides what it means
        return Outcome(None, e)


def _waiting(branch: Branch, finish: Callable[[], T]) -> Callable[[], T]:
    """``finish`` as a call on ``branch``'s connection (``xatm.core.deadline``): a branch whose
    step was started counts as in a call only while its answer is being waited for, not
    while the other branches' steps run."""

    def call() -> T:
        with _deadline.calling(branch.watch):
            return finish()

    return call


def _now(value: T) -> Callable[[], T]:
    """A step already finished: its result, as a call."""
    return lambda: value


def _sends_first(branch: Branch) -> bool:
    """Branches that only send when started go first, so the others overlap with them."""
    return branch.participant.sends_without_waiting
