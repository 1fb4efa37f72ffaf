"""The two-phase commit protocol of one global transaction, free of I/O (sans-IO).

:class:`TransactionCore` holds a transaction's state and branches and ends it with
generators that *yield* operations (``xatm.core.steps``) and *receive* their outcomes; it
takes no lock, fires no failpoint and calls nothing of the manager: what it needs from the
process it runs in comes through :class:`Hooks` (plain values in and out), and the fence
lock and the failpoints are operations too (``PassFence``, ``Failpoint``). The threaded
:class:`~xatm.Transaction` and the asyncio ``xatm.aio.AsyncTransaction`` run the operations
(``xatm.transactions.managed`` is what they share); tests/unit/test_protocol.py runs them
with scripted outcomes.

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
import time
from collections.abc import Iterable
from typing import NoReturn, Protocol

from xatm.core.deadline import GRACE
from xatm.core.logfields import log_fields
from xatm.core.parallel import Outcome
from xatm.core.participant import BranchVotedNo, PhaseTwo, Prepared, Vote
from xatm.core.steps import (
    AwaitWork,
    Branch,
    BranchState,
    CommitOnePhase,
    CommitPrepared,
    Failpoint,
    LogCommit,
    LogEnd,
    PassFence,
    Prepare,
    Rollback,
    Steps,
)
from xatm.core.urls import describe_error
from xatm.core.xid import parse_gtrid
from xatm.errors import (
    LogError,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
)
from xatm.log.base import DecisionNotLogged
from xatm.participants import marker as _marker

logger = logging.getLogger("xatm.transaction")


class TransactionState(enum.Enum):
    """Where a global transaction is in the protocol."""

    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"  # the COMMIT decision is durable
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    IN_DOUBT = "in-doubt"  # outcome settled later by recovery


class Hooks(Protocol):
    """What the protocol asks of the process it runs in, with plain values: no I/O, no
    lock held across a step. The drivers implement it over the manager's context
    (``xatm.transactions.managed.ContextHooks``); a unit test in a few lines."""

    def phase(self, name: str) -> None:
        """The transaction's end enters phase ``name`` (metrics and tracing)."""

    def unheld(self, resources: Iterable[str]) -> BaseException | None:
        """The error for the first resource whose node identity lease is not held now."""

    def marker_candidate(self, branches: list[Branch]) -> str | None:
        """The enlisted resource to carry the decision (commit-marker path), or None."""

    def finished_markers(self, resource: str) -> list[str]:
        """Finished gtrids whose decision rows on ``resource`` the marker branch deletes."""

    def marker_finished(self, resource: str, gtrid: str) -> None:
        """The marker transaction ``gtrid`` is over: its decision row may be deleted."""

    def phase_two_incomplete(self, gtrid: str, pending: list[str]) -> None:
        """A committed transaction left branches ``pending`` for recovery to finish."""


class TransactionCore:
    """A global transaction's state and its commit protocol, free of I/O: the protocol is
    generators yielding operations (``xatm.core.steps``), which :class:`~xatm.Transaction`
    runs with blocking drivers and ``xatm.aio.AsyncTransaction`` awaits."""

    def __init__(self, gtrid: str, timeout: float, hooks: Hooks) -> None:
        self._hooks = hooks
        self.gtrid = gtrid
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self.state = TransactionState.ACTIVE
        self._branches: dict[str, Branch] = {}
        self._rollback_only: str | None = None
        # Fencing with recovery inside this process: recovery may mark an expired,
        # undecided transaction aborted; the decision step refuses to log COMMIT after that
        # (the drivers hold their fence lock around ``try_decide`` and ``try_abort``).
        self._stop: str | None = None  # why the decision is refused (recovery, cancelled)
        self._deciding = False
        #: per resource, held while its branch is enlisted and while a statement runs on it
        #: (a threading.Lock or an asyncio.Lock, made by the driver: ``_lock``)
        self._locks: dict[str, _Lock] = {}
        self._ending = False  # commit or rollback has begun: no new work
        #: the error that made the transaction rollback-only, if one did (a lost connection)
        self._rollback_cause: BaseException | None = None

    def _fields(self, resource: str | None = None) -> dict[str, str]:
        """The fields of this transaction's log records (node, gtrid, resource)."""
        try:
            node: str | None = parse_gtrid(self.gtrid)[0]
        except ValueError:  # a gtrid of a test's own making
            node = None
        return log_fields(node, self.gtrid, resource)

    def set_rollback_only(self, reason: str = "set_rollback_only() was called") -> None:
        """Make the transaction unable to commit: leaving the block will roll it back."""
        self._rollback_only = reason
        self._rollback_cause = None

    @property
    def open(self) -> bool:
        """True until its end (commit or rollback) has begun."""
        return self.state is TransactionState.ACTIVE and not self._ending

    @property
    def branches(self) -> dict[str, BranchState]:
        """The state of each enlisted branch, by resource name."""
        return {name: b.state for name, b in self._branches.items()}

    @property
    def pending_branches(self) -> list[str]:
        """Resources whose branch recovery still has to finish (after a phase-2 failure)."""
        return [n for n, b in self._branches.items() if b.state is BranchState.UNKNOWN]

    def add_branch(self, branch: Branch) -> None:
        """A branch the driver has begun joins the transaction."""
        self._branches[branch.resource] = branch

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

    def _finishing(self) -> None:
        """The steps that end the branches (commit, rollback) may run until the deadline
        plus :data:`xatm.core.deadline.GRACE`: no call outlives the timeout plus that."""
        limit = self.deadline + GRACE
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

    # -- fencing with recovery (the drivers hold their fence lock around these) ------------
    def try_abort(self) -> bool:
        """Recovery's request: mark this transaction aborted if it is past its deadline and
        has not reached its decision. True if it is (now) marked aborted."""
        if self._deciding:
            return False
        if self._stop is not None:
            return True
        if time.monotonic() > self.deadline:
            self._stop = "timeout"
            return True
        return False

    def try_refuse(self, reason: str) -> bool:
        """Make the decision step refuse to commit (and roll back), unless the decision is
        already being made. True if it will be refused."""
        if self._deciding:
            return False
        if self._stop is None:
            self._stop = reason
        return True

    def try_decide(self, refuse: str | None) -> str | None:
        """The fence before the decision (a logged COMMIT, a marker branch's commit, or the
        one-phase commit of the only branch): None if passed (from here on nothing can
        refuse the decision), else why it is refused (recovery marked it aborted, its caller
        was cancelled, "timeout", or ``refuse``: the node's identity lease is not held)."""
        stop = self._stop
        if stop is None and time.monotonic() > self.deadline:
            stop = "timeout"
        if stop is None:
            stop = refuse
        if stop is None:
            self._deciding = True
        return stop

    # -- the protocol, I/O-free: generators yielding operations (xatm.core.steps) ------------
    def commit_steps(self) -> Steps[None]:
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
        chosen = self._hooks.marker_candidate(branches)
        marker = self._branches[chosen] if chosen is not None else None
        if marker is not None:
            yield from self._marker_steps(branches, marker)
            return
        self.state = TransactionState.PREPARING
        yield Failpoint("before_prepare")
        prepared = yield from self._prepare_steps(branches)
        yield Failpoint("after_prepare")
        if len(prepared) > 1:
            yield from self._decide_steps(prepared)
        else:
            # Read-only votes left at most one branch with work: its commit alone decides
            # the outcome, so no decision needs logging (a crash before it commits leaves
            # nothing acknowledged, and presumed abort rolls the branch back).
            yield from self._fence_steps()
        yield Failpoint("after_decision")
        self.state = TransactionState.COMMITTING
        yield from self._commit_all_steps(prepared, logged=len(prepared) > 1)

    def _marker_steps(self, branches: list[Branch], marker: Branch) -> Steps[None]:
        """The commit-marker path (see ``xatm.participants.marker``): prepare the others, then
        commit the marker branch in one phase with the decision row inside it."""
        self.state = TransactionState.PREPARING
        yield Failpoint("before_prepare")
        prepared = yield from self._prepare_steps([b for b in branches if b is not marker])
        yield Failpoint("after_prepare")
        yield from self._fence_steps()
        finished = self._hooks.finished_markers(marker.resource)
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
        yield Failpoint("after_decision")
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
        self._hooks.phase("commit")
        assert branch.conn is not None
        # the commit is the decision: refused like any other
        stop = yield from self._pass_fence_steps(None)
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
        self._hooks.phase("prepare")
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
        self._hooks.phase("decide")
        # decide only where this node's identity lease is held now (xatm.node.identity)
        live = (BranchState.PREPARED, BranchState.ACTIVE)
        lost = self._hooks.unheld(b.resource for b in self._branches.values() if b.state in live)
        stop = yield from self._pass_fence_steps(None if lost is None else str(lost))
        if stop is not None:
            yield from self._rollback_steps()
            self._raise_rolled_back(stop, lost)

    def _pass_fence_steps(self, refuse: str | None) -> Steps[str | None]:
        """Pass the fence before the decision (:meth:`try_decide`, under the driver's fence
        lock): None if passed, else why the decision is refused."""
        stop: str | None = yield PassFence(refuse)
        if stop is None:
            self._finishing()
        return stop

    def _decide_steps(self, branches: list[Branch]) -> Steps[None]:
        yield from self._fence_steps()
        yield Failpoint("before_decision")
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
        # was being forced: the log's flush of the record ends (on disk, or the log broken), so the
        # branches stay prepared for recovery, which decides by what the disk holds.
        raise e

    def _commit_all_steps(
        self, branches: list[Branch], *, logged: bool, marker: str | None = None
    ) -> Steps[None]:
        self._hooks.phase("commit")
        # the driver hits the failpoint after_first_commit once the first branch answered
        outcomes: list[Outcome[PhaseTwo]] = yield CommitPrepared(branches)
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
                    extra=self._fields(branch.resource),
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
                    extra=self._fields(branch.resource),
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
                self._hooks.marker_finished(marker, self.gtrid)
                return
            e = (yield LogEnd(self.gtrid)).error
            if isinstance(e, LogError):
                logger.warning(
                    "could not record the end of %s: %s", self.gtrid, e, extra=self._fields()
                )
            elif e is not None:
                raise e
        else:
            self._hooks.phase_two_incomplete(self.gtrid, self.pending_branches)

    def abort_steps(self) -> Steps[None]:
        """What ``rollback()`` runs: wait for the work still running in other tasks or
        threads, then roll every branch back."""
        yield from self._stop_work_steps()
        yield from self._rollback_steps()

    def _rollback_steps(self) -> Steps[None]:
        """Roll back every branch that may still hold work; never raises a driver error."""
        self._hooks.phase("rollback")
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
                    extra=self._fields(branch.resource),
                )
            else:
                branch.state = BranchState.ROLLED_BACK


class _Lock(Protocol):
    """A resource's lock in a transaction: ``threading.Lock`` or ``asyncio.Lock``."""

    def locked(self) -> bool: ...


def _text(e: BaseException) -> str:
    """A driver's error as xatm shows it (``xatm.core.urls.describe_error``)."""
    return describe_error(e)
