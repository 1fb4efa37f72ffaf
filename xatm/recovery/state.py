"""The state of one recovery pass: what it was asked to do, the log's view (``fleet``), and
what it found and did so far; the pass's steps (``survey``, ``branches``, ``closing``) are
functions over it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xatm.core.logfields import log_fields
from xatm.core.records import LogRecord
from xatm.core.report import Action, RecoveryAction
from xatm.core.xid import parse_gtrid
from xatm.log.fleet import Fleet

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.recovery")

#: a decision row is checked for deletion once this many seconds past ``timeout`` (by then
#: its own coordinator has normally finished the transaction, and deletes its rows itself)
MARKER_END_AGE = 5.0


@dataclass
class Reach:
    """Which resources this pass reached."""

    #: resource -> why it was not reached (or failed) in this pass
    problems: dict[str, str] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)  # not in this pass (backoff)
    scanned: set[str] = field(default_factory=set)  # listed and gone through in full


@dataclass
class MarkerRows:
    """The decision rows read before the listing (commit markers)."""

    rows: dict[str, tuple[str, LogRecord]] = field(default_factory=dict)  # gtrid -> (resource, row)
    problems: dict[str, str] = field(default_factory=dict)  # resource -> why it was not read


@dataclass
class Ledger:
    """What the pass did and left, for its report."""

    actions: list[RecoveryAction] = field(default_factory=list)
    remaining: dict[str, set[str]] = field(default_factory=dict)  # gtrid -> resources left
    committed_here: set[tuple[str, str]] = field(default_factory=set)  # (gtrid, resource)
    strangers: set[str] = field(default_factory=set)  # gtrids of processes no log here lists
    #: gtrid -> the resources not read in this pass that hold a branch its decision names
    waiting: dict[str, tuple[str, ...]] = field(default_factory=dict)
    foreign: int = 0  # prepared transactions not xatm's


@dataclass
class PassState:
    """One pass: its settings, the log's view, and its findings."""

    ctx: Context
    dry_run: bool
    actor: str
    #: the log's view of every node's decisions (xatm.log.fleet, made by the node's store)
    fleet: Fleet
    progress: Callable[[str], None] | None = None
    #: act on this gtrid only (manual resolution), and say why in every record
    only: str | None = None
    prefix: str = ""
    reach: Reach = field(default_factory=Reach)
    markers: MarkerRows = field(default_factory=MarkerRows)
    ledger: Ledger = field(default_factory=Ledger)
    #: gtrid -> (node, COMMIT record): the pending decisions when step 2 began
    snapshot: dict[str, tuple[str, LogRecord]] = field(default_factory=dict)

    @property
    def own_node(self) -> str:
        return self.ctx.node_id

    def unreachable(self, name: str, why: str) -> None:
        """``name`` is skipped for the rest of the pass (one wait per silent resource)."""
        self.reach.problems.setdefault(name, why)
        logger.warning(
            "recovery: skipping resource %r: %s",
            name,
            why,
            extra=log_fields(self.own_node, resource=name),
        )

    def record(
        self, gtrid: str, resource: str, branch: str, action: Action, reason: str, outcome: str
    ) -> None:
        """Report an action (and audit it, unless planned or a skip)."""
        reason = self.prefix + reason
        self.ledger.actions.append(RecoveryAction(gtrid, resource, branch, action, reason, outcome))
        if not self.dry_run and action != "skip":
            self.ctx.audit.record(gtrid, resource, branch, action, reason, outcome, self.actor)

    def owner_finished(self, gtrid: str) -> bool:
        """The coordinator of ``gtrid`` can take no further step: this node (not running
        it) or a dead peer."""
        node = parse_gtrid(gtrid)[0]
        if node == self.own_node:
            return self.ctx.running(gtrid) is None
        return self.fleet.coordinator_dead(node)

    def may_end_marker(self, gtrid: str) -> bool:
        """Is this decision row recovery's to delete (once its branches are finished)?

        Rows of a dead peer, or of an earlier process of this node, are; rows of this
        process's own transactions are deleted by it in batches (``xatm.participants.marker``), so
        recovery takes them only if it committed one of their branches, or once they are
        old (then something kept the batch from coming)."""
        if not self.owner_finished(gtrid):
            return False
        node, created = parse_gtrid(gtrid)
        if node != self.own_node or created < self.ctx.started_at:
            return True
        if any(g == gtrid for g, _ in self.ledger.committed_here):
            return True
        _, record = self.markers.rows[gtrid]
        return time.time() - record.at > self.ctx.timeout + MARKER_END_AGE
