"""The TransactionManager: resources, the coordinator log, and the transactions in flight.

One TransactionManager per process and node_id. It is safe to share between threads; each
transaction it hands out is used by one thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from xatm.coordinator.arguments import (
    ManagerArguments,
    settings_arguments,
    takes_manager_arguments,
)
from xatm.core import events as _events
from xatm.core.admission import Admission
from xatm.core.config import Settings, load_config, validate_timeout, validate_timeout_or_zero
from xatm.core.deadline import step_bound
from xatm.core.participant import Participant
from xatm.core.report import RecoveryReport
from xatm.core.urls import ResourceSpec
from xatm.errors import ConfigurationError, XatmError
from xatm.integrations.sqlalchemy import resources as _sqlalchemy
from xatm.integrations.sqlalchemy.join import SqlAlchemyJoin
from xatm.log.audit import AuditEntry
from xatm.log.shared import PostgresLog
from xatm.log.store import directory_of, open_store, shared_log_of
from xatm.node.context import Context, Resources
from xatm.node.failover import FailoverWatch
from xatm.node.identity import IdentityLocks
from xatm.ops.doctor import DoctorReport
from xatm.ops.inspect import InDoubtReport, Inspector, NodeLog, TransactionInfo
from xatm.ops.resolve import Resolution, resolve
from xatm.participants.adapters import make_participant
from xatm.participants.pool import Pool
from xatm.participants.postgres.participant import PostgresParticipant
from xatm.recovery.run import run_pass
from xatm.recovery.sweeper import Sweeper, sweeper_settings
from xatm.sagas.definition import SagaResult
from xatm.sagas.runner import SagaRecoveryReport, SagaRunner
from xatm.sagas.store import SagaRecord
from xatm.transactions import ambient as _ambient
from xatm.transactions import drain as _drain
from xatm.transactions.ready import check_ready
from xatm.transactions.retry import RetryPolicy
from xatm.transactions.transaction import SagaTransaction, Transaction

if TYPE_CHECKING:
    pass

logger = logging.getLogger("xatm")

T = TypeVar("T")


class TransactionManager:
    """Coordinates global transactions over a fixed set of named resources.

    :param resources: resource name -> URL (``postgresql://``, ``mysql://``, ``mariadb://``...)
        or a SQLAlchemy Engine (``postgresql+psycopg``, ``mysql+mysqlconnector``).
    :param log: a directory for the embedded durable file log.
    :param node_id: this coordinator's identity, carried in every XID it creates; unique per
        live process sharing a log directory.
    :param timeout: seconds a transaction may take; past it, it is rolled back, and recovery
        may abort it.
    :param parallel: overlap the branches' prepare and commit round trips (default), or
        finish each branch's step before starting the next (see ``xatm.core.parallel``).
    :param commit_markers: resources that may carry the commit decision in their own
        ``xatm_decisions`` table (the commit-marker fast path, see ``xatm.participants.marker``).
    :param sweeper: run recovery passes on a background thread (default); see
        ``xatm.recovery.sweeper``. Turn it off only if something else (``xatm sweep``, your own
        calls to :meth:`recover`) resolves this node's in-doubt branches.
    :param sweep_interval: seconds between the sweeper's passes.
    :param lock_timeout: seconds to wait for this node's log lock at start (a previous
        process of the same node_id may still be exiting).
    :param sagas: saga definitions (:class:`~xatm.Saga`, or ``"module:attribute"``) this
        manager runs with :meth:`run_saga` and finishes in recovery (docs/sagas.md).
    :param decision_retention: seconds ended COMMIT decisions are kept in the log, so that
        a branch that a PostgreSQL failover brings back prepared is still committed, and the
        failover report can list what the switch may have lost (``xatm.node.failover``).
    :param max_active: at most this many transactions in their ``with`` block at once
        (None, the default: no limit); the others wait their turn at the start of their
        block, within their timeout (``xatm.core.admission``).
    """

    @takes_manager_arguments  # every argument checked before anything is opened
    def __init__(self, args: ManagerArguments) -> None:
        self._start(args)

    @classmethod
    def _started(cls, args: ManagerArguments) -> TransactionManager:
        """A manager started with arguments checked already (``xatm.aio`` opens its
        threaded manager so)."""
        tm = cls.__new__(cls)
        tm._start(args)
        return tm

    def _start(self, args: ManagerArguments) -> None:
        started_at = time.time() - 0.002  # gtrids made from here on are this process's
        self.node_id = args.node_id
        self.timeout = args.timeout
        self._specs = args.specs
        retain = args.decision_retention
        # the one place the configured kind of log is looked at: everything durable is the
        # store's from here on (xatm.log.store)
        self._store = store = open_store(
            log_directory=args.log_directory, log_spec=args.log_spec, node_id=self.node_id
        )
        self.commit_markers = args.commit_markers
        participants: dict[str, Participant] = {}
        pools: dict[str, Pool] = {}
        for name, spec in self._specs.items():
            participant = make_participant(name, spec, self.timeout)
            participants[name] = participant
            if name in args.engines:
                pools[name] = _sqlalchemy.engine_pool(args.engines[name], participant)
            else:
                pools[name] = Pool(participant, max_idle=args.pool_size)
        log_impl = store.open_log(
            self.node_id,
            segment_bytes=args.segment_bytes,
            lock_timeout=args.lock_timeout,
            retain=retain,
        )
        try:
            # before any connection: each one's timeline is compared with the node's record
            watch = FailoverWatch(self.node_id, store.timelines())
        except BaseException:
            log_impl.close()
            raise
        for participant in participants.values():
            if isinstance(participant, PostgresParticipant):
                participant.watch = watch
        self._sqlalchemy = SqlAlchemyJoin()  # tx.session(), tx.sa_connection()
        self._ctx = Context(
            node_id=self.node_id,
            timeout=self.timeout,
            started_at=started_at,
            resources=Resources(participants, pools, bound=step_bound(self.timeout)),
            log=log_impl,
            store=store,
            audit=store.audit_trail(self.node_id),
            identity=IdentityLocks(participants, self.node_id),
            commit_markers=self.commit_markers,
            parallel=args.parallel,
            failover=watch,
            retain=retain,
            admission=Admission(args.max_active),
        )
        self.parallel = args.parallel
        self.pool_size = args.pool_size
        self._closed = False
        try:
            # before any transaction can use a marker, say where its rows may be, and (holding
            # the log's lock) that this process's gtrids are this log's: a file log's side files
            self._ctx.incarnations = store.record_node(
                self.node_id, markers=self.commit_markers, incarnation=self._ctx.incarnation
            )
            if args.fail_fast:
                check_ready(self._ctx)  # every resource reachable and fit, or one error
            self._ctx.identity.acquire(wait=args.lock_timeout)
            self._ctx.identity.keep()
            self._ctx.resources.reserve()  # recovery's own connections, opened in the background
        except BaseException:
            self._ctx.close()
            raise
        self.sagas = SagaRunner(self, args.sagas, self._ctx.classify)
        self.sweeper = Sweeper(
            self._ctx, args.sweep_interval, after_pass=lambda actor: self.recover_sagas(actor=actor)
        )
        if args.sweeper:
            try:
                self.sweeper.start()
            except BaseException:
                self.close()  # release the log (its lock) and the pools opened above
                raise
        _events.manager_opened(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> TransactionManager:
        """Build a manager from a TOML config file (see ``xatm.core.config``)."""
        return cls.from_settings(load_config(path))

    @classmethod
    def from_settings(cls, settings: Settings) -> TransactionManager:
        """Build a manager from settings read by :func:`xatm.load_config`."""
        a = settings_arguments(settings)
        tm = cls(
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
        tm.sweeper.log_retention = sweeper_settings(settings.extra).log_retention
        return tm

    @property
    def log_directory(self) -> str | None:
        """The log directory (an absolute path); None with a shared log."""
        return directory_of(self._store)

    @property
    def shared_log(self) -> PostgresLog | None:
        """The shared log (its ``PostgresLog``); None with a file log."""
        return shared_log_of(self._store)

    @property
    def context(self) -> Context:
        """What this manager's transactions, recovery and sweeper share (``xatm.aio``
        builds its asyncio transactions on it)."""
        return self._ctx

    # -- transactions -----------------------------------------------------------------------
    def transaction(self, timeout: float | None = None) -> Transaction:
        """A new global transaction, to be used as ``with tm.transaction() as tx:``.

        Refused (:class:`~xatm.TransactionError`) inside the block of another transaction
        of this manager in the same thread or task: xatm does not nest transactions
        (``xatm.transactions.ambient``)."""
        if self._closed:
            raise XatmError("this TransactionManager is closed")
        limit = self.timeout if timeout is None else validate_timeout(timeout)
        _ambient.refuse_nested(self._ctx)
        # registered (as running here) once it enlists a branch
        return Transaction(
            self._ctx, self._ctx.new_gtrid(limit), limit, sqlalchemy=self._sqlalchemy
        )

    def _saga_transaction(self, idempotency_key: str) -> SagaTransaction:
        """The transaction of one saga step (``xatm.sagas.runner``)."""
        if self._closed:
            raise XatmError("this TransactionManager is closed")
        _ambient.refuse_nested(self._ctx)
        gtrid = self._ctx.new_gtrid(self.timeout)
        return SagaTransaction(
            self._ctx, gtrid, self.timeout, idempotency_key, sqlalchemy=self._sqlalchemy
        )

    def run(
        self,
        fn: Callable[[Transaction], T],
        *,
        retries: int = 3,
        timeout: float | None = None,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> T:
        """Run ``fn(tx)`` in a transaction and commit it; run it again (up to ``retries``
        more times, after a backoff) when it failed in a way that is safe to retry: a
        deadlock, a serialization failure, a lock timeout or a lost connection before the
        decision, never an in-doubt outcome (``xatm.transactions.retry``). Returns what ``fn``
        returned in the run that committed; raises the last error otherwise."""
        policy = RetryPolicy.of(retries, backoff, max_backoff, self._ctx.classify)
        attempt = 0
        while True:
            attempt += 1
            tx = self.transaction(timeout)
            try:
                with tx:
                    result = fn(tx)
                return result
            except Exception as e:
                wait = policy.delay(attempt, e, tx.gtrid)
                if wait is None:
                    raise
            time.sleep(wait)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun: no transaction begins any more."""
        return self._closed

    def recover(
        self,
        *,
        dry_run: bool = False,
        actor: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RecoveryReport:
        """One recovery pass over every resource; see ``xatm.recovery.run`` for what it does.

        ``dry_run``: only report what the pass would do (nothing is changed, no log is
        locked). ``actor`` names who asked, in the audit trail (default ``recover@<node>``);
        ``progress`` is called with a short text as the pass goes."""
        report = run_pass(self._ctx, dry_run=dry_run, actor=actor, progress=progress)
        if not dry_run:
            self.recover_sagas(actor=actor or f"recover@{self.node_id}")
        return report

    # -- sagas (xatm.sagas.runner) ----------------------------------------------------------
    def run_saga(
        self,
        name: str,
        data: Any = None,
        key: str | None = None,
        *,
        wait: float = 30.0,
        actor: str = "api",
    ) -> SagaResult:
        """Run the registered saga ``name`` on the JSON payload ``data``; see docs/sagas.md.

        ``key``: an idempotency key; the same saga and key again (from any process sharing
        the log) returns the first run's result without running anything, waiting up to
        ``wait`` seconds if that run is still going (then :class:`~xatm.SagaInProgress`)."""
        if self._closed:
            raise XatmError("this TransactionManager is closed")
        _ambient.refuse_nested(self._ctx)  # its steps are transactions of their own
        return self.sagas.run(name, data, key, wait=wait, actor=actor)

    def recover_sagas(self, actor: str | None = None) -> SagaRecoveryReport:
        """Finish the sagas whose owner died (``recover()`` and the sweeper call this)."""
        return self.sagas.recover(actor or f"recover@{self.node_id}")

    def saga(self, saga_id: str) -> SagaRecord | None:
        """The durable record of one saga, or None."""
        return self.sagas.get(saga_id)

    def saga_action(
        self, saga_id: str, what: str, *, force: bool = False, actor: str = "api"
    ) -> SagaResult:
        """``"retry"`` or ``"abort"`` one saga by hand (refused while its owner lives)."""
        if what not in ("retry", "abort"):
            raise ConfigurationError(f"a saga action is 'retry' or 'abort', not {what!r}")
        _ambient.refuse_nested(self._ctx)
        return self.sagas.act(saga_id, what, force=force, actor=actor)

    # -- operations -------------------------------------------------------------------------
    @property
    def inspector(self) -> Inspector:
        """A read-only view of the resources, the logs and the audit trail."""
        return Inspector.of_node(self._ctx)

    def indoubt(self) -> InDoubtReport:
        """Every in-doubt global transaction across the resources, oldest first."""
        return self.inspector.indoubt()

    def show(self, gtrid: str) -> TransactionInfo:
        """Everything known about one global transaction, with its audit trail."""
        return self.inspector.show(gtrid)

    def logs(self) -> list[NodeLog]:
        """The coordinator logs (this node's and its peers') under the log directory."""
        return self.inspector.logs()

    def audit_trail(self, gtrid: str | None = None) -> list[AuditEntry]:
        """The audit trail of every node sharing the log directory (of one gtrid if given)."""
        return self.inspector.audit(gtrid)

    def doctor(self) -> DoctorReport:
        """Check that every resource and the log directory are fit for two-phase commit."""
        return self.inspector.doctor()

    def resolve(
        self, gtrid: str, outcome: str, *, force: bool = False, actor: str = "api"
    ) -> Resolution:
        """Commit or roll back one in-doubt transaction by hand (see ``xatm.ops.resolve``):
        refused (:class:`~xatm.admin.ResolutionRefused`) when it could break atomicity, unless
        ``force``."""
        return resolve(self._ctx, gtrid, outcome, force=force, actor=actor)

    @property
    def resource_names(self) -> Iterable[str]:
        return self._specs.keys()

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        """The resources, by name (their ``repr`` hides passwords)."""
        return dict(self._specs)

    def close(self, drain: float | None = None) -> None:
        """Let the transactions in flight finish, then flush the log, close every pooled
        connection and release the log's lock.

        No transaction begins once this is called; those running (in other threads) are
        waited for up to ``drain`` seconds (the manager's ``timeout`` by default), and the
        ones still running then are rolled back, with an error saying that the manager was
        closed (``xatm.transactions.drain``)."""
        if self._closed:
            return
        self._closed = True
        wait = self.timeout if drain is None else validate_timeout_or_zero(drain)
        own = _ambient.current(self._ctx)
        _drain.drain(self._ctx, wait, own=None if own is None else own.gtrid)
        _events.manager_closed(self)
        self.sweeper.stop()
        self.sagas.close()
        self._ctx.close()

    def __enter__(self) -> TransactionManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<TransactionManager node_id={self.node_id!r} resources={sorted(self._specs)}"
            f" log={self.log_directory!r}>"
        )
