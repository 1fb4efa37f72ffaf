"""The end of a pass: END for the decisions whose branches are all finished (each branch
verified: heuristic outcomes), decision rows deleted, and the failover reports."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from xatm.core.logfields import log_fields
from xatm.core.records import LogRecord
from xatm.core.report import Action, RecoveryAction
from xatm.core.urls import describe_error
from xatm.errors import LogError, ResourceError
from xatm.recovery import failover_report as _failover_report
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.plan import Step, TransactionPlan, plan_transaction
from xatm.recovery.state import PassState

logger = logging.getLogger("xatm.recovery")


def end_decided(p: PassState) -> int:
    """Close the COMMIT records whose branches are provably all finished; verify the
    branches this pass did not commit itself (heuristic detection)."""
    ended = 0
    for gtrid, (node, rec) in sorted(p.snapshot.items()):
        if p.only is not None and gtrid != p.only:
            continue
        if node == p.own_node and (
            p.ctx.running(gtrid) is not None
            or gtrid not in p.ctx.log.pending()  # its coordinator ended it
        ):
            continue
        if plan(p, gtrid, rec).step is not Step.END:
            continue
        if not verify(p, gtrid, rec):
            continue
        if p.dry_run:
            p.record(gtrid, "", "", "end", "every branch is finished", "planned")
            continue
        p.fleet.log_end(gtrid, node)
        p.record(gtrid, "", "", "end", "every branch is finished", "done")
        ended += 1
    for gtrid in sorted(p.markers.rows):
        if p.only is not None and gtrid != p.only:
            continue
        resource, rec = p.markers.rows[gtrid]
        if not p.may_end_marker(gtrid) or plan(p, gtrid, rec).step is not Step.END:
            continue
        took_part = any(g == gtrid for g, _ in p.ledger.committed_here)
        if not verify(p, gtrid, rec):
            continue
        if p.dry_run:
            p.ledger.actions.append(
                RecoveryAction(gtrid, resource, "", "end", "decision row", "planned")
            )
            continue
        try:
            with p.ctx.resources.borrow(resource, recovery=True) as (participant, conn):
                _marker_recovery.delete_row(participant, conn, gtrid)
        except Exception as e:
            logger.warning(
                "recovery: cannot delete the decision row of %s: %s",
                gtrid,
                e,
                extra=log_fields(p.own_node, gtrid, resource),
            )
            continue
        reason = "every branch is finished: decision row deleted"
        if took_part:
            p.record(gtrid, resource, "", "end", reason, "done")
        else:  # the coordinator finished it itself: report, do not audit
            p.ledger.actions.append(RecoveryAction(gtrid, resource, "", "end", reason, "done"))
    return ended


def plan(p: PassState, gtrid: str, rec: LogRecord) -> TransactionPlan:
    """The transaction's plan (:func:`xatm.recovery.plan.plan_transaction`) by what this pass
    saw; a branch on a resource not read in it is reported as left in doubt (unknown)."""
    found = plan_transaction(
        decided=True,
        logged_branches=rec.branches,
        prepared={r: "" for r in p.ledger.remaining.get(gtrid, ())},
        unread=set(rec.branches) - p.reach.scanned,
    )
    if found.step is Step.WAIT and gtrid not in p.ledger.waiting:
        p.ledger.waiting[gtrid] = found.waiting_on
        for resource in found.waiting_on:
            why = p.reach.problems.get(resource, "not reached in this pass")
            p.ledger.actions.append(
                RecoveryAction(
                    gtrid,
                    resource,
                    resource,
                    "skip",
                    f"{p.prefix}decision COMMIT is logged, but {resource!r} cannot be"
                    f" read ({why}): its branch is unknown; the decision stays open",
                    "left",
                )
            )
    return found


def verify(p: PassState, gtrid: str, rec: LogRecord) -> bool:
    """Check each logged branch this pass did not commit; False if one is still open."""
    txids: Mapping[str, int] = getattr(rec, "txids", None) or {}
    watch = p.ctx.failover
    for resource in rec.branches:
        if (gtrid, resource) in p.ledger.committed_here:
            continue
        if resource in p.reach.problems:  # unreachable in this pass: the next one checks
            return False
        switch = None if watch is None else watch.lost_txid(resource, txids.get(resource), rec.at)
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
                with p.ctx.resources.borrow(resource, recovery=True) as (
                    participant,
                    conn,
                ):
                    verdict, text = participant.verify_finished(conn, txids.get(resource))
        except ResourceError as e:
            p.unreachable(resource, str(e))
            return False
        except Exception as e:
            p.unreachable(resource, f"lost during the pass: {describe_error(e)}")
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
                extra=log_fields(p.own_node, gtrid, resource),
            )
            p.record(gtrid, resource, resource, "heuristic", "decision is COMMIT", text)
        else:  # not an action taken: reported, not audited
            p.ledger.actions.append(
                RecoveryAction(gtrid, resource, resource, "verify", "not prepared any more", text)
            )
    return True


def check_failovers(p: PassState) -> None:
    """The report of each switch not checked yet (``xatm.recovery.failover_report.check``).
    Decisions still pending are recovery's own to verify (their losses are reported when they are
    closed), so they are not listed twice."""
    watch = p.ctx.failover
    if watch is None or not any(
        s.checked_at is None for r in watch.records().values() for s in r.switches
    ):
        return
    skip = set(p.snapshot) | {a.gtrid for a in p.ledger.actions if a.action == "heuristic"}
    try:
        skip |= set(p.ctx.log.pending())
    except LogError:
        return  # the log failed: nothing it says can be trusted now
    own = p.own_node

    def between(node: str, start: float, end: float) -> list[LogRecord]:
        return [r for r in p.fleet.decided_between(node, start, end) if r.gtrid not in skip]

    def report(kind: str, gtrid: str, resource: str, reason: str, outcome: str) -> None:
        action: Action = "heuristic" if kind == "heuristic" else "possibly-lost"
        p.record(gtrid, resource, resource, action, reason, outcome)

    _failover_report.check(p.ctx, between, p.fleet.horizon(own), report)
