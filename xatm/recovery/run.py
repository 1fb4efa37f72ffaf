"""One recovery pass: find xatm's prepared branches and settle each by the decision rule.

For every xatm branch found prepared, the pass gathers the facts (:meth:`_Pass.facts`: whose
it is, what its log says, whether a commit-marker row exists) and asks
:func:`xatm.core.decide.decide`, the one place where "commit, roll back or leave" is written
(docs/protocol.md prints its table). A ``probe`` verdict reads the decision row on the
resources recorded for the gtrid's node (``xatm.log.node_markers``) and asks again; a fenced
rollback with the shared log writes a conditional ABORT first. Phase 2 goes through
:func:`xatm.recovery.phase2.carry_out`, which says what a "no such branch" answer means.
Foreign prepared transactions (not an xatm XID) are never touched.

A running transaction of this node that is past its timeout and has not decided yet is marked
aborted (``abort_if_expired``): its coordinator then rolls it back instead of deciding.

A COMMIT record whose branches are all gone from every resource it names (each of them
scanned in this pass) gets its END record. Before that, each branch this pass did not commit
itself is *verified*: for a PostgreSQL branch whose server transaction id was logged,
``pg_xact_status`` tells "committed" from "aborted"; aborted means someone rolled the branch
back by hand although the decision was COMMIT: a **heuristic outcome**, logged at ERROR, put
in the report and the audit trail. A MySQL branch (or one without a logged txid) cannot be
told apart: it is reported as "not found: committed earlier or resolved outside xatm".

A pass runs in two steps, so that a dead peer's log (whose lock keeps that peer from
restarting) is held only while there is something to do, and only briefly:

1. *survey*: list the prepared branches on every resource, without any peer's lock. If no
   xatm branch is prepared and no log has a pending decision, the pass ends here.
2. *settle*: snapshot this node's pending decisions, take over the logs of the dead peers
   that own a branch or hold a pending decision, list every resource again and settle each
   branch, then close the decisions that are complete (END), and release the peers' logs.

The snapshot is taken before the second listing on purpose: a decision that is in it was
logged after its branches were prepared, so a branch missing from the listing that follows
was really finished before, and END never strands a prepared branch.

**Commit markers.** A transaction on the commit-marker path (``xatm.participants.marker``) keeps its
decision as a row of ``xatm_decisions`` inside one of its resources instead of the log.
Every resource that has that table is read like a log (after the owner is known dead or
finished, before the listing): a branch whose gtrid has a row is committed, and a row whose
branches are all finished is deleted (recovery's END). Before presuming abort for a
transaction whose gtrid carries the marker flag (its coordinator had commit markers
configured; ``xatm.core.xid.FLAG_MARKER``) and has no decision anywhere, the decision tables
are *probed*
(``xatm.recovery.markers.probe_row``) on every resource recorded as a marker resource of
its node, which waits out a marker commit still running in the server; if one of them is not
configured here or cannot be reached, the transaction is left in doubt. A transaction
without the flag can only have its decision in the log.

**Shared log.** With a PostgreSQL log every decision of every node is in one table, so no
log is taken over. A logged decision is obeyed; with none, the transaction is aborted by a
conditional ABORT write (which a late COMMIT then loses: fencing) once its coordinator can
no longer act (this process, not running it; or a node with no session on the log) or it is
older than its timeout. One process at a time resolves (a session-level advisory lock).

**Failover** (``xatm.node.failover``). When a branch's PostgreSQL resource failed over after the
branch was created, a branch with no pending decision may be one whose ``COMMIT PREPARED``
the new primary never received: its decision is looked up among the log's retained (ended)
ones, and committed if found; if the retained decisions do not reach back to its creation,
it is left in doubt (fact ``failover``). A logged branch missing after the switch whose
transaction id the new primary had not assigned is a heuristic outcome. After the settling,
each switch not checked yet gets its report (:func:`xatm.node.failover.check`).

A resource that cannot be reached (or fails in any other way) is skipped and reported; the
pass goes on with the others. Passes are idempotent: a branch already finished by someone
else is "not found", which is fine. Passes of one Context never overlap (a lock).
Every action taken is appended to the audit trail (not in a dry run).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from xatm.core import deadline as _deadline
from xatm.core import events as _events
from xatm.core.decide import Action as Act
from xatm.core.decide import (
    Facts,
    Logged,
    Marker,
    NodeLogState,
    Owner,
    decide,
    owner_of,
    past_timeout,
    tenure,
)
from xatm.core.logfields import log_fields
from xatm.core.participant import Connection, PreparedBranch
from xatm.core.records import LogRecord
from xatm.core.report import Action, RecoveryAction, RecoveryReport
from xatm.core.urls import describe_error
from xatm.core.xid import Xid, incarnation_of, may_use_marker, parse_gtrid
from xatm.errors import LogError, ResourceError
from xatm.node import failover as _failover
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.fleet import Fleet, fleet_for
from xatm.recovery.phase2 import Carried, carry_out

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.recovery")


#: a decision row is checked for deletion once this many seconds past ``timeout`` (by then
#: its own coordinator has normally finished the transaction, and deletes its rows itself)
MARKER_END_AGE = 5.0


@dataclass
class _Pass:
    ctx: Context
    dry_run: bool
    actor: str
    progress: Callable[[str], None] | None = None
    #: act on this gtrid only (manual resolution), and say why in every record
    only: str | None = None
    prefix: str = ""
    #: the log's view of every node's decisions (xatm.recovery.fleet), set by the pass
    fleet: Fleet = field(default=None)  # type: ignore[assignment]
    snapshot: dict[str, tuple[str, LogRecord]] = field(default_factory=dict)
    #: gtrid -> (marker resource, record): decision rows read before the listing
    markers: dict[str, tuple[str, LogRecord]] = field(default_factory=dict)
    marker_problems: dict[str, str] = field(default_factory=dict)
    actions: list[RecoveryAction] = field(default_factory=list)
    remaining: dict[str, set[str]] = field(default_factory=dict)  # gtrid -> resources
    committed_here: set[tuple[str, str]] = field(default_factory=set)  # (gtrid, resource)
    scanned: set[str] = field(default_factory=set)
    problems: dict[str, str] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)  # resources not in this pass (backoff)
    strangers: set[str] = field(default_factory=set)  # gtrids of processes no log here lists
    foreign: int = 0

    @property
    def own_node(self) -> str:
        return self.ctx.node_id

    # -- step 1 ----------------------------------------------------------------------------
    def survey(self, names: list[str]) -> tuple[set[str], bool]:
        """List every resource once: (nodes owning an xatm branch, anything to do)."""
        owners: set[str] = set()
        found_any = False
        self.skipped = set(self.ctx.resources.names) - set(names)
        self.read_markers(names)
        if any(self._may_end_marker(g) for g in self.markers):
            found_any = True
        for name in names:
            found = self._list(name)
            if found is None:
                continue
            for branch in found:
                if branch.xid is not None and branch.xid.is_xatm:
                    owners.add(branch.xid.node_id)
                    found_any = True
                else:
                    self.foreign += 1
        return owners, found_any

    def _list(self, name: str) -> list[PreparedBranch] | None:
        if name in self.problems:  # found unreachable already in this pass
            return None
        try:
            with self.ctx.resources.borrow(name, recovery=True) as (participant, conn):
                return participant.recover(conn)
        except ResourceError as e:
            self._unreachable(name, str(e))
        except Exception as e:
            self._unreachable(name, describe_error(e))
        return None

    def read_markers(self, names: list[str]) -> None:
        """(Re-)read the decision rows of every resource that has the table."""
        self.markers.clear()
        self.marker_problems.clear()
        for name in names:
            if name in self.problems:
                continue
            try:
                with self.ctx.resources.borrow(name, recovery=True) as (participant, conn):
                    rows = _marker_recovery.read_rows(participant, conn)
                    if rows is not None and not self.dry_run:
                        with contextlib.suppress(Exception):
                            _marker_recovery.delete_old_fences(participant, conn)
            except ResourceError as e:
                self.marker_problems[name] = str(e)
                self._unreachable(name, str(e))  # one wait for it per pass, not one per step
                continue
            except Exception as e:
                self.marker_problems[name] = describe_error(e)
                if self.ctx.resources.get(name)[0].is_connection_error(e):
                    self._unreachable(name, f"lost during the pass: {describe_error(e)}")
                continue
            for gtrid, record in (rows or {}).items():
                self.markers[gtrid] = (name, record)

    def marker_candidates(self, node: str) -> frozenset[str] | None:
        """The resources that may hold ``node``'s decision rows, as recorded in its log
        directory (None: not recorded, or a shared log, which has no commit markers)."""
        return self.fleet.marker_resources(node)

    def _probe_markers(self, gtrid: str) -> tuple[Marker, str]:
        """Is a decision row of ``gtrid`` committed on a resource that may hold it? Waits
        out a marker commit in flight and fences an absent row (not in a dry run)."""
        node = parse_gtrid(gtrid)[0]
        candidates = self.marker_candidates(node)
        if not candidates:
            return Marker.UNREAD, f"the commit-marker resources of node {node!r} are not recorded"
        configured = set(self.ctx.resources.names)
        missing = sorted(candidates - configured)
        if missing:
            return Marker.UNREAD, f"{', '.join(missing)} (not configured here)"
        unread = sorted(n for n in candidates if n in self.problems or n in self.skipped)
        if unread:
            return Marker.UNREAD, f"{', '.join(unread)} (not reached in this pass)"
        for name in sorted(candidates):
            participant, _ = self.ctx.resources.get(name)
            try:
                answer = _marker_recovery.probe_row(participant, gtrid, fence=not self.dry_run)
            except Exception as e:
                self.marker_problems.setdefault(name, describe_error(e))
                return Marker.UNREAD, f"{name} ({describe_error(e)})"
            if answer == "row":
                return Marker.ROW, ""
        return Marker.NO_ROW, ""

    def _owner_finished(self, gtrid: str) -> bool:
        """The coordinator of ``gtrid`` can take no further step: this node (not running
        it) or a dead peer."""
        node = parse_gtrid(gtrid)[0]
        if node == self.own_node:
            return self.ctx.running(gtrid) is None
        return self.fleet.coordinator_dead(node)

    def _may_end_marker(self, gtrid: str) -> bool:
        """Is this decision row recovery's to delete (once its branches are finished)?

        Rows of a dead peer, or of an earlier process of this node, are; rows of this
        process's own transactions are deleted by it in batches (``xatm.participants.marker``), so
        recovery takes them only if it committed one of their branches, or once they are
        old (then something kept the batch from coming)."""
        if not self._owner_finished(gtrid):
            return False
        node, created = parse_gtrid(gtrid)
        if node != self.own_node or created < self.ctx.started_at:
            return True
        if any(g == gtrid for g, _ in self.committed_here):
            return True
        _, record = self.markers[gtrid]
        return time.time() - record.at > self.ctx.timeout + MARKER_END_AGE

    def _unreachable(self, name: str, why: str) -> None:
        self.problems.setdefault(name, why)
        logger.warning(
            "recovery: skipping resource %r: %s",
            name,
            why,
            extra=log_fields(self.own_node, resource=name),
        )

    def dead_peers_with_decisions(self) -> set[str]:
        """Peers whose coordinator is dead and whose log still holds a pending decision."""
        return self.fleet.dead_with_pending()

    # -- step 2 ----------------------------------------------------------------------------
    def open_peers(self, nodes: set[str]) -> None:
        self.fleet.open(nodes)

    def take_snapshot(self, names: list[str]) -> None:
        self.read_markers(names)
        self.snapshot = self.fleet.pending()

    def close_logs(self) -> None:
        self.fleet.close()

    def scan(self, name: str) -> None:
        if self.progress is not None:
            self.progress(f"scanning {name}")
        participant, _ = self.ctx.resources.get(name)
        try:
            with self.ctx.resources.borrow(name, recovery=True) as (_, conn):
                for branch in participant.recover(conn):
                    _deadline.renew(conn, self.ctx.resources.bound)  # each branch: a step
                    self.settle(name, branch, conn)
        except LogError:
            raise  # the log failed, not this resource: the pass cannot go on
        except ResourceError as e:
            self._unreachable(name, str(e))
            return
        except Exception as e:
            if participant.is_connection_error(e):
                self._unreachable(name, f"lost during the pass: {describe_error(e)}")
            else:
                logger.error(
                    "recovery: resource %r failed: %s",
                    name,
                    describe_error(e),
                    extra=log_fields(self.own_node, resource=name),
                )
                self.problems.setdefault(name, describe_error(e))
            return
        self.scanned.add(name)

    def _record(
        self, gtrid: str, resource: str, branch: str, action: Action, reason: str, outcome: str
    ) -> None:
        reason = self.prefix + reason
        self.actions.append(RecoveryAction(gtrid, resource, branch, action, reason, outcome))
        if not self.dry_run and action != "skip":
            self.ctx.audit.record(gtrid, resource, branch, action, reason, outcome, self.actor)

    def facts(self, resource: str, xid: Xid, conn: Connection) -> tuple[Facts, str]:
        """What is known about one of xatm's prepared branches (and a detail for the
        reason), gathered for :func:`xatm.core.decide.decide`."""
        gtrid, node = xid.gtrid, xid.node_id
        ctx = self.ctx
        fleet = self.fleet
        marker = Marker.UNPROBED if may_use_marker(gtrid) else Marker.NOT_FLAGGED
        if gtrid in self.markers:
            marker = Marker.ROW
        known = xid.bqual in ctx.resources
        expired = False
        detail = ""
        logged = Logged.NONE
        own = node == self.own_node
        if own:
            running = ctx.running(gtrid)
            if running is not None:
                if self.dry_run:
                    expired_now = time.monotonic() > running.deadline
                elif running.abort_if_expired():
                    expired_now = True
                    ctx.note_expired(gtrid, resource, self.actor)
                else:
                    expired_now = False
                return Facts(
                    Owner.EXPIRED if expired_now else Owner.RUNNING, known_resource=known
                ), ""
        made_by = tenure(
            incarnation_of(gtrid),
            ctx.incarnation if own else None,
            fleet.incarnations(node),
        )
        log: NodeLogState
        if fleet.shared:
            log = "alive" if not own and fleet.peer(node) == "alive" else "shared"
        elif own:
            log = "held"
        else:
            state = fleet.peer(node)
            log = "held" if state == "dead" else state
            if state == "unexamined":
                detail = "not examined in this pass (the next one will)"
            elif state == "corrupt":
                detail = f"the log of coordinator {node!r} is corrupt (see `xatm log`)"
        legacy_lock = False
        if made_by == "legacy" and log == "held":
            if own:  # this node's, made by xatm 0.2: fenced by the identity lock only
                legacy_lock = ctx.identity.held(resource)
            else:  # its log lock is free, but a process may run as it
                participant, _ = ctx.resources.get(resource)
                legacy_lock = participant.identity_holder(conn, node) is not None
                if legacy_lock:
                    detail = f"node {node!r} holds its identity lock on {resource!r}"
        owner = owner_of(own_node=own, made_by=made_by, log=log, legacy_lock=legacy_lock)
        if owner is Owner.STRANGER:
            detail = f"incarnation {incarnation_of(gtrid)} of node {node!r}"
            self.strangers.add(gtrid)
            if not self.dry_run:
                ctx.note_stranger(gtrid, resource)
        if known and owner in (
            Owner.FINISHED,
            Owner.PREVIOUS,
            Owner.STRANGER,
            Owner.UNFENCED,
            Owner.DEAD_PEER,
            Owner.LIVE_PEER,
        ):
            # read now: a decision taken since the pass began is in the log already
            logged = fleet.decision(gtrid, node)
        failover = False
        if known and logged is Logged.NONE and owner is not Owner.UNKNOWN:
            logged, failover, note = self._after_failover(resource, xid)
            detail = note or detail
        if fleet.shared:
            expired = past_timeout(gtrid, xid.created_at, time.time(), ctx.timeout)
        facts = Facts(
            owner,
            logged=logged,
            marker=marker,
            expired=expired,
            shared_log=fleet.shared,
            known_resource=known,
            failover=failover,
        )
        return facts, detail

    def _after_failover(self, resource: str, xid: Xid) -> tuple[Logged, bool, str]:
        """For a branch with no decision found: (the decision, the ``failover`` fact, a
        detail), by :func:`xatm.node.failover.after_failover`."""
        watch = self.ctx.failover
        if watch is None:
            return Logged.NONE, False, ""
        node, gtrid = xid.node_id, xid.gtrid
        records = [watch.records().get(resource)]
        if node != self.own_node:
            records.append(self.fleet.timelines(node).get(resource))
        found = _failover.after_failover(
            records,
            xid.created_at,
            watch.current(resource),
            lambda: self.fleet.retained(gtrid, node),
            lambda: self.fleet.horizon(node),
        )
        if found == "commit":
            return (
                Logged.COMMIT,
                False,
                f"its COMMIT was ended before a failover of {resource!r} brought the branch back",
            )
        return Logged.NONE, found == "unknown", ""

    def settle(self, resource: str, found: PreparedBranch, conn: Connection) -> None:
        xid = found.xid
        if xid is None or not xid.is_xatm:
            self.foreign += 1
            return
        gtrid = xid.gtrid
        if self.only is not None and gtrid != self.only:
            return

        def record(action: Action, reason: str, outcome: str) -> None:
            self._record(gtrid, resource, xid.bqual, action, reason, outcome)

        def leave(reason: str) -> None:
            self.remaining.setdefault(gtrid, set()).add(resource)
            record("skip", reason, "left")

        facts, detail = self.facts(resource, xid, conn)
        while True:
            verdict = decide(facts)
            if verdict.action is Act.PROBE:
                marker, detail = self._probe_markers(gtrid)
                facts = replace(facts, marker=marker)
                continue
            if verdict.action is Act.ROLLBACK and verdict.fence and not self.dry_run:
                answer = self.fleet.abort(gtrid, by=self.actor)
                if answer == "C":
                    facts = replace(facts, logged=Logged.COMMIT)  # a COMMIT won the race
                    continue
                if answer == "busy":  # a COMMIT batch holds the row: never wait for it here
                    leave("its COMMIT may be being written (a batch of the shared log is open)")
                    return
                self.ctx.audit.record(
                    gtrid,
                    "",
                    "",
                    "decide",
                    self.prefix + "ABORT decision logged (fenced)",
                    "done",
                    self.actor,
                )
            break
        reason = f"{verdict.reason}: {detail}" if detail else verdict.reason
        if verdict.action is Act.LEAVE:
            leave(reason)
            return
        commit = verdict.action is Act.COMMIT
        action: Action = "commit" if commit else "rollback"
        if self.dry_run:
            self.remaining.setdefault(gtrid, set()).add(resource)
            record(action, reason, "planned")
            return
        participant, _ = self.ctx.resources.get(resource)
        try:
            carried = carry_out(participant, conn, xid, commit)
        except Exception as e:
            if participant.is_connection_error(e):
                raise
            self.remaining.setdefault(gtrid, set()).add(resource)
            logger.error(
                "recovery: %s of %s on %r failed: %s",
                action,
                gtrid,
                resource,
                e,
                extra=log_fields(self.own_node, gtrid, resource),
            )
            record("error", reason, f"failed: {describe_error(e)}")
            return
        if carried is Carried.HELD:
            leave(
                "listed as prepared, but the server answers 'no such branch': a live session"
                " still holds it"
            )
            return
        if carried is Carried.GONE:
            # listed a moment ago, gone now: its coordinator (or another pass) finished it
            # in between. Nothing was done here, so nothing is audited.
            self.actions.append(
                RecoveryAction(
                    gtrid,
                    resource,
                    xid.bqual,
                    "skip",
                    "finished by someone else during the pass",
                    "not-found",
                )
            )
            return
        if commit:
            self.committed_here.add((gtrid, resource))
        logger.info(
            "recovery: %s %s branch %s on %r (%s)",
            action,
            gtrid,
            xid.bqual,
            resource,
            reason,
            extra=log_fields(self.own_node, gtrid, resource),
        )
        record(action, reason, "done")

    def end_decided(self) -> int:
        """Close the COMMIT records whose branches are provably all finished; verify the
        branches this pass did not commit itself (heuristic detection)."""
        ended = 0
        for gtrid, (node, rec) in sorted(self.snapshot.items()):
            if self.only is not None and gtrid != self.only:
                continue
            if node == self.own_node and (
                self.ctx.running(gtrid) is not None
                or gtrid not in self.ctx.log.pending()  # its coordinator ended it
            ):
                continue
            if gtrid in self.remaining:
                continue
            if not all(r in self.scanned for r in rec.branches):
                continue
            if not self._verify(gtrid, rec):
                continue
            if self.dry_run:
                self._record(gtrid, "", "", "end", "every branch is finished", "planned")
                continue
            self.fleet.log_end(gtrid, node)
            self._record(gtrid, "", "", "end", "every branch is finished", "done")
            ended += 1
        for gtrid in sorted(self.markers):
            if self.only is not None and gtrid != self.only:
                continue
            resource, rec = self.markers[gtrid]
            if gtrid in self.remaining or not self._may_end_marker(gtrid):
                continue
            if not all(r in self.scanned for r in rec.branches):
                continue
            took_part = any(g == gtrid for g, _ in self.committed_here)
            if not self._verify(gtrid, rec):
                continue
            if self.dry_run:
                self.actions.append(
                    RecoveryAction(gtrid, resource, "", "end", "decision row", "planned")
                )
                continue
            try:
                with self.ctx.resources.borrow(resource, recovery=True) as (participant, conn):
                    _marker_recovery.delete_row(participant, conn, gtrid)
            except Exception as e:
                logger.warning(
                    "recovery: cannot delete the decision row of %s: %s",
                    gtrid,
                    e,
                    extra=log_fields(self.own_node, gtrid, resource),
                )
                continue
            reason = "every branch is finished: decision row deleted"
            if took_part:
                self._record(gtrid, resource, "", "end", reason, "done")
            else:  # the coordinator finished it itself: report, do not audit
                self.actions.append(RecoveryAction(gtrid, resource, "", "end", reason, "done"))
        return ended

    def _verify(self, gtrid: str, rec: LogRecord) -> bool:
        """Check each logged branch this pass did not commit; False if one is still open."""
        txids: Mapping[str, int] = getattr(rec, "txids", None) or {}
        watch = self.ctx.failover
        for resource in rec.branches:
            if (gtrid, resource) in self.committed_here:
                continue
            if resource in self.problems:  # unreachable in this pass: the next one checks
                return False
            switch = (
                None if watch is None else watch.lost_txid(resource, txids.get(resource), rec.at)
            )
            try:
                if switch is not None:  # its id was never assigned on the new primary
                    verdict, text = (
                        "aborted",
                        (
                            f"lost in the failover of {resource!r} (timeline {switch.old} ->"
                            f" {switch.new}): PostgreSQL transaction {txids.get(resource)} was"
                            " never assigned on the new primary"
                        ),
                    )
                else:
                    with self.ctx.resources.borrow(resource, recovery=True) as (
                        participant,
                        conn,
                    ):
                        verdict, text = participant.verify_finished(conn, txids.get(resource))
            except ResourceError as e:
                self._unreachable(resource, str(e))
                return False
            except Exception as e:
                self._unreachable(resource, f"lost during the pass: {describe_error(e)}")
                return False
            if verdict == "in progress":
                return False
            if verdict == "aborted":
                logger.error(
                    "HEURISTIC OUTCOME: transaction %s was decided COMMIT, but its branch on"
                    " %r was %s: the databases disagree; see docs/operations.md",
                    gtrid,
                    resource,
                    text,
                    extra=log_fields(self.own_node, gtrid, resource),
                )
                self._record(gtrid, resource, resource, "heuristic", "decision is COMMIT", text)
            else:  # not an action taken: reported, not audited
                self.actions.append(
                    RecoveryAction(
                        gtrid, resource, resource, "verify", "not prepared any more", text
                    )
                )
        return True

    def check_failovers(self) -> None:
        """The report of each switch not checked yet (``xatm.node.failover.check``). Decisions
        still pending are recovery's own to verify (their losses are reported when they are
        closed), so they are not listed twice."""
        watch = self.ctx.failover
        if watch is None or not any(
            s.checked_at is None for r in watch.records().values() for s in r.switches
        ):
            return
        skip = set(self.snapshot) | {a.gtrid for a in self.actions if a.action == "heuristic"}
        try:
            skip |= set(self.ctx.log.pending())
        except LogError:
            return  # the log failed: nothing it says can be trusted now
        own = self.own_node

        def between(node: str, start: float, end: float) -> list[LogRecord]:
            return [r for r in self.fleet.decided_between(node, start, end) if r.gtrid not in skip]

        def report(kind: str, gtrid: str, resource: str, reason: str, outcome: str) -> None:
            action: Action = "heuristic" if kind == "heuristic" else "possibly-lost"
            self._record(gtrid, resource, resource, action, reason, outcome)

        _failover.check(self.ctx, between, self.fleet.horizon(own), report)


@_events.observed_pass  # metrics and tracing, from the report
def run_pass(
    ctx: Context,
    *,
    dry_run: bool = False,
    resources: Callable[[], list[str]] | None = None,
    actor: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RecoveryReport:
    """One recovery pass over every resource of ``manager`` (or those ``resources()`` names)."""
    with ctx.recovery_lock:
        return locked_pass(
            ctx, dry_run=dry_run, resources=resources, actor=actor, progress=progress
        )


def locked_pass(
    ctx: Context,
    *,
    dry_run: bool = False,
    resources: Callable[[], list[str]] | None = None,
    actor: str | None = None,
    progress: Callable[[str], None] | None = None,
    only: str | None = None,
    prefix: str = "",
) -> RecoveryReport:
    """:func:`run_pass` for a caller that holds the manager's recovery lock; ``only``
    restricts it to one gtrid, ``prefix`` starts every reason (manual resolution)."""
    fleet = fleet_for(ctx, dry_run=dry_run)
    if not fleet.begin():  # another process is resolving (shared log)
        return RecoveryReport(dry_run=dry_run)
    try:
        p = _Pass(ctx, dry_run, actor or f"recover@{ctx.node_id}", progress, only, prefix)
        p.fleet = fleet
        return _run(ctx, p, resources)
    finally:
        fleet.end(ctx.timeout)  # the ENDs flushed, old decisions pruned (shared log)


def _run(ctx: Context, p: _Pass, resources: Callable[[], list[str]] | None) -> RecoveryReport:
    started = time.monotonic()
    dry_run, progress = p.dry_run, p.progress
    names = resources() if resources is not None else list(ctx.resources.names)
    if progress is not None:
        progress("listing prepared transactions")
    owners, found_any = p.survey(names)
    peers = p.dead_peers_with_decisions()
    ended = 0
    if found_any or peers or p.fleet.anything_pending():
        p.foreign = 0  # counted again by the full scan
        try:
            p.open_peers(owners | peers)
            p.take_snapshot(names)
            for name in names:
                if name not in p.problems:
                    p.scan(name)
            ended = p.end_decided()
        finally:
            p.close_logs()
    if not dry_run and p.only is None:
        p.check_failovers()
    branch_actions = [a for a in p.actions if a.action in ("commit", "rollback", "skip", "error")]
    report = RecoveryReport(
        committed=sum(1 for a in branch_actions if a.action == "commit" and a.outcome != "planned"),
        rolled_back=sum(
            1 for a in branch_actions if a.action == "rollback" and a.outcome != "planned"
        ),
        in_doubt=sum(
            1 for a in branch_actions if a.outcome in ("left", "planned") or a.action == "error"
        ),
        foreign=p.foreign,
        ended=ended,
        unreachable=tuple(n for n in names if n in p.problems),
        actions=tuple(p.actions),
        heuristics=sum(1 for a in p.actions if a.action == "heuristic"),
        possibly_lost=sum(1 for a in p.actions if a.action == "possibly-lost"),
        problems=tuple((n, p.problems[n]) for n in names if n in p.problems),
        dry_run=dry_run,
        strangers=sum(
            1 for a in p.actions if a.gtrid in p.strangers and a.outcome in ("left", "planned")
        ),
    )
    logger.debug("recovery pass took %.3f s: %s", time.monotonic() - started, report)
    return report
