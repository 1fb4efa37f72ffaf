"""One recovery pass: find xatm's prepared branches and settle each by the logged decision.

The decision table (docs/protocol.md explains each row):

================================  ============================  ==========================
branch found prepared, owner ...  decision in the owner's log   action
================================  ============================  ==========================
not an xatm XID                   (not looked at)               never touched: *foreign*
this node, transaction running    any                           left to its coordinator
this node, not running            COMMIT                        COMMIT PREPARED / XA COMMIT
this node, not running            none (presumed abort)         ROLLBACK PREPARED / XA ROLLBACK
peer whose log lock is free       COMMIT                        commit (log taken over)
peer whose log lock is free       none                          roll back
peer whose log lock is held       any                           left to that live peer
peer with no log here             unknown                       left alone, reported
================================  ============================  ==========================

A COMMIT record whose branches are all gone from every resource it names (each of them
scanned in this pass) gets its END record. A resource that cannot be reached is skipped and
reported; the pass goes on with the others. Passes are idempotent: a branch already finished
by someone else is "not found", which is fine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ._filelog import FileLog, list_nodes
from ._log import CoordinatorLog
from ._participant import PhaseTwo, PreparedBranch
from ._records import LogRecord
from .errors import ResourceError

if TYPE_CHECKING:
    from ._manager import TransactionManager

logger = logging.getLogger("xatm.recovery")

Action = Literal["commit", "rollback", "skip", "error"]


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    """What a pass did (or, in a dry run, would do) about one prepared branch."""

    gtrid: str
    resource: str
    branch: str
    action: Action
    reason: str
    outcome: str  # "done", "not-found", "planned", "left", or an error message


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """The result of one recovery pass."""

    committed: int = 0
    rolled_back: int = 0
    in_doubt: int = 0  # xatm branches left prepared (owner alive, unknown owner, errors)
    foreign: int = 0  # prepared transactions that are not xatm's: untouched
    ended: int = 0  # COMMIT records closed with an END record
    unreachable: tuple[str, ...] = ()
    actions: tuple[RecoveryAction, ...] = field(default=(), repr=False)

    @property
    def clean(self) -> bool:
        """True if nothing was left in doubt and every resource was reached."""
        return self.in_doubt == 0 and not self.unreachable


@dataclass
class _Pass:
    manager: TransactionManager
    dry_run: bool
    logs: dict[str, CoordinatorLog] = field(default_factory=dict)
    decisions: dict[str, tuple[str, LogRecord]] = field(default_factory=dict)
    actions: list[RecoveryAction] = field(default_factory=list)
    remaining: dict[str, set[str]] = field(default_factory=dict)  # gtrid -> resources
    scanned: set[str] = field(default_factory=set)
    unreachable: list[str] = field(default_factory=list)
    foreign: int = 0
    peers_alive: set[str] = field(default_factory=set)
    opened: list[FileLog] = field(default_factory=list)

    def open_logs(self) -> None:
        own = self.manager._log
        self.logs[own.node_id] = own
        directory = self.manager.log_directory
        if directory is not None:
            for node in list_nodes(Path(directory)):
                if node == own.node_id:
                    continue
                peer = FileLog.take_over(Path(directory), node)
                if peer is None:
                    self.peers_alive.add(node)
                    continue
                self.opened.append(peer)
                self.logs[node] = peer
        for node, log in self.logs.items():
            for gtrid, record in log.pending().items():
                self.decisions[gtrid] = (node, record)

    def close_logs(self) -> None:
        for log in self.opened:
            log.close()

    def scan(self, name: str) -> None:
        participant, pool = self.manager._resource(name)
        try:
            conn = pool.get()
        except ResourceError as e:
            logger.warning("recovery: skipping resource %r: %s", name, e)
            self.unreachable.append(name)
            return
        try:
            found = participant.recover(conn)
            for branch in found:
                self.settle(name, branch, conn)
        except Exception as e:
            pool.discard(conn)
            if not participant.is_connection_error(e):
                raise
            logger.warning("recovery: lost resource %r during the pass: %s", name, e)
            self.unreachable.append(name)
            return
        pool.put(conn)
        self.scanned.add(name)

    def settle(self, resource: str, found: PreparedBranch, conn: object) -> None:
        xid = found.xid
        if xid is None or not xid.is_xatm:
            self.foreign += 1
            return
        gtrid, node = xid.gtrid, xid.node_id
        manager = self.manager

        def record(action: Action, reason: str, outcome: str) -> None:
            self.actions.append(RecoveryAction(gtrid, resource, xid.bqual, action, reason, outcome))

        running = manager._running(gtrid) if node == manager.node_id else None
        if running is not None:
            self.remaining.setdefault(gtrid, set()).add(resource)
            if running.abort_if_expired():
                reason = "past its timeout: its coordinator will roll it back"
            else:
                reason = "its transaction is still running in this process"
            record("skip", reason, "left")
            return
        if node not in self.logs:
            self.remaining.setdefault(gtrid, set()).add(resource)
            if node in self.peers_alive:
                reason = f"coordinator {node!r} is alive and resolves its own branches"
            else:
                reason = f"no log of coordinator {node!r} in this log directory"
            record("skip", reason, "left")
            return
        decided = gtrid in self.decisions
        action: Action = "commit" if decided else "rollback"
        reason = "decision COMMIT is logged" if decided else "no COMMIT decision: presumed abort"
        if self.dry_run:
            self.remaining.setdefault(gtrid, set()).add(resource)
            record(action, reason, "planned")
            return
        participant, _ = manager._resource(resource)
        try:
            if decided:
                result = participant.commit_prepared(conn, xid)
            else:
                result = participant.rollback_prepared(conn, xid)
        except Exception as e:
            if participant.is_connection_error(e):
                raise
            self.remaining.setdefault(gtrid, set()).add(resource)
            logger.error("recovery: %s of %s on %r failed: %s", action, gtrid, resource, e)
            record("error", reason, f"failed: {e}")
            return
        outcome = "done" if result is PhaseTwo.DONE else "not-found"
        logger.info(
            "recovery: %s %s branch %s on %r (%s)", action, gtrid, xid.bqual, resource, reason
        )
        record(action, reason, outcome)

    def end_decided(self) -> int:
        """Write END for COMMIT records whose branches are provably all finished."""
        ended = 0
        for gtrid, (node, rec) in self.decisions.items():
            if node == self.manager.node_id and self.manager._running(gtrid) is not None:
                continue
            if gtrid in self.remaining:
                continue
            if not all(r in self.scanned for r in rec.branches):
                continue
            if self.dry_run:
                continue
            self.logs[node].log_end(gtrid)
            ended += 1
        return ended


def run_pass(
    manager: TransactionManager,
    *,
    dry_run: bool = False,
    resources: Callable[[], list[str]] | None = None,
) -> RecoveryReport:
    """One recovery pass over every resource of ``manager``."""
    p = _Pass(manager, dry_run)
    started = time.monotonic()
    p.open_logs()
    try:
        names = resources() if resources is not None else list(manager.resource_names)
        for name in names:
            p.scan(name)
        ended = p.end_decided()
    finally:
        p.close_logs()
    committed = sum(1 for a in p.actions if a.action == "commit" and a.outcome != "planned")
    rolled_back = sum(1 for a in p.actions if a.action == "rollback" and a.outcome != "planned")
    in_doubt = sum(1 for a in p.actions if a.outcome in ("left", "planned") or a.action == "error")
    report = RecoveryReport(
        committed=committed,
        rolled_back=rolled_back,
        in_doubt=in_doubt,
        foreign=p.foreign,
        ended=ended,
        unreachable=tuple(p.unreachable),
        actions=tuple(p.actions),
    )
    logger.debug("recovery pass took %.3f s: %s", time.monotonic() - started, report)
    return report


def summarize(decisions: Mapping[str, LogRecord]) -> str:
    return ", ".join(sorted(decisions))
