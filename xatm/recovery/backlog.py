"""The in-doubt backlog as the coordinator logs tell it, whatever the resources answer now.

What the metrics export as ``xatm_in_doubt_transactions`` and its kin. Two kinds of
transaction are in doubt:

* **decided, unfinished**: a COMMIT decision is pending in a coordinator log (no END yet):
  read from the logs themselves (this node's in memory, the other nodes' files without their
  lock, or the shared table), so that a resource being down, hung or backed off from changes
  nothing in the count;
* **undecided**: a branch left prepared with no decision, as the last pass that reached its
  resource listed it (the coordinator log holds no record of an undecided transaction: presumed
  abort). A resource that cannot be reached now keeps its last listing: what was prepared there
  is still in doubt as far as anyone knows.

A transaction this process is still running is not counted, nor one younger than ``grace``
seconds (the manager's timeout) that is another node's (its END may simply not be on disk
yet) or undecided (normally still in flight). Per resource: each counted transaction with a
branch there that is prepared, or whose state is unknown (no listing of that resource yet, or
the resource is unreachable now). Pure but for :func:`read_pending`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xatm.core.records import LogRecord
from xatm.core.report import RecoveryReport
from xatm.core.xid import parse_gtrid

if TYPE_CHECKING:
    from xatm.node.context import Context


@dataclass(frozen=True, slots=True)
class Backlog:
    """The in-doubt transactions seen from one node (see the module docstring)."""

    decided: int = 0
    undecided: int = 0
    oldest_created: float | None = None  # creation time (epoch) of the oldest counted
    by_log: Mapping[str, int] = field(default_factory=dict)  # decided, per log's node
    by_resource: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.decided + self.undecided


def _created(gtrid: str, fallback: float) -> float:
    try:
        return parse_gtrid(gtrid)[1]
    except ValueError:
        return fallback


def measure(
    *,
    pending: Mapping[str, Mapping[str, LogRecord]],
    own_node: str,
    listings: Mapping[str, Collection[str]],
    unreachable: Collection[str],
    running: Callable[[str], bool],
    now: float,
    grace: float,
) -> Backlog:
    """The backlog: ``pending`` is each node's pending COMMIT records, ``listings`` the
    gtrids left prepared on each resource by the last pass that reached it, ``unreachable``
    the resources that could not be reached since."""
    created: dict[str, float] = {}
    by_log: dict[str, int] = {}
    by_resource: dict[str, int] = {}
    decided: set[str] = set()
    for node, records in sorted(pending.items()):
        for gtrid, rec in records.items():
            if running(gtrid) or (node != own_node and now - rec.at < grace):
                continue
            decided.add(gtrid)
            created[gtrid] = _created(gtrid, rec.at)
            by_log[node] = by_log.get(node, 0) + 1
            for r in rec.branches:
                finished = r in listings and r not in unreachable and gtrid not in listings[r]
                if not finished:
                    by_resource[r] = by_resource.get(r, 0) + 1
    undecided: set[str] = set()
    for r, gtrids in sorted(listings.items()):
        for gtrid in gtrids:
            if gtrid in decided or running(gtrid):
                continue
            at = _created(gtrid, now)
            if now - at < grace:
                continue
            undecided.add(gtrid)
            created[gtrid] = at
            by_resource[r] = by_resource.get(r, 0) + 1
    return Backlog(
        decided=len(decided),
        undecided=len(undecided),
        oldest_created=min(created.values(), default=None),
        by_log=by_log,
        by_resource=by_resource,
    )


def left_by_resource(report: RecoveryReport) -> dict[str, frozenset[str]]:
    """What ``report``'s pass left prepared on each resource it reached (its listing)."""
    left: dict[str, set[str]] = {r: set() for r in report.reached}
    for a in report.actions:
        if a.resource in left and (
            a.action == "error" or (a.action == "skip" and a.outcome == "left")
        ):
            left[a.resource].add(a.gtrid)
    return {r: frozenset(g) for r, g in left.items()}


def read_pending(ctx: Context) -> tuple[dict[str, Mapping[str, LogRecord]], str | None]:
    """Every node's pending COMMIT records as the logs hold them now, and why this node's own
    log cannot be read (None: it can; a file log that failed, the shared log unreachable)."""
    return ctx.store.read_pending(ctx.node_id, ctx.log)
