"""One global transaction: its branches, and the two-phase commit protocol that ends it.

The protocol, step by step (docs/protocol.md has the state machine and the reasoning)::

    ACTIVE ──block raised / rollback()──────────────────────────────> ROLLED_BACK
      │ block ended
      ├─ 0 branches ─────────────────────────────────────────────────> COMMITTED
      ├─ 1 branch: commit it in one phase (no log write) ────────────> COMMITTED
      │             (it refuses: ROLLED_BACK; connection lost: IN_DOUBT)
      ▼ 2+ branches                                  [failpoint before_prepare]
    PREPARING: prepare every branch (in parallel)
      │ any branch votes no, fails, or the deadline passed ─────────> ROLLED_BACK
      ▼ every branch prepared                        [failpoint after_prepare]
    fence: the decision is refused if recovery marked the transaction aborted
      ▼ COMMIT record forced to the log (group commit)
    COMMITTING                                       [failpoint after_decision]
      │ commit every branch (in parallel)            [failpoint after_first_commit]
      │ a branch that cannot be committed now is left to recovery: the
      │ transaction *is* committed, so the block does not raise
      ▼ END record appended lazily once every branch is committed
    COMMITTED

Until the COMMIT record is durable the transaction is presumed aborted: a crash anywhere
before it leaves prepared branches that recovery rolls back. From the moment it is durable
the transaction is committed: recovery commits whatever branch is still prepared.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, Self, TypeVar, cast, overload

from xatm.core import deadline as _deadline
from xatm.core import events as _events
from xatm.core import failpoint as _failpoint
from xatm.core.dbapi import C, DBConnection, DBCursor, Params, as_kind
from xatm.core.logfields import log_fields
from xatm.core.parallel import Outcome, overlapped
from xatm.core.participant import BranchVotedNo, Connection, Participant, PhaseTwo, Prepared, Vote
from xatm.core.steps import (
    AwaitWork,
    Branch,
    BranchState,
    CommitOnePhase,
    CommitPrepared,
    LogCommit,
    LogEnd,
    Operation,
    Prepare,
    Rollback,
    Steps,
)
from xatm.core.urls import describe_error
from xatm.core.xid import Xid, branch_xid
from xatm.errors import (
    LogError,
    ResourceError,
    ResourceNotFit,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
)
from xatm.log.base import DecisionNotLogged
from xatm.participants import marker as _marker
from xatm.participants.pool import Pool
from xatm.transactions import ambient as _ambient

if TYPE_CHECKING:
    from sqlalchemy import Connection as SAConnection
    from sqlalchemy.orm import Session

    from xatm.node.context import Context

logger = logging.getLogger("xatm.transaction")

T = TypeVar("T")


class TransactionState(enum.Enum):
    """Where a global transaction is in the protocol."""

    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"  # the COMMIT decision is durable
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    IN_DOUBT = "in-doubt"  # outcome settled later by recovery


class TransactionCore:
    """A global transaction's state and its commit protocol, free of I/O: the protocol is
    generators yielding operations (``xatm.core.steps``), which :class:`Transaction` runs with
    blocking drivers and ``xatm.aio.AsyncTransaction`` awaits."""

    def __init__(self, ctx: Context, gtrid: str, timeout: float) -> None:
        self._ctx = ctx
        self.gtrid = gtrid
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self.state = TransactionState.ACTIVE
        self._branches: dict[str, Branch] = {}
        self._rollback_only: str | None = None
        # Fencing with recovery inside this process: recovery may mark an expired,
        # undecided transaction aborted; the decision step refuses to log COMMIT after that.
        self._fence = threading.Lock()
        self._stop: str | None = None  # why the decision is refused (recovery, cancelled)
        self._deciding = False
        #: per resource, held while its branch is enlisted and while a statement runs on it
        #: (a threading.Lock or an asyncio.Lock, made by the driver: ``_lock``)
        self._locks: dict[str, _Lock] = {}
        self._ending = False  # commit or rollback has begun: no new work
        #: the error that made the transaction rollback-only, if one did (a lost connection)
        self._rollback_cause: BaseException | None = None
        # Callbacks of integrations (SQLAlchemy sessions, see
        # xatm.integrations.sqlalchemy.resources): the first run at the start of commit, before
        # anything is prepared (they may still do work and enlist branches); the second once the
        # transaction has ended, whatever its outcome.
        self._before_prepare: list[Callable[[], None]] = []
        self._after_end: list[Callable[[], None]] = []
        self._trace = _events.timeline(ctx.node_id, gtrid)  # metrics and tracing
        #: set for a saga step: stable per saga, step and op (action / compensation), the
        #: same on every retry and after recovery, for outside services to deduplicate on
        self.idempotency_key: str | None = None

    def set_rollback_only(self, reason: str = "set_rollback_only() was called") -> None:
        """Make the transaction unable to commit: leaving the block will roll it back."""
        self._rollback_only = reason
        self._rollback_cause = None

    @property
    def open(self) -> bool:
        """True until its end (commit or rollback) has begun."""
        return self.state is TransactionState.ACTIVE and not self._ending

    @property
    def context(self) -> Context:
        """The manager's shared context (resources, pools, log), for integrations."""
        return self._ctx

    @property
    def branches(self) -> dict[str, BranchState]:
        """The state of each enlisted branch, by resource name."""
        return {name: b.state for name, b in self._branches.items()}

    @property
    def pending_branches(self) -> list[str]:
        """Resources whose branch recovery still has to finish (after a phase-2 failure)."""
        return [n for n, b in self._branches.items() if b.state is BranchState.UNKNOWN]

    def _enlisted(self, resource: str) -> Branch | None:
        """The branch on ``resource`` if it is enlisted (None: begin one), after checking
        that work may still be done in this transaction. The resource's lock is held."""
        if self.state is not TransactionState.ACTIVE:
            raise TransactionError(
                f"transaction {self.gtrid} is {self.state.value}; no more work can be done in it",
                gtrid=self.gtrid,
            )
        if self._ending:
            raise TransactionError(
                f"transaction {self.gtrid} is ending (its commit or rollback has begun); no"
                " more work can be done in it",
                gtrid=self.gtrid,
            )
        closing = self._ctx.closing
        if closing is not None and (not self._branches or self._stop is not None):
            # a closing manager lets the transactions in flight finish (xatm.transactions.drain),
            # but none begins, and none it gave up waiting for goes on
            self._rollback_only = closing
            raise TransactionError(
                f"transaction {self.gtrid} cannot go on: {closing}; it is rolled back",
                gtrid=self.gtrid,
            )
        branch = self._branches.get(resource)
        if branch is not None and branch.conn is None:
            raise TransactionError(
                f"the branch on {resource!r} lost its connection; the transaction will be"
                " rolled back",
                gtrid=self.gtrid,
            )
        self._check_time()
        if branch is None:
            # running in this process from its first branch on (recovery asks); one that
            # never enlists anything is never registered
            self._ctx.register(self)
        return branch

    # -- several tasks or threads in one transaction ----------------------------------------
    # The drivers hold a resource's lock while its branch is enlisted and while a statement
    # runs on it (and check ``_enlisted`` under it); the rule is here: the end (commit or
    # rollback) refuses new work, waits for the work still running, and a commit that had
    # to wait rolls back (that work may be half done).
    def _stop_work_steps(self) -> Steps[int]:
        """The end begins: refuse new work, then wait for the statements and enlistments
        still running in other tasks or threads. Returns how many were running.

        Safe without a lock of its own: a statement checks ``_ending`` once it holds its
        resource's lock, so it either holds that lock now (counted, waited for) or will
        find ``_ending`` set and run nothing."""
        self._ending = True
        running = sum(1 for lock in list(self._locks.values()) if lock.locked())
        if self._branches:
            self._ctx.register(self, hold=True)  # kept until its end, whoever refers to it
        if running:
            e = (yield AwaitWork()).error
            if e is not None:
                # Interrupted while that work runs on the branches' connections: they cannot
                # be used for the rollback. Closing them makes each server roll its branch
                # back (nothing is prepared yet).
                self.state = TransactionState.ROLLED_BACK
                for branch in self._branches.values():
                    branch.state = BranchState.ROLLED_BACK
                    branch.drop()
                raise e
        return running

    def _lost(self, branch: Branch, error: BaseException) -> None:
        """The branch's connection failed (or its call was interrupted) during the work:
        the server drops unprepared work, and the transaction can only roll back."""
        branch.error = error
        branch.state = BranchState.ROLLED_BACK
        if branch.cut:
            self._rollback_only = "timeout"
        else:
            self._rollback_only = f"the connection of branch {branch.resource!r} was lost"
        self._rollback_cause = error  # chained to TransactionRolledBack (tm.run retries it)

    def _statement_lost(self, branch: Branch, error: BaseException) -> TransactionTimeout | None:
        """A statement of the block failed with a connection error: the transaction can
        only roll back. If the deadline cut it (its server did not answer in time), the
        error to raise instead of the driver's."""
        self._lost(branch, error)
        return self._silent(branch.resource) if branch.cut else None

    def _silent(self, resource: str) -> TransactionTimeout:
        """The error of a call on ``resource`` that the deadline cut (the transaction can
        only roll back)."""
        self._rollback_only = "timeout"
        return TransactionTimeout(
            f"transaction {self.gtrid} exceeded its timeout of {self.timeout:g} s: resource"
            f" {resource!r} did not answer in time, and its connection was cut",
            gtrid=self.gtrid,
        )

    def _watch(self, owner: _deadline.Sockets, conn: Connection) -> _deadline.Watch:
        """The deadline of a branch's connection, from enlistment until it is given back:
        the transaction's own until its decision, then :meth:`_finishing`'s."""
        return _deadline.arm(owner, conn, self.deadline, f"transaction {self.gtrid}", busy=0)

    def _finishing(self) -> None:
        """The steps that end the branches (commit, rollback) may run until the deadline
        plus :data:`xatm.core.deadline.GRACE`: no call outlives the timeout plus that."""
        limit = self.deadline + _deadline.GRACE
        for branch in self._branches.values():
            if branch.watch is not None:
                branch.watch.extend_to(limit)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            self._rollback_only = "timeout"
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout of {self.timeout:g} s",
                gtrid=self.gtrid,
            )

    # -- fencing with recovery ------------------------------------------------------------
    def abort_if_expired(self) -> bool:
        """Recovery's request: mark this transaction aborted if it is past its deadline and
        has not reached its decision. True if it is (now) marked aborted."""
        with self._fence:
            if self._deciding:
                return False
            if self._stop is not None:
                return True
            if time.monotonic() > self.deadline:
                self._stop = "timeout"
                return True
            return False

    def refuse_decision(self, reason: str) -> bool:
        """Make the decision step refuse to commit (and roll back), unless the decision is
        already being made. True if it will be refused."""
        with self._fence:
            if self._deciding:
                return False
            if self._stop is None:
                self._stop = reason
            return True

    # -- the protocol, I/O-free: generators yielding operations (xatm.core.steps) ---------------
    def _ended(self) -> None:
        self._ctx.forget(self)
        self._trace.finish(self.state)
        callbacks, self._after_end = self._after_end, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the outcome is settled: a callback's failure only gets logged
                logger.exception(
                    "an end-of-transaction callback of %s failed",
                    self.gtrid,
                    extra=log_fields(self._ctx.node_id, self.gtrid),
                )

    def _commit_steps(self) -> Steps[None]:
        """The end of the block: commit every branch or none (docs/protocol.md)."""
        if self.state is not TransactionState.ACTIVE:
            raise TransactionError(
                f"transaction {self.gtrid} is already {self.state.value}", gtrid=self.gtrid
            )
        running = yield from self._stop_work_steps()
        if running and self._rollback_only is None:
            self._rollback_only = (
                f"its commit began while work of it (a statement, an enlistment) was still"
                f" running in other tasks or threads on {running} resource(s); that work may"
                " not be complete: await every statement before the block ends"
            )
        branches = list(self._branches.values())
        if self._rollback_only is not None or time.monotonic() > self.deadline:
            reason = self._rollback_only or "timeout"
            yield from self._rollback_steps()
            self._raise_rolled_back(reason, self._rollback_cause)
        if not branches:
            self.state = TransactionState.COMMITTED
            return
        if len(branches) == 1:
            yield from self._one_phase_steps(branches[0])
            return
        chosen = self._ctx.marker_candidate((b.resource, b.participant) for b in branches)
        marker = self._branches[chosen] if chosen is not None else None
        if marker is not None:
            yield from self._marker_steps(branches, marker)
            return
        self.state = TransactionState.PREPARING
        _failpoint.hit("before_prepare")
        prepared = yield from self._prepare_steps(branches)
        _failpoint.hit("after_prepare")
        if len(prepared) > 1:
            yield from self._decide_steps(prepared)
        else:
            # Read-only votes left at most one branch with work: its commit alone decides
            # the outcome, so no decision needs logging (a crash before it commits leaves
            # nothing acknowledged, and presumed abort rolls the branch back).
            yield from self._fence_steps()
        _failpoint.hit("after_decision")
        self.state = TransactionState.COMMITTING
        yield from self._commit_all_steps(prepared, logged=len(prepared) > 1)

    def _marker_steps(self, branches: list[Branch], marker: Branch) -> Steps[None]:
        """The commit-marker path (see ``xatm.participants.marker``): prepare the others, then
        commit the marker branch in one phase with the decision row inside it."""
        self.state = TransactionState.PREPARING
        _failpoint.hit("before_prepare")
        prepared = yield from self._prepare_steps([b for b in branches if b is not marker])
        _failpoint.hit("after_prepare")
        yield from self._fence_steps()
        finished = self._ctx.finished_markers(marker.resource)
        gtrid = self.gtrid if prepared else None  # no other writer: no decision row needed
        txids = {b.resource: b.txid for b in prepared if b.txid is not None}
        statements = _marker.statements(gtrid, [b.resource for b in prepared], txids, finished)
        assert marker.conn is not None
        e = (yield CommitOnePhase(marker, statements)).error
        if isinstance(e, BranchVotedNo):
            marker.state = BranchState.ROLLED_BACK
            yield from self._rollback_steps()
            self._raise_rolled_back(f"{marker.resource}: {e.reason}", e.__cause__ or e)
        elif e is not None:
            # Not a certain "no" (those are BranchVotedNo): the decision row may or may not
            # be committed. Leave every branch as it is, for recovery to settle.
            marker.error = e
            marker.state = BranchState.UNKNOWN
            self.state = TransactionState.IN_DOUBT
            for b in branches:
                b.drop()
            if not isinstance(e, Exception):
                raise e
            raise TransactionInDoubt(
                f"the commit of the decision of {self.gtrid} on {marker.resource!r} failed"
                f" midway ({_text(e)}); recovery settles the other branches by whether the"
                " decision row is there",
                gtrid=self.gtrid,
            ) from e
        marker.state = BranchState.COMMITTED
        marker.release()
        _failpoint.hit("after_decision")
        self.state = TransactionState.COMMITTING
        yield from self._commit_all_steps(prepared, logged=bool(prepared), marker=marker.resource)

    def _raise_rolled_back(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        if reason == "timeout":
            silent = [repr(b.resource) for b in self._branches.values() if b.cut]
            detail = f" ({', '.join(silent)} did not answer in time)" if silent else ""
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout of {self.timeout:g} s and was"
                f" rolled back{detail}",
                gtrid=self.gtrid,
            ) from cause
        raise TransactionRolledBack(
            f"transaction {self.gtrid} was rolled back: {reason}", gtrid=self.gtrid
        ) from cause

    def _one_phase_steps(self, branch: Branch) -> Steps[None]:
        self.state = TransactionState.PREPARING
        self._trace.phase("commit")
        assert branch.conn is not None
        stop = self._pass_fence()  # the commit is the decision: refused like any other
        if stop is not None:
            yield from self._rollback_steps()
            self._raise_rolled_back(stop)
        e = (yield CommitOnePhase(branch)).error
        if isinstance(e, BranchVotedNo):
            branch.state = BranchState.ROLLED_BACK
            yield from self._rollback_steps()
            self._raise_rolled_back(f"{branch.resource}: {e.reason}", e.__cause__)
        if e is not None:
            # Not a certain "no" (those are BranchVotedNo): a lost connection, or the call
            # was interrupted. Whether the commit took effect is unknown.
            branch.error = e
            branch.state = BranchState.UNKNOWN
            branch.drop()
            self.state = TransactionState.IN_DOUBT
            if not isinstance(e, Exception):
                raise e
            raise TransactionInDoubt(
                f"the one-phase commit of {self.gtrid} on {branch.resource!r} failed midway"
                f" ({_text(e)}): whether it committed is unknown",
                gtrid=self.gtrid,
            ) from e
        branch.state = BranchState.COMMITTED
        branch.release()
        self.state = TransactionState.COMMITTED

    def _prepare_steps(self, branches: list[Branch]) -> Steps[list[Branch]]:
        """Phase 1 on every branch; returns the branches that voted PREPARED (the others
        are read-only and already finished). Rolls everything back on any no vote."""
        self._trace.phase("prepare")
        outcomes: list[Outcome[Prepared]] = yield Prepare(branches)
        failure: BaseException | None = None
        reason = ""
        for branch, outcome in zip(branches, outcomes, strict=True):
            err = outcome.error
            if err is None:
                assert outcome.value is not None
                if outcome.value.vote is Vote.READ_ONLY:
                    branch.state = BranchState.COMMITTED
                else:
                    branch.state = BranchState.PREPARED
                    branch.txid = outcome.value.txid
                continue
            branch.error = err
            if isinstance(err, BranchVotedNo) and not branch.cut:
                branch.state = BranchState.ROLLED_BACK
                if failure is None:
                    failure, reason = err.__cause__ or err, f"{branch.resource}: {err.reason}"
            else:
                # not a certain no: the prepare may have reached the server (its answer was
                # lost, or the deadline cut the call): left to recovery, which rolls it back
                branch.state = BranchState.UNKNOWN
                if failure is None:
                    failure, reason = err, f"{branch.resource}: prepare failed: {_text(err)}"
        if failure is not None:
            if any(b.cut for b in branches):
                reason = "timeout"
            yield from self._rollback_steps()
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like, after rolling back
            self._raise_rolled_back(reason, failure)
        for branch in branches:
            if branch.state is BranchState.COMMITTED:
                branch.release()
        return [b for b in branches if b.state is BranchState.PREPARED]

    def _fence_steps(self) -> Steps[None]:
        """Pass the fence with recovery, or roll back if the transaction is past its time
        (or its caller gave up on it: a cancelled asyncio task)."""
        self._trace.phase("decide")
        # decide only where this node's identity lease is held now (xatm.node.identity)
        live = (BranchState.PREPARED, BranchState.ACTIVE)
        lost = self._ctx.identity.unheld(
            b.resource for b in self._branches.values() if b.state in live
        )
        stop = self._pass_fence(None if lost is None else str(lost))
        if stop is not None:
            yield from self._rollback_steps()
            self._raise_rolled_back(stop, lost)

    def _pass_fence(self, refuse: str | None = None) -> str | None:
        """The fence before the decision (a logged COMMIT, a marker branch's commit, or the
        one-phase commit of the only branch): None if passed (from here on nothing can
        refuse the decision), else why it is refused (recovery marked it aborted, its caller
        was cancelled, "timeout", or ``refuse``: the node's identity lease is not held)."""
        with self._fence:
            stop = self._stop
            if stop is None and time.monotonic() > self.deadline:
                stop = "timeout"
            if stop is None:
                stop = refuse
            if stop is None:
                self._deciding = True
        if stop is None:
            self._finishing()
        return stop

    def _decide_steps(self, branches: list[Branch]) -> Steps[None]:
        yield from self._fence_steps()
        _failpoint.hit("before_decision")
        txids = {b.resource: b.txid for b in branches if b.txid is not None}
        e = (yield LogCommit(self.gtrid, [b.resource for b in branches], txids)).error
        if e is None:
            return
        if isinstance(e, DecisionNotLogged):
            # certainly not logged (or fenced: recovery logged ABORT first): roll back
            yield from self._rollback_steps()
            self._raise_rolled_back(f"the commit decision could not be logged: {e}", e)
        self.state = TransactionState.IN_DOUBT
        for b in branches:
            b.drop()
        if isinstance(e, LogError | OSError):
            raise TransactionInDoubt(
                f"forcing the commit decision of {self.gtrid} to the log failed; every branch"
                " stays prepared and recovery settles them by what the log holds",
                gtrid=self.gtrid,
            ) from e
        # Interrupted (KeyboardInterrupt, SystemExit, a cancelled task) while the decision
        # was being forced: the log settles the record (on disk, or the log broken), so the
        # branches stay prepared for recovery, which decides by what the disk holds.
        raise e

    def _commit_all_steps(
        self, branches: list[Branch], *, logged: bool, marker: str | None = None
    ) -> Steps[None]:
        self._trace.phase("commit")
        outcomes: list[Outcome[PhaseTwo]] = yield CommitPrepared(branches, _after_first_commit)
        for branch, outcome in zip(branches, outcomes, strict=True):
            if outcome.error is None and outcome.value is PhaseTwo.DONE:
                branch.state = BranchState.COMMITTED
                branch.release()
            elif outcome.error is None:
                branch.state = BranchState.UNKNOWN
                branch.drop()
                logger.error(
                    "HEURISTIC: branch %s of committed transaction %s was not found prepared"
                    " on %r at commit time: it may have been rolled back by hand",
                    branch.xid.bqual,
                    self.gtrid,
                    branch.resource,
                    extra=log_fields(self._ctx.node_id, self.gtrid, branch.resource),
                )
            else:
                branch.state = BranchState.UNKNOWN
                branch.error = outcome.error
                branch.drop()
                logger.warning(
                    "transaction %s is committed, but its branch on %r could not be committed"
                    " now (%s); recovery will commit it",
                    self.gtrid,
                    branch.resource,
                    "no answer in time: its connection was cut"
                    if branch.cut
                    else _text(outcome.error),
                    extra=log_fields(self._ctx.node_id, self.gtrid, branch.resource),
                )
        self.state = TransactionState.COMMITTED
        if not logged:
            if branches and branches[0].state is BranchState.UNKNOWN:
                # the only branch with work: its outcome is this transaction's outcome
                self.state = TransactionState.IN_DOUBT
                raise TransactionInDoubt(
                    f"the commit of the only writing branch of {self.gtrid} on"
                    f" {branches[0].resource!r} failed midway; with no logged decision,"
                    " recovery will roll it back if it is still prepared",
                    gtrid=self.gtrid,
                ) from branches[0].error
        elif all(b.state is BranchState.COMMITTED for b in branches):
            if marker is not None:
                self._ctx.marker_finished(marker, self.gtrid)
                return
            e = (yield LogEnd(self.gtrid)).error
            if isinstance(e, LogError):
                logger.warning(
                    "could not record the end of %s: %s",
                    self.gtrid,
                    e,
                    extra=log_fields(self._ctx.node_id, self.gtrid),
                )
            elif e is not None:
                raise e
        else:
            self._ctx.phase_two_incomplete(self.gtrid, self.pending_branches)

    def _abort_steps(self) -> Steps[None]:
        """What ``rollback()`` runs: wait for the work still running in other tasks or
        threads, then roll every branch back."""
        yield from self._stop_work_steps()
        yield from self._rollback_steps()

    def _rollback_steps(self) -> Steps[None]:
        """Roll back every branch that may still hold work; never raises a driver error."""
        self._trace.phase("rollback")
        self.state = TransactionState.ROLLED_BACK
        self._finishing()
        for branch in self._branches.values():
            if branch.conn is None or branch.state is BranchState.ROLLED_BACK:
                branch.release()
                continue
            if branch.state is BranchState.PREPARED:
                prepared = True
            elif branch.state is BranchState.ACTIVE:
                prepared = False
            else:  # UNKNOWN: a prepare whose answer was lost; recovery will see to it
                branch.drop()
                continue
            e = (yield Rollback(branch, prepared)).error
            if e is None:
                branch.state = BranchState.ROLLED_BACK
                branch.release()
                continue
            if not isinstance(e, Exception):
                raise e
            # rolling back must go on
            branch.error = e
            branch.drop()  # closing the connection rolls back unprepared work
            if prepared:
                branch.state = BranchState.UNKNOWN
                logger.warning(
                    "could not roll back prepared branch %s on %r (%s); recovery will",
                    self.gtrid,
                    branch.resource,
                    e,
                    extra=log_fields(self._ctx.node_id, self.gtrid, branch.resource),
                )
            else:
                branch.state = BranchState.ROLLED_BACK


class Transaction(TransactionCore):
    """A global transaction; use it as ``with tm.transaction() as tx:``.

    Leaving the block normally commits every branch or none (raising
    :class:`~xatm.TransactionRolledBack` if it had to roll back); leaving it with an
    exception rolls every branch back and lets the exception through. A transaction is meant
    for one thread; if several use it, each resource is enlisted once and its statements run
    one at a time, and a commit that finds a statement still running in another thread waits
    for it, then rolls back.
    """

    # -- the application's side -------------------------------------------------------------
    def __enter__(self) -> Self:
        _ambient.enter(self)  # a second transaction of this manager inside is refused
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _ambient.leave(self)
        if self.state is not TransactionState.ACTIVE:
            self._ctx.forget(self)
            return
        if exc is not None:
            self.rollback()
        else:
            self.commit()

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
        session: Session = self._ctx.extension("session")(self, binds, **session_kwargs)
        return session

    def sa_connection(self, resource: str) -> SAConnection:
        """A SQLAlchemy ``Connection`` on this transaction's branch on ``resource``."""
        conn: SAConnection = self._ctx.extension("sa_connection")(self, resource)
        return conn

    # -- for integrations (SQLAlchemy sessions, see xatm.integrations.sqlalchemy.resources) --------
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
        branch = self._enlisted(resource)
        if branch is not None:
            return branch
        participant, pool = self._ctx.resources.get(resource)
        # enlist only where the node's lease is held
        self._ctx.identity.require(resource, self.deadline - time.monotonic())
        participant = self._trace.watch(participant)
        xid = branch_xid(self.gtrid, resource)
        conn, watch = self._begin(participant, pool, xid)
        branch = Branch(resource, xid, participant, pool, conn, watch=watch)
        self._branches[resource] = branch
        return branch

    def _begin(
        self, participant: Participant, pool: Pool, xid: Xid
    ) -> tuple[Connection, _deadline.Watch]:
        """A connection with the branch begun on it, under the transaction's deadline; one
        retry on a fresh connection, if there is time left."""
        for attempt in (1, 2):
            conn = pool.get() if attempt == 1 else participant.connect()
            watch = self._watch(participant, conn)
            try:
                with _deadline.calling(watch):
                    if not pool.checked:
                        check_fit(self._ctx, participant, conn)
                        pool.checked = True
                    participant.begin(conn, xid, max(self.deadline - time.monotonic(), 0.001))
                return conn, watch
            except ResourceError:
                _deadline.disarm(watch)
                pool.discard(conn)
                raise
            except BaseException as e:
                _deadline.disarm(watch)
                pool.discard(conn)
                if watch.fired:
                    raise self._silent(participant.name) from e
                if attempt == 2 or not participant.is_connection_error(e):
                    raise
                pool.clear()  # the server probably restarted: the others are dead too
                if time.monotonic() > self.deadline:
                    raise
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
        self._drive(self._commit_steps())

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
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._raise_rolled_back(f"the work to do before prepare failed: {first_line}", e)

    def _rollback_all(self) -> None:
        """Roll back every branch that may still hold work (once the work still running in
        other threads is over); never raises a driver error."""
        self._drive(self._abort_steps())

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
        # most frequent first: a strict two-branch commit is Prepare, LogCommit,
        # CommitPrepared, LogEnd
        if isinstance(op, Prepare):
            return self._prepare(op.branches)
        if isinstance(op, LogCommit):
            return _call(self._ctx.log.log_commit, op.gtrid, op.resources, op.txids)
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
                    op.after_first()
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

    def __init__(self, ctx: Context, gtrid: str, timeout: float, idempotency_key: str) -> None:
        super().__init__(ctx, gtrid, timeout)
        self.idempotency_key = idempotency_key


class _Lock(Protocol):
    """A resource's lock in a transaction: ``threading.Lock`` or ``asyncio.Lock``."""

    def locked(self) -> bool: ...


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


def _text(e: BaseException) -> str:
    """A driver's error as xatm shows it (``xatm.core.urls.describe_error``)."""
    return describe_error(e)


def _call(fn: Callable[..., T], *args: Any) -> Outcome[T]:
    """``fn(*args)`` as an Outcome: its value, or whatever it raised."""
    try:
        return Outcome(fn(*args))
    except BaseException as e:  # the protocol decides what it means
        return Outcome(None, e)


def _after_first_commit() -> None:
    _failpoint.hit("after_first_commit")


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
