"""The TransactionManager: resources, the coordinator log, and the transactions in flight.

One TransactionManager per process and node_id. It is safe to share between threads; each
transaction it hands out is used by one thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _marker, _sqlalchemy
from ._audit import AuditEntry, AuditTrail
from ._config import Settings, load_config, resource_specs, validate_timeout
from ._doctor import DoctorReport
from ._filelog import DEFAULT_SEGMENT_BYTES, FileLog
from ._inspect import InDoubtReport, Inspector, NodeLog, TransactionInfo
from ._log import CoordinatorLog
from ._mysql import MySQLParticipant
from ._participant import Connection, Participant
from ._pglog import PostgresLog
from ._pool import Pool
from ._postgres import PostgresParticipant
from ._recovery import RecoveryReport, run_pass
from ._resolve import Resolution, resolve
from ._saga import Saga, SagaResult, registry
from ._saga_runner import SagaRecoveryReport, SagaRunner
from ._saga_store import SagaRecord
from ._sweeper import DEFAULT_INTERVAL, Sweeper, sweeper_settings
from ._transaction import Branch, Transaction, describe_unknown_resource
from ._urls import ResourceSpec, parse_url, redact
from ._xid import new_gtrid, validate_node_id
from .errors import ConfigurationError, ResourceNotFit, XatmError

logger = logging.getLogger("xatm")

#: overlap branch round trips only while at most this many transactions are active
OVERLAP_MAX_ACTIVE = 2


def make_participant(name: str, spec: ResourceSpec) -> Participant:
    """The participant adapter for ``spec``'s kind of server."""
    if spec.kind == "postgresql":
        return PostgresParticipant(name, spec)
    return MySQLParticipant(name, spec)


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
        finish each branch's step before starting the next (see ``xatm._parallel``).
    :param commit_markers: resources that may carry the commit decision in their own
        ``xatm_decisions`` table (the commit-marker fast path, see ``xatm._marker``).
    :param sweeper: run recovery passes on a background thread (default); see
        ``xatm._sweeper``. Turn it off only if something else (``xatm sweep``, your own
        calls to :meth:`recover`) resolves this node's in-doubt branches.
    :param sweep_interval: seconds between the sweeper's passes.
    :param lock_timeout: seconds to wait for this node's log lock at start (a previous
        process of the same node_id may still be exiting).
    :param sagas: saga definitions (:class:`~xatm.Saga`, or ``"module:attribute"``) this
        manager runs with :meth:`run_saga` and finishes in recovery (docs/sagas.md).
    """

    def __init__(
        self,
        resources: Mapping[str, str | ResourceSpec | Any],
        log: str | os.PathLike[str],
        node_id: str,
        timeout: float = 30.0,
        *,
        parallel: bool = True,
        pool_size: int = 32,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        commit_markers: Iterable[str] = (),
        sweeper: bool = True,
        sweep_interval: float = DEFAULT_INTERVAL,
        lock_timeout: float = 30.0,
        sagas: Iterable[Saga | str] = (),
    ) -> None:
        self.node_id = validate_node_id(node_id)
        self._started_at = time.time() - 0.002  # gtrids made from here on are this process's
        self.timeout = validate_timeout(timeout)
        engines = {n: e for n, e in dict(resources).items() if _sqlalchemy.is_engine(e)}
        self._specs = resource_specs(
            {
                n: _sqlalchemy.spec_from_engine(engines[n]) if n in engines else v
                for n, v in dict(resources).items()
            }
        )
        if not isinstance(log, str | os.PathLike) or not str(log):
            raise ConfigurationError("log must be a directory path or a PostgreSQL URL")
        self.shared_log: PostgresLog | None = None
        self.log_directory: str | None = None
        if "://" in str(log):
            log_spec = parse_url(str(log))  # errors never show the password
            if log_spec.kind != "postgresql":
                raise ConfigurationError(
                    f"log {log_spec.redacted()}: a shared log must be a PostgreSQL database"
                )
        else:
            self.log_directory = str(Path(log).resolve())
        self.commit_markers = frozenset(commit_markers)
        unknown = self.commit_markers - set(self._specs)
        if unknown:
            raise ConfigurationError(
                f"commit_markers names unknown resource(s): {', '.join(sorted(unknown))}"
            )
        if self.commit_markers and self.log_directory is None:
            raise ConfigurationError(
                "commit_markers cannot be combined with a shared log yet: a sweeper on another"
                " host could not fence a paused coordinator's marker commit"
            )
        self._participants: dict[str, Participant] = {}
        self._pools: dict[str, Pool] = {}
        for name, spec in self._specs.items():
            participant = make_participant(name, spec)
            self._participants[name] = participant
            if name in engines:
                self._pools[name] = _sqlalchemy.engine_pool(engines[name], participant, pool_size)
            else:
                self._pools[name] = Pool(participant, max_idle=pool_size)
        if self.log_directory is None:
            self.shared_log = PostgresLog(log_spec, self.node_id)
            self._log: CoordinatorLog = self.shared_log
        else:
            self._log = FileLog(
                self.log_directory,
                self.node_id,
                segment_bytes=segment_bytes,
                lock_timeout=lock_timeout,
            )
        self._finished: dict[str, list[str]] = {name: [] for name in self.commit_markers}
        self.parallel = parallel
        self._lock = threading.Lock()
        self._active: dict[str, Transaction] = {}
        self._closed = False
        # recovery passes, sweeper passes and manual resolutions never overlap
        self._recovery_lock = threading.Lock()
        self._audit = AuditTrail(self.log_directory, self.node_id, self.shared_log)
        self._expired_noted: set[str] = set()
        # resources seen holding commit-marker decision rows (recovery must read them)
        self._marker_resources: set[str] = set(self.commit_markers)
        # resources read and found without that table (so a down one of them hides nothing)
        self._markerless_resources: set[str] = set()
        self.sagas = SagaRunner(self, registry(sagas))
        self.sweeper = Sweeper(self, sweep_interval)
        if sweeper:
            self.sweeper.start()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> TransactionManager:
        """Build a manager from a TOML config file (see ``xatm._config``)."""
        settings = load_config(path)
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> TransactionManager:
        sweep = sweeper_settings(settings.extra)
        return cls(
            dict(settings.resources),
            settings.log,
            settings.node_id,
            settings.timeout,
            commit_markers=settings.commit_markers,
            sweeper=sweep.enabled,
            sweep_interval=sweep.interval,
            sagas=settings.extra.get("sagas", ()),
        )

    # -- transactions -----------------------------------------------------------------------
    def transaction(self, timeout: float | None = None) -> Transaction:
        """A new global transaction, to be used as ``with tm.transaction() as tx:``."""
        if self._closed:
            raise XatmError("this TransactionManager is closed")
        limit = self.timeout if timeout is None else validate_timeout(timeout)
        gtrid = new_gtrid(self.node_id, marker=bool(self.commit_markers), long=limit > self.timeout)
        tx = Transaction(self, gtrid, limit)
        with self._lock:
            self._active[tx.gtrid] = tx
        return tx

    def recover(
        self,
        *,
        dry_run: bool = False,
        actor: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RecoveryReport:
        """One recovery pass over every resource; see ``xatm._recovery`` for what it does.

        ``dry_run``: only report what the pass would do (nothing is changed, no log is
        locked). ``actor`` names who asked, in the audit trail (default ``recover@<node>``);
        ``progress`` is called with a short text as the pass goes."""
        report = run_pass(self, dry_run=dry_run, actor=actor, progress=progress)
        if not dry_run:
            self.recover_sagas(actor=actor or f"recover@{self.node_id}")
        return report

    # -- sagas (xatm._saga_runner) ----------------------------------------------------------
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
        return self.sagas.act(saga_id, what, force=force, actor=actor)

    # -- operations -------------------------------------------------------------------------
    @property
    def inspector(self) -> Inspector:
        """A read-only view of the resources, the logs and the audit trail."""
        return Inspector(
            self._participants,
            self.log_directory,
            pools=self._pools,
            own_node=self.node_id,
            own_pending=self._log.pending,
            running=lambda gtrid: self._running(gtrid) is not None,
            commit_markers=self.commit_markers,
            timeout=self.timeout,
            shared_log=self.shared_log,
        )

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
        """Commit or roll back one in-doubt transaction by hand (see ``xatm._resolve``):
        refused (:class:`~xatm.ResolutionRefused`) when it could break atomicity, unless
        ``force``."""
        return resolve(self, gtrid, outcome, force=force, actor=actor)

    @property
    def resource_names(self) -> Iterable[str]:
        return self._specs.keys()

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        """The resources, by name (their ``repr`` hides passwords)."""
        return dict(self._specs)

    def close(self) -> None:
        """Flush the log, close every pooled connection and release the log's lock."""
        if self._closed:
            return
        self._closed = True
        self.sweeper.stop()
        self.sagas.close()
        for pool in self._pools.values():
            pool.close()
        self._log.close()
        self._audit.close()

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

    # -- for Transaction and recovery -------------------------------------------------------
    def _resource(self, name: str) -> tuple[Participant, Pool]:
        participant = self._participants.get(name)
        if participant is None:
            raise describe_unknown_resource(name, list(self._participants))
        return participant, self._pools[name]

    def _overlap(self) -> bool:
        """Overlap the branches' round trips? Only while few transactions are in flight:
        it cuts one transaction's latency, but costs client CPU (pipeline mode), which is
        what limits throughput once many run at once."""
        return self.parallel and len(self._active) <= OVERLAP_MAX_ACTIVE

    def _marker_branch(self, branches: list[Branch]) -> Branch | None:
        """The branch to carry the decision (commit-marker path), or None for strict 2PC.

        The first enlisted marker resource wins, PostgreSQL before MySQL (its decision row
        and commit go in one round trip)."""
        candidates = [b for b in branches if b.resource in self.commit_markers]
        candidates.sort(key=lambda b: b.participant.kind != "postgresql")
        return candidates[0] if candidates else None

    def _finished_markers(self, resource: str) -> list[str]:
        """A batch of finished gtrids whose decision rows on ``resource`` can be deleted."""
        with self._lock:
            done = self._finished[resource]
            if len(done) < _marker.DELETE_AFTER:
                return []
            batch, self._finished[resource] = (
                done[: _marker.DELETE_BATCH],
                done[_marker.DELETE_BATCH :],
            )
            return batch

    def _marker_finished(self, resource: str, gtrid: str) -> None:
        with self._lock:
            self._finished[resource].append(gtrid)

    def _first_connection(self, participant: Participant, conn: Connection) -> None:
        """Set-up on a resource's first connection: the marker table, if it carries markers."""
        if participant.name in self.commit_markers:
            try:
                _marker.ensure_table(participant, conn)
            except Exception as e:
                if participant.is_connection_error(e):
                    raise
                raise ResourceNotFit(
                    f"resource {participant.name!r} carries commit markers but its table"
                    f" {_marker.TABLE} cannot be created: {redact(str(e))}",
                    resource=participant.name,
                ) from None

    def _running(self, gtrid: str) -> Transaction | None:
        with self._lock:
            return self._active.get(gtrid)

    def _note_expired(self, gtrid: str, resource: str, actor: str) -> None:
        """Audit (once per transaction) that recovery marked a running one aborted."""
        with self._lock:
            self._expired_noted &= set(self._active)
            if gtrid in self._expired_noted:
                return
            self._expired_noted.add(gtrid)
        logger.warning("transaction %s is past its timeout: marked aborted by recovery", gtrid)
        self._audit.record(
            gtrid,
            resource,
            resource,
            "expire",
            "past its timeout and not decided",
            "marked aborted: its coordinator rolls it back",
            actor,
        )

    def _forget(self, tx: Transaction) -> None:
        with self._lock:
            self._active.pop(tx.gtrid, None)

    def _phase_two_incomplete(self, tx: Transaction) -> None:
        """Called when a committed transaction left branches for recovery to finish."""
        logger.warning(
            "transaction %s committed with branches left for recovery: %s",
            tx.gtrid,
            ", ".join(tx.pending_branches),
        )
