"""Read-only inspection: in-doubt transactions, one transaction in detail, and the logs.

Nothing here changes anything (but ``compact_logs``), takes a log's lock for longer than a
probe, or needs a coordinator log of its own. The logs are asked through the node's store
(:mod:`xatm.log.store`) and its view (:mod:`xatm.log.view`), whatever their kind:

* a node's log is read *without* its lock: the COMMIT records are forced before any branch
  is committed, so what is on disk is at least every decision taken;
* whether a node's coordinator is alive is probed by trying its ``flock`` without waiting and
  releasing it at once (with the shared log: whether a session holds its node lock);
* each resource is asked for its prepared transactions (``pg_prepared_xacts``, ``XA RECOVER``)
  and only xatm's are kept; for PostgreSQL the locks each branch holds are counted.

The answers are frozen dataclasses with a ``to_json()`` for the CLI's ``--json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xatm.core import deadline as _deadline
from xatm.core.decide import (
    Logged,
    Marker,
    decide,
    describe,
    known_decision,
    log_failed_over_since,
    past_timeout,
    tenure,
    transaction_facts,
)
from xatm.core.participant import Connection, Participant, PreparedBranch
from xatm.core.records import LogRecord
from xatm.core.urls import redact
from xatm.core.xid import incarnation_of, is_xatm_gtrid, may_use_marker, parse_gtrid
from xatm.errors import ConfigurationError, LogCorrupt, LogLocked, ResourceError, XatmError
from xatm.log.audit import AuditEntry, format_time
from xatm.log.base import OwnerState
from xatm.log.file import SegmentInfo
from xatm.log.shared import PostgresLog
from xatm.log.store import Store, directory_of, shared_log_of, store_from_setting
from xatm.log.timelines import Loss, Switch
from xatm.log.view import LogView
from xatm.node import failover as _failover
from xatm.node.context import Context, Resources
from xatm.node.identity import IdentityStatus
from xatm.ops.doctor import Check, DoctorReport, diagnose
from xatm.participants.adapters import make_participant
from xatm.participants.pool import silent
from xatm.participants.postgres.participant import PostgresParticipant
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.plan import TransactionPlan, plan_transaction

logger = logging.getLogger("xatm.inspect")

#: Whose a transaction is, seen from here: the coordinator of its node_id is ...
Decision = Literal["commit", "abort"]


class UnknownTransaction(XatmError):
    """No prepared branch, decision record or audit entry is known for this gtrid."""


def validate_gtrid(gtrid: object) -> str:
    """Return ``gtrid`` if it has the shape of an xatm gtrid, else raise ConfigurationError.

    Shape: ``xatm.<node_id>.<27 hex digits>``. Anything else (including text meant as SQL)
    is refused before it is used anywhere.
    """
    if isinstance(gtrid, str) and is_xatm_gtrid(gtrid):
        return gtrid
    shown = repr(gtrid)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ConfigurationError(
        f"not an xatm gtrid: {shown} (expected xatm.<node_id>.<27 hex digits>)"
    )


# ----------------------------------------------------------------------------- the logs


# ----------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class BranchInfo:
    """One branch of a global transaction on one resource, as seen now."""

    resource: str
    bqual: str
    #: "prepared" (found prepared); for a branch the COMMIT record names that is not
    #: prepared any more: "committed" or "rolled back" (its PostgreSQL transaction's status,
    #: from the logged txid), "missing" (cannot be told: a MySQL branch, or no txid logged);
    #: "unknown" (the resource could not be asked: the branch may still be prepared there)
    state: str
    prepared_at: float | None = None
    db_owner: str | None = None  # the database role that prepared it (PostgreSQL)
    locks: int | None = None  # locks the prepared branch holds (PostgreSQL)
    locked: tuple[str, ...] = ()  # relations it holds locks on (PostgreSQL)
    txid: int | None = None  # the server's transaction id, from the COMMIT record

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "branch": self.bqual,
            "state": self.state,
            "prepared_at": self.prepared_at,
            "db_owner": self.db_owner,
            "locks": self.locks,
            "locked_relations": list(self.locked),
            "txid": self.txid,
        }


@dataclass(frozen=True, slots=True)
class InDoubt:
    """One in-doubt global transaction: prepared branches waiting for phase 2."""

    gtrid: str
    node: str  # the coordinator that created it
    created_at: float  # from the gtrid
    age_s: float
    owner: OwnerState
    decision: Decision | None  # commit: logged; abort: presumed (owner dead); None: undecided
    decided_at: float | None
    plan: str  # what recovery will do
    branches: tuple[BranchInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "node": self.node,
            "created_at": format_time(self.created_at),
            "age_s": round(self.age_s, 3),
            "owner": self.owner,
            "decision": self.decision,
            "decided_at": None if self.decided_at is None else format_time(self.decided_at),
            "plan": self.plan,
            "branches": [b.to_json() for b in self.branches],
        }


@dataclass(frozen=True, slots=True)
class PossiblyLost:
    """A transaction committed on a PostgreSQL resource before it failed over, that the new
    primary lacks (``status`` ``lost``) or cannot vouch for (``unknown``): found by the
    failover check of node ``node`` (``xatm.node.failover``)."""

    gtrid: str
    node: str
    resource: str
    status: str
    decided_at: float
    txid: int | None
    timeline: tuple[int, int]  # (old, new)
    detected_at: float
    detail: str

    @classmethod
    def of(cls, node: str, resource: str, switch: Switch, loss: Loss) -> PossiblyLost:
        return cls(
            loss.gtrid,
            node,
            resource,
            loss.status,
            loss.decided_at,
            loss.txid,
            (switch.old, switch.new),
            switch.detected_at,
            loss.detail,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "node": self.node,
            "resource": self.resource,
            "status": self.status,
            "decided_at": format_time(self.decided_at),
            "txid": self.txid,
            "timeline": list(self.timeline),
            "failover_detected_at": format_time(self.detected_at),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class InDoubtReport:
    """Every in-doubt transaction found, oldest first, and the resources not reached;
    ``possibly_lost``: what the checks of recent PostgreSQL failovers found
    (``xatm.node.failover``), oldest failover first."""

    transactions: tuple[InDoubt, ...]
    unreachable: tuple[tuple[str, str], ...] = ()  # (resource, why)
    foreign: int = 0  # prepared transactions that are not xatm's (never touched)
    possibly_lost: tuple[PossiblyLost, ...] = ()

    def __iter__(self) -> Iterator[InDoubt]:
        return iter(self.transactions)

    def __len__(self) -> int:
        return len(self.transactions)


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """Everything known about one global transaction."""

    gtrid: str
    node: str
    created_at: float
    age_s: float
    owner: OwnerState
    decision: Decision | None
    decided_at: float | None
    logged_branches: tuple[str, ...]  # resources named by the COMMIT record, if any
    in_doubt: bool  # some branch is still prepared, or may be (its resource not reached)
    plan: str
    branches: tuple[BranchInfo, ...]
    audit: tuple[AuditEntry, ...]
    unreachable: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "node": self.node,
            "created_at": format_time(self.created_at),
            "age_s": round(self.age_s, 3),
            "owner": self.owner,
            "decision": self.decision,
            "decided_at": None if self.decided_at is None else format_time(self.decided_at),
            "logged_branches": list(self.logged_branches),
            "in_doubt": self.in_doubt,
            "plan": self.plan,
            "branches": [b.to_json() for b in self.branches],
            "audit": [e.to_json() for e in self.audit],
            "unreachable": [{"resource": r, "error": m} for r, m in self.unreachable],
        }


@dataclass(frozen=True, slots=True)
class NodeLog:
    """One node's coordinator log."""

    node: str
    owner: OwnerState
    segments: tuple[SegmentInfo, ...]
    pending: int  # COMMIT records with no END yet
    oldest_pending_at: float | None

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "owner": self.owner,
            "records": self.records,
            "pending": self.pending,
            "bytes": self.size,
            "oldest_pending_at": (
                None if self.oldest_pending_at is None else format_time(self.oldest_pending_at)
            ),
            "segments": [
                {
                    "name": s.name,
                    "bytes": s.size,
                    "records": s.records,
                    "torn_bytes": s.torn_bytes,
                    "corrupt": s.corrupt,
                }
                for s in self.segments
            ],
        }


@dataclass(frozen=True, slots=True)
class Compaction:
    """What ``compact_logs`` did to one node's log."""

    node: str
    compacted: bool
    bytes_before: int
    bytes_after: int
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "compacted": self.compacted,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "note": self.note,
        }


# ----------------------------------------------------------------------------- the plan


# ----------------------------------------------------------------------------- the scan


@dataclass
class _Scan:
    found: dict[str, list[tuple[str, PreparedBranch, int | None, tuple[str, ...]]]] = field(
        default_factory=dict
    )  # gtrid -> [(resource, branch, locks, relations)]
    unreachable: dict[str, str] = field(default_factory=dict)
    foreign: int = 0
    markers: dict[str, LogRecord] = field(default_factory=dict)  # commit-marker decision rows
    log_switches: tuple[float, ...] | None = None  # the log database's failovers, read once

    def switches(self, logs: LogView) -> tuple[float, ...]:
        """When the log's database failed over (:meth:`LogView.log_switches`), read once."""
        if self.log_switches is None:
            self.log_switches = logs.log_switches()
        return self.log_switches


class Inspector:
    """Read-only view of the resources, the coordinator logs and the audit trail.

    Made two ways: :meth:`of_node` (a running manager's view: its pooled connections, its
    store and log and its running transactions) and :meth:`from_settings` /
    :meth:`from_config` (an operator's: connections, a store and a watch of its own, the log
    read without any lock). ``log`` is the store (``xatm.log.store``), or a configuration's
    ``log`` (a directory or a URL) to open a store of its own for."""

    def __init__(
        self,
        participants: Mapping[str, Participant],
        log: Store | str | os.PathLike[str],
        *,
        resources: Resources | None = None,
        own_node: str | None = None,
        own_pending: Callable[[], Mapping[str, LogRecord]] | None = None,
        running: Callable[[str], bool] | None = None,
        commit_markers: Iterable[str] = (),
        timeout: float = 30.0,
        own_incarnation: str | None = None,
        identity: Callable[[], list[IdentityStatus]] | None = None,
        failover: _failover.FailoverWatch | None = None,
        config_node: str | None = None,
    ) -> None:
        self._participants = dict(participants)
        #: the incarnation of the manager inspecting (its own gtrids are "mine")
        self._own_incarnation = own_incarnation
        #: the inspecting manager's identity leases (``xatm.node.identity``), for ``doctor``
        self._identity = identity
        if failover is None:  # our own connections: follow the timelines, record nothing
            failover = _failover.FailoverWatch(own_node or "", None, writable=False)
            for participant in self._participants.values():
                if isinstance(participant, PostgresParticipant) and participant.watch is None:
                    participant.watch = failover
        #: the timelines seen (a manager's watch, or one of our own)
        self._watch = failover
        #: the store closed with this Inspector: one it opened itself (the shared log is then
        #: opened on first use, without taking any node's lock)
        self._own_store = isinstance(log, str | os.PathLike)
        #: where the nodes keep their durable state: the logs, the audit trail, the sagas
        self.store: Store = (
            store_from_setting(log, config_node or own_node or "")
            if isinstance(log, str | os.PathLike)
            else log
        )
        #: the configuration's node_id (an operator's Inspector): the shared log is opened
        #: as it (without its lock), and its timeline records count with a branch's own
        self._config_node = config_node
        self._markers = sorted(commit_markers)
        #: the transaction timeout, for the shared log's "past its timeout" fact
        self.timeout = timeout
        self._bound = _deadline.step_bound(timeout)  # of one step on one resource
        self._resources = resources
        self._own_node = own_node
        self._own_pending = own_pending
        self._running = running

    @classmethod
    def from_settings(cls, settings: Any) -> Inspector:
        """An Inspector over the resources and log (a directory or the shared log) of
        ``xatm.Settings``."""

        participants = {
            name: make_participant(name, s, settings.timeout)
            for name, s in settings.resources.items()
        }
        return cls(
            participants,
            str(settings.log),  # its store is opened (and closed) by this Inspector
            commit_markers=getattr(settings, "commit_markers", ()),
            timeout=settings.timeout,
            config_node=settings.node_id,
        )

    @classmethod
    def of_node(cls, ctx: Context) -> Inspector:
        """The Inspector of a running manager (``tm.inspector``): its resources' pooled
        connections, its own log's pending decisions, its running transactions, its
        identity leases and its failover watch."""
        return cls(
            ctx.resources.participants,
            ctx.store,
            resources=ctx.resources,
            own_node=ctx.node_id,
            own_pending=ctx.log.pending,
            running=lambda gtrid: ctx.running(gtrid) is not None,
            commit_markers=ctx.commit_markers,
            timeout=ctx.timeout,
            own_incarnation=ctx.incarnation,
            identity=ctx.identity.status,
            failover=ctx.failover,
        )

    @property
    def log_directory(self) -> str | None:
        """The log directory; None with the shared log."""
        return directory_of(self.store)

    @property
    def shared_log(self) -> PostgresLog | None:
        """The shared log (a ``PostgresLog``; an operator's is opened on first use, without
        taking any node's lock); None with a file log."""
        return shared_log_of(self.store)

    def close(self) -> None:
        """Close what this Inspector opened itself (its store: the shared log's connections)."""
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> Inspector:
        """An Inspector over the resources and log directory of a TOML config file."""
        from xatm.core.config import load_config

        return cls.from_settings(load_config(path))

    @property
    def resource_names(self) -> list[str]:
        return list(self._participants)

    # -- connections -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self, name: str) -> Iterator[Connection]:
        """A manager's pooled connection (borrowed), or a connection of our own."""
        if self._resources is not None:
            with self._resources.borrow(name, what="an inspection step") as (_, conn):
                yield conn
            return
        participant = self._participants[name]
        conn = participant.connect()
        try:
            with _deadline.bounded(participant, conn, self._bound, "an inspection step") as watch:
                yield conn
        except Exception as e:
            if watch.fired and participant.is_connection_error(e):
                raise silent(participant, self._bound, "an inspection step") from e
            raise
        finally:
            participant.close(conn)

    def _scan(self, only: str | None = None) -> _Scan:
        scan = _Scan()
        for name, participant in self._participants.items():
            try:
                with self._connection(name) as conn:
                    for branch in participant.recover(conn):
                        _deadline.renew(conn, self._bound)  # each branch: a step
                        xid = branch.xid
                        if xid is None or not xid.is_xatm:
                            scan.foreign += 1
                            continue
                        if only is not None and xid.gtrid != only:
                            continue
                        locks, relations = participant.branch_locks(conn, branch)
                        scan.found.setdefault(xid.gtrid, []).append(
                            (name, branch, locks, relations)
                        )
                    rows = _marker_recovery.read_rows(participant, conn)
                    scan.markers.update(rows or {})
            except ResourceError as e:
                scan.unreachable[name] = str(e)
            except Exception as e:
                scan.unreachable[name] = redact(f"{type(e).__name__}: {e}".strip())
        return scan

    # -- whose, and what was decided --------------------------------------------------------
    def _logs(self) -> LogView:
        """The logs, whatever their kind (an operator's shared log is opened on first use)."""
        return self.store.view(own_node=self._own_node, own_pending=self._own_pending)

    def _is_running(self, gtrid: str, owner: OwnerState) -> bool:
        return owner == "this-process" and self._running is not None and self._running(gtrid)

    def _verdict(
        self, gtrid: str, record: LogRecord | None, owner: OwnerState, running: bool, scan: _Scan
    ) -> tuple[Decision | None, str]:
        """The decision as far as it is known, and the plan: what the decision rule
        (:func:`xatm.core.decide.decide`) says recovery will do, from what is seen here."""
        node, created = parse_gtrid(gtrid)
        logs = self._logs()
        shared = logs.shared
        logged = Logged.NONE
        if record is not None and gtrid not in scan.markers:
            logged = Logged.COMMIT
        elif logs.aborted(gtrid):  # an ABORT decision (the shared log: fenced by a sweeper)
            logged = Logged.ABORT
        marker = Marker.NOT_FLAGGED
        if gtrid in scan.markers:
            marker = Marker.ROW
        elif may_use_marker(gtrid):
            candidates = logs.marker_resources(node)
            if not candidates or any(
                c not in self._participants or c in scan.unreachable for c in candidates
            ):
                marker = Marker.UNREAD
            else:
                marker = Marker.NO_ROW
        own = owner == "this-process"
        made_by = tenure(
            incarnation_of(gtrid),
            self._own_incarnation if own else None,
            None if shared else logs.incarnations(node),
        )
        bquals = {b.xid.bqual for _, b, _, _ in scan.found.get(gtrid, []) if b.xid is not None}
        failover = False
        if logged is Logged.NONE and marker is not Marker.ROW and owner != "unknown":
            found = self._after_failover(logs, gtrid, node, created, scan)
            if found == "commit":
                logged = Logged.COMMIT
            failover = found == "unknown"
        facts = transaction_facts(
            coordinator=owner,
            running=running,
            made_by=made_by,
            logged=logged,
            marker=marker,
            shared=shared,
            expired=shared and past_timeout(gtrid, created, time.time(), self.timeout),
            known_resource=bquals <= set(self._participants),
            failover=failover,
            log_failover=log_failed_over_since(created, scan.switches(logs)),
        )
        verdict = decide(facts)
        decision = known_decision(facts, verdict)
        return decision, describe(verdict)

    def _after_failover(
        self, logs: LogView, gtrid: str, node: str, created: float, scan: _Scan
    ) -> _failover.AfterFailover:
        """:func:`xatm.node.failover.after_failover` over the transaction's prepared branches:
        ``commit`` if one of them finds a retained COMMIT, ``unknown`` if one cannot tell."""
        store = logs.timelines()
        nodes = {node, *(n for n in (self._own_node, self._config_node) if n)}
        outcome: _failover.AfterFailover = "none"
        for resource, _, _, _ in scan.found.get(gtrid, []):
            records = [store.load(n).get(resource) for n in sorted(nodes)]
            found = _failover.after_failover(
                records,
                created,
                self._watch.current(resource),
                lambda: logs.retained(node, gtrid) is not None,
                lambda: logs.horizon(node),
            )
            if found == "commit":
                return "commit"
            if found == "unknown":
                outcome = "unknown"
        return outcome

    def possibly_lost(self) -> list[PossiblyLost]:
        """What the checks of recent PostgreSQL failovers found lost or possibly lost, by
        every node (``xatm.node.failover``)."""
        records = self._logs().timelines().every_node()
        return [
            PossiblyLost.of(node, resource, switch, loss)
            for node, resource, switch, loss in _failover.recent_losses(records, time.time())
        ]

    # -- answers ----------------------------------------------------------------------------
    def indoubt(self) -> InDoubtReport:
        """Every xatm transaction with a branch still prepared (or whose logged decision
        names a resource that could not be asked), oldest first."""
        scan = self._scan()
        now = time.time()
        owners: dict[str, OwnerState] = {}
        pendings: dict[str, Mapping[str, LogRecord]] = {}

        def node_info(node: str) -> tuple[OwnerState, Mapping[str, LogRecord]]:
            if node not in owners:
                logs = self._logs()
                owners[node] = logs.owner(node)
                pendings[node] = logs.pending(node, owners[node])
            return owners[node], pendings[node]

        gtrids = set(scan.found)
        if scan.unreachable:
            # decided transactions may still have a branch on a resource not reached
            every = self._logs().every_pending(lambda n: node_info(n)[1])
            for pending in every:
                for gtrid, logged in pending.items():
                    if any(r in scan.unreachable for r in logged.branches):
                        gtrids.add(gtrid)
        rows = []
        for gtrid in gtrids:
            node, created = parse_gtrid(gtrid)
            owner, pending = node_info(node)
            record = pending.get(gtrid) or scan.markers.get(gtrid)
            running = self._is_running(gtrid, owner)
            decision, what = self._verdict(gtrid, record, owner, running, scan)
            branches = self._branches(gtrid, scan, record)
            what = self._plan(gtrid, record, what, scan).text
            rows.append(
                InDoubt(
                    gtrid=gtrid,
                    node=node,
                    created_at=created,
                    age_s=max(0.0, now - created),
                    owner=owner,
                    decision=decision,
                    decided_at=None if record is None else record.at,
                    plan=what,
                    branches=branches,
                )
            )
        rows.sort(key=lambda r: (r.created_at, r.gtrid))
        try:
            lost = tuple(self.possibly_lost())
        except XatmError as e:  # the shared log unreachable: the in-doubt list still counts
            logger.warning("cannot read the failover records: %s", e)
            lost = ()
        return InDoubtReport(
            tuple(rows), tuple(sorted(scan.unreachable.items())), scan.foreign, lost
        )

    @staticmethod
    def _plan(gtrid: str, record: LogRecord | None, verdict: str, scan: _Scan) -> TransactionPlan:
        """The transaction's plan by :func:`xatm.recovery.plan.plan_transaction`, as a pass that
        saw what this scan saw would act: the same function a recovery pass asks."""
        return plan_transaction(
            decided=record is not None,
            logged_branches=() if record is None else record.branches,
            prepared={r: verdict for r, _, _, _ in scan.found.get(gtrid, [])},
            unread=set(scan.unreachable),
        )

    def _finished(self, resource: str, txid: int | None) -> str:
        """The state of a logged branch that is not prepared any more: "committed" or
        "rolled back" where its server can tell (PostgreSQL, by the logged txid), else
        "missing"."""
        participant = self._participants.get(resource)
        if participant is None:
            return "missing"
        try:
            with self._connection(resource) as conn:
                verdict, _ = participant.verify_finished(conn, txid)
        except Exception as e:
            logger.debug("cannot tell what became of a branch on %r: %s", resource, e)
            return "missing"
        return {"committed": "committed", "aborted": "rolled back"}.get(verdict, "missing")

    def _branches(
        self, gtrid: str, scan: _Scan, record: LogRecord | None
    ) -> tuple[BranchInfo, ...]:
        txids = dict(getattr(record, "txids", None) or {}) if record is not None else {}
        out: dict[str, BranchInfo] = {}
        for resource, branch, locks, relations in scan.found.get(gtrid, []):
            out[resource] = BranchInfo(
                resource=resource,
                bqual=branch.xid.bqual if branch.xid is not None else resource,
                state="prepared",
                prepared_at=branch.prepared_at,
                db_owner=branch.owner,
                locks=locks,
                locked=relations,
                txid=txids.get(resource),
            )
        for resource in record.branches if record is not None else ():
            if resource in out:
                continue
            txid = txids.get(resource)
            unknown = resource in scan.unreachable
            state = "unknown" if unknown else self._finished(resource, txid)
            out[resource] = BranchInfo(resource, resource, state, txid=txid)
        for resource in scan.unreachable:
            if resource not in out and record is None:
                # an undecided transaction may have a branch there too: say we could not look
                out[resource] = BranchInfo(resource, resource, "unknown")
        return tuple(out[r] for r in sorted(out))

    def show(self, gtrid: str) -> TransactionInfo:
        """Everything known about one transaction: branches, decision, plan, audit trail."""
        gtrid = validate_gtrid(gtrid)
        node, created = parse_gtrid(gtrid)
        scan = self._scan(only=gtrid)
        logs = self._logs()
        owner = logs.owner(node)
        record = logs.pending(node, owner).get(gtrid) or scan.markers.get(gtrid)
        audit = tuple(self.audit(gtrid))
        if not scan.found and record is None and not audit and not scan.unreachable:
            raise UnknownTransaction(
                f"unknown transaction {gtrid}: no prepared branch on any resource, no pending"
                " decision in its coordinator's log and no audit entry"
            )
        running = self._is_running(gtrid, owner)
        decision, what = self._verdict(gtrid, record, owner, running, scan)
        plan = self._plan(gtrid, record, what, scan)
        in_doubt = plan.in_doubt
        what = plan.text
        return TransactionInfo(
            gtrid=gtrid,
            node=node,
            created_at=created,
            age_s=max(0.0, time.time() - created),
            owner=owner,
            decision=decision if in_doubt or record is not None else None,
            decided_at=None if record is None else record.at,
            logged_branches=() if record is None else tuple(record.branches),
            in_doubt=in_doubt,
            plan=what,
            branches=self._branches(gtrid, scan, record),
            audit=audit,
            unreachable=tuple(sorted(scan.unreachable.items())),
        )

    def doctor(self) -> DoctorReport:
        """Check that every resource and the log directory are fit for two-phase commit."""
        report = diagnose(self._participants, self.store, self.timeout)
        if self._identity is None:
            return report
        identity = tuple(
            Check(s.resource, "node identity", s.held, s.detail or "held by this process")
            for s in self._identity()
        )
        return DoctorReport(report.checks + identity)

    def audit(self, gtrid: str | None = None) -> list[AuditEntry]:
        """The audit trail of every node (of one transaction if ``gtrid`` is given)."""
        if gtrid is not None:
            gtrid = validate_gtrid(gtrid)
        return self._logs().audit(gtrid)

    def logs(self) -> list[NodeLog]:
        """Every node's coordinator log under the log directory."""
        nodes = self.store.nodes()
        if not nodes:
            return []  # no log files (the shared log's are rows): nothing to open
        logs = self._logs()
        out = []
        for node in nodes:
            owner = logs.owner(node)
            snap = logs.read(node, strict=False, every=True)
            oldest = min((r.at for r in snap.pending.values()), default=None)
            out.append(NodeLog(node, owner, snap.segments, len(snap.pending), oldest))
        return out

    def compact_logs(self) -> list[Compaction]:
        """Rewrite the log of every node whose coordinator is dead into one segment holding
        only its pending decisions (its retained ended decisions go: a failover that brings
        one of its branches back later leaves that branch in doubt). Live coordinators
        compact their own logs (at start and whenever a segment fills up); they are left
        alone."""
        nodes = self.store.nodes()
        if not nodes:
            return []  # no log files (the shared log's are rows): nothing to open
        logs = self._logs()
        out = []
        for node in nodes:
            before = sum(s.size for s in logs.read(node, strict=False, every=True).segments)
            owner = logs.owner(node)
            if owner != "dead":
                why = "this process's own log" if owner == "this-process" else "alive"
                out.append(Compaction(node, False, before, before, f"skipped: {why}"))
                continue
            with contextlib.ExitStack() as held:
                try:
                    # opening a dead node's log rewrites it: one segment, its pending kept
                    log = held.enter_context(logs.take_over(node, wait=0.0, keep_ended=False))
                except LogLocked:
                    out.append(Compaction(node, False, before, before, "skipped: became alive"))
                    continue
                except LogCorrupt as e:
                    out.append(Compaction(node, False, before, before, f"skipped: {e}"))
                    continue
                pending = len(log.pending())
            after = sum(s.size for s in logs.read(node, every=True).segments)
            out.append(Compaction(node, True, before, after, f"{pending} pending decision(s) kept"))
        return out
