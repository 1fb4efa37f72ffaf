"""The seam between a manager and the pieces that do its work.

A :class:`TransactionManager <xatm.TransactionManager>` builds one :class:`Context` and hands
it to its transactions, recovery passes, manual resolutions, inspector and sweeper, instead of
itself. The context holds what they share: the :class:`Resources` (participants, pools, and
the one way to borrow a connection), the coordinator log, the node's store (everything it keeps
durably, of the kind the configuration chose: ``xatm.log.store``), the audit trail, the node's
identity locks, and the registry of the transactions running in this process. No module outside
``_manager`` needs the manager's private state, and none of them imports ``_manager``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from xatm.core import deadline as _deadline
from xatm.core.admission import Admission
from xatm.core.logfields import log_fields
from xatm.core.participant import Connection, ErrorKind, Participant, classify
from xatm.core.urls import redact
from xatm.core.xid import incarnation_of, new_gtrid, new_incarnation
from xatm.errors import ConfigurationError, ResourceNotFit
from xatm.participants import marker as _marker
from xatm.participants.pool import Pool, silent

if TYPE_CHECKING:
    from xatm.log.audit import Audit
    from xatm.log.base import CoordinatorLog
    from xatm.log.fleet import Fleet
    from xatm.log.store import Store
    from xatm.log.view import LogView
    from xatm.node.failover import FailoverWatch
    from xatm.node.identity import IdentityLocks

logger = logging.getLogger("xatm")

#: overlap branch round trips only while at most this many transactions are active
OVERLAP_MAX_ACTIVE = 2


def unknown_resource(name: str, known: Sequence[str]) -> ConfigurationError:
    """The error for a resource name that is not configured (says which ones are)."""
    return ConfigurationError(
        f"unknown resource {name!r}; this transaction manager has: {', '.join(sorted(known))}"
    )


class Resources:
    """The configured resources: a participant and a pool each, and borrowing.

    Recovery borrows from pools of its own (``recovery=True``), one connection kept per
    resource apart from the transactions' pool, so that a server whose connections are all
    taken by sessions waiting on in-doubt locks still lets this process's recovery in
    (:meth:`reserve` opens them in the background at start)."""

    def __init__(
        self,
        participants: Mapping[str, Participant],
        pools: Mapping[str, Pool],
        *,
        bound: float = 30.0 + _deadline.GRACE,
    ) -> None:
        self._participants = dict(participants)
        self._pools = dict(pools)
        self._recovery_pools = {n: Pool(p, max_idle=1) for n, p in self._participants.items()}
        #: seconds a borrowed connection's calls may take (``xatm.core.deadline``), renewed at
        #: each step of a long loop (``xatm.core.deadline.renew``)
        self.bound = bound

    @property
    def names(self) -> list[str]:
        return list(self._participants)

    @property
    def participants(self) -> Mapping[str, Participant]:
        return dict(self._participants)

    @property
    def pools(self) -> Mapping[str, Pool]:
        return dict(self._pools)

    def __contains__(self, name: object) -> bool:
        return name in self._participants

    def get(self, name: str, *, recovery: bool = False) -> tuple[Participant, Pool]:
        """The participant and pool of ``name`` (recovery's own pool with ``recovery``);
        ConfigurationError if it is unknown."""
        participant = self._participants.get(name)
        if participant is None:
            raise unknown_resource(name, list(self._participants))
        return participant, (self._recovery_pools if recovery else self._pools)[name]

    @contextlib.contextmanager
    def borrow(
        self, name: str, *, recovery: bool = False, what: str = "a recovery step"
    ) -> Iterator[tuple[Participant, Connection]]:
        """A pooled connection of ``name`` for the ``with`` block: given back if the block
        ends normally (the pool closes it unless it is idle), closed if the block raised
        (its state is unknown). Getting it may raise ResourceError. Its calls are bounded
        by :attr:`bound` seconds (``xatm.core.deadline``: a silent server's call is cut, and
        fails as a lost connection)."""
        participant, pool = self.get(name, recovery=recovery)
        conn = pool.get()
        try:
            with _deadline.bounded(participant, conn, self.bound, what) as watch:
                yield participant, conn
        except BaseException as e:
            pool.discard(conn)
            if watch.fired and isinstance(e, Exception) and participant.is_connection_error(e):
                raise silent(participant, self.bound, what) from e
            raise
        if watch.fired:
            pool.discard(conn)
        else:
            pool.put(conn)

    def reserve(self) -> None:
        """Open recovery's connection to each resource, on a background thread (a down one
        is tried again by the first pass that needs it; a lost one is replaced)."""

        def run() -> None:
            for name, pool in self._recovery_pools.items():
                try:
                    pool.put(pool.get())
                except Exception as e:  # a background thread: report, never raise
                    logger.info(
                        "no recovery connection to %r yet: %s",
                        name,
                        redact(str(e)),
                        extra=log_fields(resource=name),
                    )

        threading.Thread(target=run, name="xatm-reserve", daemon=True).start()

    def close(self) -> None:
        for pool in [*self._pools.values(), *self._recovery_pools.values()]:
            pool.close()


class Running(Protocol):
    """A transaction running in this process, as recovery sees it."""

    gtrid: str
    deadline: float

    def abort_if_expired(self) -> bool: ...

    def refuse_decision(self, reason: str) -> bool: ...


@dataclass(eq=False)
class Context:
    """What a manager's transactions, recovery, resolution and sweeper share."""

    node_id: str
    timeout: float
    started_at: float  # gtrids made from here on are this process's
    resources: Resources
    log: CoordinatorLog
    #: where the node keeps its durable state (``xatm.log.store``), the log included
    store: Store
    audit: Audit
    identity: IdentityLocks
    commit_markers: frozenset[str] = frozenset()
    parallel: bool = True
    #: this manager's incarnation, carried in every gtrid it makes (``xatm.log.incarnations``)
    incarnation: str = field(default_factory=new_incarnation)
    #: the incarnations this node's file log lists, this one's included (None: the store keeps
    #: no side files: the shared log)
    incarnations: frozenset[str] | None = None
    #: the node's view of its PostgreSQL resources' timelines (failover detection)
    failover: FailoverWatch | None = None
    #: seconds ended COMMIT decisions are kept (the logs' retention window)
    retain: float = 300.0
    #: how many threaded transactions may be in their block at once (``max_active``)
    admission: Admission = field(default_factory=Admission)
    #: why the manager no longer begins transactions (it is closing: ``xatm.transactions.drain``)
    closing: str | None = None
    #: recovery passes, sweeper passes and manual resolutions never overlap
    recovery_lock: threading.Lock = field(default_factory=threading.Lock)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: the transactions running here, from their first branch on; weakly held, so that one
    #: the application dropped without ending it is collected (with its connections, whose
    #: servers then roll its unprepared work back) ...
    _active: weakref.WeakValueDictionary[str, Running] = field(
        default_factory=weakref.WeakValueDictionary
    )
    #: ... except from the start of its end (commit or rollback) until it is over
    _held: dict[str, Running] = field(default_factory=dict)
    _expired_noted: set[str] = field(default_factory=set)
    _finished: dict[str, list[str]] = field(default_factory=dict)
    _strangers_noted: set[str] = field(default_factory=set)

    def classify(self, exc: BaseException) -> ErrorKind:
        """What ``exc`` (one error, not its causes) is, as this node's participants read it."""
        return classify(exc, self.resources.participants.values())

    # -- transactions running here ---------------------------------------------------------
    def log_view(self) -> LogView:
        """The view of this manager's logs: its node is this process's, its log its own."""
        return self.store.view(own_node=self.node_id, own_log=self.log)

    def fleet(self, *, dry_run: bool) -> Fleet:
        """The logs as one recovery pass of this manager reads and writes them."""
        return self.store.fleet(
            own_node=self.node_id,
            own_log=self.log,
            own_incarnations=self.incarnations,
            retain=self.retain,
            dry_run=dry_run,
        )

    def new_gtrid(self, timeout: float) -> str:
        """The gtrid of a new transaction of this manager with ``timeout`` seconds."""
        return new_gtrid(
            self.node_id,
            marker=bool(self.commit_markers),
            long=timeout > self.timeout,
            incarnation=self.incarnation,
        )

    def register(self, tx: Running, *, hold: bool = False) -> None:
        """``tx`` runs in this process (recovery leaves its branches to it); ``hold``: and
        is kept registered until :meth:`forget`, even if nothing else refers to it."""
        with self._lock:
            self._active[tx.gtrid] = tx
            if hold:
                self._held[tx.gtrid] = tx

    def forget(self, tx: Running) -> None:
        with self._lock:
            self._active.pop(tx.gtrid, None)
            self._held.pop(tx.gtrid, None)

    def running(self, gtrid: str) -> Running | None:
        with self._lock:
            return self._active.get(gtrid)

    def in_flight(self) -> list[Running]:
        """The transactions running here now (from their first branch to their end)."""
        with self._lock:
            return list(self._active.values())

    def overlap(self) -> bool:
        """Overlap the branches' round trips? Only while few transactions are in flight:
        it cuts one transaction's latency, but costs client CPU (pipeline mode), which is
        what limits throughput once many run at once."""
        return self.parallel and len(self._active) <= OVERLAP_MAX_ACTIVE

    def note_expired(self, gtrid: str, resource: str, actor: str) -> None:
        """Audit (once per transaction) that recovery marked a running one aborted."""
        with self._lock:
            self._expired_noted &= set(self._active)
            if gtrid in self._expired_noted:
                return
            self._expired_noted.add(gtrid)
        logger.warning(
            "transaction %s is past its timeout: marked aborted by recovery",
            gtrid,
            extra=log_fields(self.node_id, gtrid, resource),
        )
        self.audit.record(
            gtrid,
            resource,
            resource,
            "expire",
            "past its timeout and not decided",
            "marked aborted: its coordinator rolls it back",
            actor,
        )

    def note_stranger(self, gtrid: str, resource: str) -> None:
        """Report (once per transaction) a prepared branch of this node made by a process
        that this node's log does not list: a second process runs with this node_id."""
        with self._lock:
            if gtrid in self._strangers_noted:
                return
            self._strangers_noted.add(gtrid)
        logger.error(
            "node_id %r: transaction %s (prepared on %r) was made by another process with this"
            " node_id, whose log is not this one (incarnation %s): recovery leaves it; give"
            " every coordinator process its own node_id (docs/operations.md)",
            self.node_id,
            gtrid,
            resource,
            incarnation_of(gtrid),
            extra=log_fields(self.node_id, gtrid, resource),
        )

    def phase_two_incomplete(self, gtrid: str, pending: Iterable[str]) -> None:
        """Called when a committed transaction left branches for recovery to finish."""
        logger.warning(
            "transaction %s committed with branches left for recovery: %s",
            gtrid,
            ", ".join(pending),
            extra=log_fields(self.node_id, gtrid),
        )

    # -- commit markers --------------------------------------------------------------------
    def marker_candidate(self, participants: Iterable[tuple[str, Participant]]) -> str | None:
        """The enlisted resource to carry the decision (commit-marker path), or None for
        strict 2PC. The first enlisted marker resource wins, preferring one whose decision
        row and commit go in one round trip."""
        candidates = [(n, p) for n, p in participants if n in self.commit_markers]
        candidates.sort(key=lambda c: not c[1].marker_in_one_round_trip)
        return candidates[0][0] if candidates else None

    def finished_markers(self, resource: str) -> list[str]:
        """A batch of finished gtrids whose decision rows on ``resource`` can be deleted."""
        with self._lock:
            done = self._finished.setdefault(resource, [])
            if len(done) < _marker.DELETE_AFTER:
                return []
            batch, self._finished[resource] = (
                done[: _marker.DELETE_BATCH],
                done[_marker.DELETE_BATCH :],
            )
            return batch

    def marker_finished(self, resource: str, gtrid: str) -> None:
        with self._lock:
            self._finished.setdefault(resource, []).append(gtrid)

    def first_connection(self, participant: Participant, conn: Connection) -> None:
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

    def close(self, *, log: bool = True) -> None:
        """Close the pools, release the identity locks, and close the log, the audit trail
        and what the store opened itself."""
        self.resources.close()
        self.identity.close()
        if log:
            self.log.close()
        self.audit.close()
        self.store.close()
