"""What the threaded and the asyncio transaction share around the I/O-free protocol.

``xatm.transactions.protocol.TransactionCore`` takes no lock, fires no failpoint and calls
nothing of the manager. :class:`ManagedTransaction` binds it to a manager's
:class:`~xatm.node.context.Context` for both drivers (``xatm.transactions.transaction``
with blocking drivers, ``xatm.transactions.aio`` with asyncio ones): the context behind the
protocol's :class:`~xatm.transactions.protocol.Hooks` (:class:`ContextHooks`), the decision
fence's lock (held around the ``PassFence`` step and around recovery's requests), the
failpoints (``Failpoint`` steps, and ``after_first_commit`` inside phase 2), the checks of
enlistment, and the bookkeeping of the end. Only awaits and blocking calls differ between
the two drivers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from xatm.core import deadline as _deadline
from xatm.core import events as _events
from xatm.core import failpoint as _failpoint
from xatm.core.logfields import log_fields
from xatm.core.participant import Connection
from xatm.core.steps import Branch, Failpoint, PassFence
from xatm.errors import TransactionError
from xatm.transactions import ambient as _ambient
from xatm.transactions.protocol import TransactionCore, TransactionState

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.transaction")

#: the end a driver runs: its ``commit`` or ``rollback`` (a call, or a coroutine function)
E = TypeVar("E")

#: the waits before the begins tried again while a lost session still holds the branch's xid
XID_IN_USE_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25)

#: the steps that do no I/O, which both drivers run with ``ManagedTransaction._local``
LOCAL_STEPS = (PassFence, Failpoint)


class ContextHooks:
    """The protocol's :class:`~xatm.transactions.protocol.Hooks` over a manager's context
    and the transaction's timeline (metrics and tracing)."""

    __slots__ = ("_ctx", "_trace")

    def __init__(self, ctx: Context, trace: _events.NullTimeline) -> None:
        self._ctx = ctx
        self._trace = trace

    def phase(self, name: str) -> None:
        self._trace.phase(name)

    def unheld(self, resources: Iterable[str]) -> BaseException | None:
        return self._ctx.identity.unheld(resources)

    def marker_candidate(self, branches: list[Branch]) -> str | None:
        return self._ctx.marker_candidate((b.resource, b.participant) for b in branches)

    def finished_markers(self, resource: str) -> list[str]:
        return self._ctx.finished_markers(resource)

    def marker_finished(self, resource: str, gtrid: str) -> None:
        self._ctx.marker_finished(resource, gtrid)

    def phase_two_incomplete(self, gtrid: str, pending: list[str]) -> None:
        self._ctx.phase_two_incomplete(gtrid, pending)


class ManagedTransaction(TransactionCore):
    """A :class:`~xatm.transactions.protocol.TransactionCore` run by a manager: what the
    threaded and the asyncio transaction share (neither an await nor a blocking call)."""

    def __init__(self, ctx: Context, gtrid: str, timeout: float) -> None:
        trace = _events.timeline(ctx.node_id, gtrid)  # metrics and tracing
        super().__init__(gtrid, timeout, ContextHooks(ctx, trace))
        self._ctx = ctx
        self._trace = trace
        # Fencing with recovery inside this process: held around the decision step
        # (``PassFence``) and recovery's requests, which may come from other threads.
        self._fence = threading.Lock()
        # Callbacks of integrations (SQLAlchemy sessions, see
        # xatm.integrations.sqlalchemy.session): the first run at the start of commit, before
        # anything is prepared (they may still do work and enlist branches); the second once the
        # transaction has ended, whatever its outcome.
        self._before_prepare: list[Callable[[], None]] = []
        self._after_end: list[Callable[[], None]] = []
        # what integrations keep with this transaction (``Transaction.annotate``), by a key
        # object of their own
        self._annotations: dict[object, Any] = {}
        #: set for a saga step: stable per saga, step and op (action / compensation), the
        #: same on every retry and after recovery, for outside services to deduplicate on
        self.idempotency_key: str | None = None

    @property
    def context(self) -> Context:
        """The manager's shared context (resources, pools, log), for integrations."""
        return self._ctx

    # -- fencing with recovery ------------------------------------------------------------
    def abort_if_expired(self) -> bool:
        """Recovery's request: mark this transaction aborted if it is past its deadline and
        has not reached its decision. True if it is (now) marked aborted."""
        with self._fence:
            return self.try_abort()

    def refuse_decision(self, reason: str) -> bool:
        """Make the decision step refuse to commit (and roll back), unless the decision is
        already being made. True if it will be refused."""
        with self._fence:
            return self.try_refuse(reason)

    def _local(self, op: PassFence | Failpoint) -> str | None:
        """Run a step that does no I/O: the decision fence (under the fence lock), or a
        failpoint (the process crashes or pauses here if it is the active one)."""
        if isinstance(op, PassFence):
            with self._fence:
                return self.try_decide(op.refuse)
        _failpoint.hit(op.name)
        return None

    # -- enlistment -------------------------------------------------------------------------
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

    def _watch(self, owner: _deadline.Sockets, conn: Connection) -> _deadline.Watch:
        """The deadline of a branch's connection, from enlistment until it is given back:
        the transaction's own until its decision, then ``_finishing``'s."""
        return _deadline.arm(owner, conn, self.deadline, f"transaction {self.gtrid}", busy=0)

    def _retry_begin(
        self,
        e: BaseException,
        attempt: int,
        watch: _deadline.Watch,
        name: str,
        lost: bool,
        in_use: bool,
    ) -> float:
        """After failed begin number ``attempt`` (its connection already discarded): raise
        what the caller is to see, or return the seconds to wait before trying again on a
        fresh connection. ``lost``: the error says the connection was lost (the pool's
        others are likely dead too: the caller clears it); tried again once, at once.
        ``in_use``: that second begin found the branch's xid still held, by the session of
        the lost connection, which the server is still ending; tried again after a short
        wait, up to :data:`XID_IN_USE_WAITS` times (about 2 s), within the deadline."""
        if watch.fired:
            raise self._silent(name) from e
        if attempt == 1 and lost:
            return 0.0
        if attempt > 1 and in_use and attempt - 1 <= len(XID_IN_USE_WAITS):
            delay = XID_IN_USE_WAITS[attempt - 2]
            if time.monotonic() + delay < self.deadline:
                return delay
        raise e

    def _begin_time_left(self, e: BaseException) -> None:
        """Raise ``e`` again if the transaction has no time left for another begin."""
        if time.monotonic() > self.deadline:
            raise e

    # -- the end ----------------------------------------------------------------------------
    def _leaving(self, exc: BaseException | None, commit: E, rollback: E) -> E | None:
        """Leaving the ``with`` block: ``commit`` if it ended normally, ``rollback`` if it
        raised ``exc``, None if the transaction was ended inside it already."""
        _ambient.leave(self)
        if self.state is not TransactionState.ACTIVE:
            self._ctx.forget(self)
            return None
        return rollback if exc is not None else commit

    def _hold(self) -> None:
        """The end begins: a transaction with branches stays registered until it is over,
        whoever refers to it."""
        if self._branches:
            self._ctx.register(self, hold=True)

    def _ended(self) -> None:
        self._ctx.forget(self)
        self._trace.finish(self.state)
        callbacks, self._after_end = self._after_end, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the outcome is final: a callback's failure only gets logged
                logger.exception(
                    "an end-of-transaction callback of %s failed",
                    self.gtrid,
                    extra=log_fields(self._ctx.node_id, self.gtrid),
                )


def after_first_commit() -> None:
    """Phase 2: the first branch's answer is in (the failpoint ``after_first_commit``)."""
    _failpoint.hit("after_first_commit")
