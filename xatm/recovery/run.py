"""One recovery pass: find xatm's prepared branches and settle each by the decision rule.

For every xatm branch found prepared, the pass gathers the facts
(:func:`xatm.recovery.facts.facts_of`: whose it is, what its log says, whether a
commit-marker row exists) and asks
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

The pass's state is ``xatm.recovery.state.PassState``; its steps are functions over it:
``survey`` (the listings), ``facts`` (what is known of one branch), ``branches`` (deciding
and carrying out each branch of a resource), ``closing`` (END, verification, failover
reports).

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
each switch not checked yet gets its report (:func:`xatm.recovery.failover_report.check`).

A resource that cannot be reached (or fails in any other way) is skipped and reported; the
pass goes on with the others. Passes are idempotent: a branch already finished by someone
else is "not found", which is fine. Passes of one Context never overlap (a lock).
Every action taken is appended to the audit trail (not in a dry run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from xatm.core import events as _events
from xatm.core.report import RecoveryReport
from xatm.recovery import reachability as _reachability
from xatm.recovery.branches import scan
from xatm.recovery.closing import check_failovers, end_decided
from xatm.recovery.state import PassState
from xatm.recovery.survey import read_markers, survey

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.recovery")


@_events.observed_pass  # metrics and tracing, from the report
def run_pass(
    ctx: Context,
    *,
    dry_run: bool = False,
    resources: Callable[[], list[str]] | None = None,
    actor: str | None = None,
    progress: Callable[[str], None] | None = None,
    probe: Callable[[], list[str]] | None = None,
) -> RecoveryReport:
    """One recovery pass over every resource of ``manager`` (or those ``resources()`` names);
    the resources ``probe()`` names are only asked whether they answer
    (:mod:`xatm.recovery.reachability`: the sweeper's, backing off from them), and reported
    reached or unreachable with the others."""
    with ctx.recovery_lock:
        return locked_pass(
            ctx,
            dry_run=dry_run,
            resources=resources,
            actor=actor,
            progress=progress,
            probe=probe,
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
    probe: Callable[[], list[str]] | None = None,
) -> RecoveryReport:
    """:func:`run_pass` for a caller that holds the manager's recovery lock; ``only``
    restricts it to one gtrid, ``prefix`` starts every reason (manual resolution)."""
    fleet = ctx.fleet(dry_run=dry_run)  # the log as a pass reads it, of the store's kind
    if not fleet.begin():  # another process is resolving (shared log)
        return RecoveryReport(dry_run=dry_run)
    try:
        actor = actor or f"recover@{ctx.node_id}"
        p = PassState(ctx, dry_run, actor, fleet, progress, only, prefix)
        return _run(ctx, p, resources, probe)
    finally:
        fleet.end(ctx.timeout)  # the ENDs flushed, old decisions pruned (shared log)


def _run(
    ctx: Context,
    p: PassState,
    resources: Callable[[], list[str]] | None,
    probe: Callable[[], list[str]] | None = None,
) -> RecoveryReport:
    started = time.monotonic()
    dry_run, progress = p.dry_run, p.progress
    names = resources() if resources is not None else list(ctx.resources.names)
    probed = [n for n in (probe() if probe is not None else ()) if n not in names]
    for name in probed:
        why = _reachability.probe(ctx.resources, name)
        if why is not None:
            p.reach.problems[name] = why  # backing off from it: no warning at every pass
    if progress is not None:
        progress("listing prepared transactions")
    # step 1: list every resource once, without any peer's lock
    owners, found_any = survey(p, names)
    peers = p.fleet.dead_with_pending()  # dead peers whose log holds a pending decision
    ended = 0
    if found_any or peers or p.fleet.anything_pending():
        # step 2: take the peers' logs over, snapshot the decisions, list again and settle
        p.ledger.foreign = 0  # counted again by the full scan
        try:
            p.fleet.open(owners | peers)
            read_markers(p, names)
            p.snapshot = p.fleet.pending()
            for name in names:
                if name not in p.reach.problems:
                    scan(p, name)
            ended = end_decided(p)
        finally:
            p.fleet.close()
    if not dry_run and p.only is None:
        check_failovers(p)
    actions, problems = p.ledger.actions, p.reach.problems
    branch_actions = [a for a in actions if a.action in ("commit", "rollback", "skip", "error")]
    report = RecoveryReport(
        committed=sum(1 for a in branch_actions if a.action == "commit" and a.outcome != "planned"),
        rolled_back=sum(
            1 for a in branch_actions if a.action == "rollback" and a.outcome != "planned"
        ),
        in_doubt=sum(
            1 for a in branch_actions if a.outcome in ("left", "planned") or a.action == "error"
        ),
        foreign=p.ledger.foreign,
        ended=ended,
        unreachable=tuple(n for n in (*names, *probed) if n in problems),
        actions=tuple(actions),
        heuristics=sum(1 for a in actions if a.action == "heuristic"),
        possibly_lost=sum(1 for a in actions if a.action == "possibly-lost"),
        problems=tuple((n, problems[n]) for n in (*names, *probed) if n in problems),
        dry_run=dry_run,
        strangers=sum(
            1 for a in actions if a.gtrid in p.ledger.strangers and a.outcome in ("left", "planned")
        ),
        waiting=len(p.ledger.waiting),
        reached=tuple(n for n in (*names, *probed) if n not in problems),
    )
    logger.debug("recovery pass took %.3f s: %s", time.monotonic() - started, report)
    return report
