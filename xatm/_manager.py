"""The TransactionManager: resources, the coordinator log, and the transactions in flight.

One TransactionManager per process and node_id. It is safe to share between threads; each
transaction it hands out is used by one thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _marker, _sqlalchemy
from ._config import Settings, load_config, resource_specs, validate_timeout
from ._filelog import DEFAULT_SEGMENT_BYTES, FileLog
from ._log import CoordinatorLog
from ._mysql import MySQLParticipant
from ._parallel import Fanout
from ._participant import Connection, Participant
from ._pool import Pool
from ._postgres import PostgresParticipant
from ._recovery import RecoveryReport, run_pass
from ._transaction import Branch, Transaction, describe_unknown_resource
from ._urls import ResourceSpec, redact
from ._xid import new_gtrid, validate_node_id
from .errors import ConfigurationError, ResourceNotFit, XatmError

logger = logging.getLogger("xatm")


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
    :param parallel: prepare and commit the branches concurrently (default) or in turn.
    :param commit_markers: resources that may carry the commit decision in their own
        ``xatm_decisions`` table (the commit-marker fast path, see ``xatm._marker``).
    """

    def __init__(
        self,
        resources: Mapping[str, str | ResourceSpec | Any],
        log: str | os.PathLike[str],
        node_id: str,
        timeout: float = 30.0,
        *,
        parallel: bool = True,
        pool_size: int = 8,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        commit_markers: Iterable[str] = (),
    ) -> None:
        self.node_id = validate_node_id(node_id)
        self.timeout = validate_timeout(timeout)
        engines = {n: e for n, e in dict(resources).items() if _sqlalchemy.is_engine(e)}
        self._specs = resource_specs(
            {
                n: _sqlalchemy.spec_from_engine(engines[n]) if n in engines else v
                for n, v in dict(resources).items()
            }
        )
        if not isinstance(log, str | os.PathLike) or not str(log):
            raise ConfigurationError("log must be a directory path")
        if "://" in str(log):
            raise ConfigurationError(
                f"log {str(log)!r}: only a directory (the file log) is supported here"
            )
        self.log_directory: str | None = str(Path(log).resolve())
        self._participants: dict[str, Participant] = {}
        self._pools: dict[str, Pool] = {}
        for name, spec in self._specs.items():
            participant = make_participant(name, spec)
            self._participants[name] = participant
            if name in engines:
                self._pools[name] = _sqlalchemy.engine_pool(engines[name], participant, pool_size)
            else:
                self._pools[name] = Pool(participant, max_idle=pool_size)
        self._log: CoordinatorLog = FileLog(
            self.log_directory, self.node_id, segment_bytes=segment_bytes, lock_timeout=30.0
        )
        self.commit_markers = frozenset(commit_markers)
        unknown = self.commit_markers - set(self._specs)
        if unknown:
            raise ConfigurationError(
                f"commit_markers names unknown resource(s): {', '.join(sorted(unknown))}"
            )
        self._finished: dict[str, list[str]] = {name: [] for name in self.commit_markers}
        self._fanout = Fanout(parallel)
        self._lock = threading.Lock()
        self._active: dict[str, Transaction] = {}
        self._closed = False

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> TransactionManager:
        """Build a manager from a TOML config file (see ``xatm._config``)."""
        settings = load_config(path)
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> TransactionManager:
        return cls(
            dict(settings.resources),
            settings.log,
            settings.node_id,
            settings.timeout,
            commit_markers=settings.commit_markers,
        )

    # -- transactions -----------------------------------------------------------------------
    def transaction(self, timeout: float | None = None) -> Transaction:
        """A new global transaction, to be used as ``with tm.transaction() as tx:``."""
        if self._closed:
            raise XatmError("this TransactionManager is closed")
        tx = Transaction(
            self,
            new_gtrid(self.node_id),
            self.timeout if timeout is None else validate_timeout(timeout),
        )
        with self._lock:
            self._active[tx.gtrid] = tx
        return tx

    def recover(self, *, dry_run: bool = False) -> RecoveryReport:
        """One recovery pass over every resource; see ``xatm._recovery`` for what it does."""
        return run_pass(self, dry_run=dry_run)

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
        self._fanout.close()
        for pool in self._pools.values():
            pool.close()
        self._log.close()

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
