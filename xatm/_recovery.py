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

**Commit markers.** A transaction on the commit-marker path (``xatm._marker``) keeps its
decision as a row of ``xatm_decisions`` inside one of its resources instead of the log.
Every resource that has that table is read like a log (after the owner is known dead or
finished, before the listing): a branch whose gtrid has a row is committed, and a row whose
branches are all finished is deleted (recovery's END). Before presuming abort for a
transaction whose gtrid carries the marker flag (its coordinator had commit markers
configured; ``xatm._xid.FLAG_MARKER``) and has no decision anywhere, the decision tables
are *probed*
(``xatm._marker_recovery.probe_row``), which waits out a marker commit still running in the
server; if a resource known to hold such a table cannot be reached, the transaction is left
in doubt for a later pass (so is a resource that was not reached and has never been seen
without the table). A transaction without the flag can only have its decision in the log.

**Shared log.** With a PostgreSQL log every decision of every node is in one table, so no
log is taken over. A logged decision is obeyed; with none, the transaction is aborted by a
conditional ABORT write (which a late COMMIT then loses: fencing) once its coordinator can
no longer act (this process, not running it; or a node with no session on the log) or it is
older than its timeout. One process at a time resolves (a session-level advisory lock).

A resource that cannot be reached (or fails in any other way) is skipped and reported; the
pass goes on with the others. Passes are idempotent: a branch already finished by someone
else is "not found", which is fine. Passes of one TransactionManager never overlap (a lock).
Every action taken is appended to the audit trail (not in a dry run).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import _events, _marker_recovery
from ._filelog import FileLog, list_nodes
from ._inspect import owner_state, read_log
from ._participant import Participant, PhaseTwo, PreparedBranch
from ._pglog import MIN_ABORT_AGE, PostgresLog
from ._records import LogRecord
from ._urls import redact
from ._xid import has_long_timeout, may_use_marker, parse_gtrid
from .errors import LogError, ResourceError

if TYPE_CHECKING:
    from ._manager import TransactionManager

logger = logging.getLogger("xatm.recovery")

#: seconds allowed for clock differences between hosts sharing a log, on top of the timeout
SKEW = 5.0

Action = Literal["commit", "rollback", "skip", "error", "heuristic", "verify", "end"]
#: what pg_xact_status (or its absence) says about a branch that is no longer prepared
Verdict = Literal["committed", "aborted", "in progress", "unknown"]

CANNOT_TELL = "not found: committed earlier or resolved outside xatm (cannot tell)"
#: a decision row is checked for deletion once this many seconds past ``timeout`` (by then
#: its own coordinator has normally finished the transaction, and deletes its rows itself)
MARKER_END_AGE = 5.0


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    """What a pass did (or, in a dry run, would do) about one branch.

    ``action`` is one of: ``commit``, ``rollback`` (phase 2 sent), ``skip`` (left prepared,
    ``reason`` says why), ``error`` (phase 2 failed), ``verify`` (a logged branch that was not
    prepared any more: ``outcome`` says what is known of it), ``heuristic`` (a branch of a
    committed transaction that was rolled back outside xatm), ``end`` (the decision record
    closed; ``branch`` is empty).
    """

    gtrid: str
    resource: str
    branch: str
    action: Action
    reason: str
    outcome: str  # "done", "not-found", "planned", "left", "committed", "unknown", or an error

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "resource": self.resource,
            "branch": self.branch,
            "action": self.action,
            "reason": self.reason,
            "outcome": self.outcome,
        }


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """The result of one recovery pass."""

    committed: int = 0
    rolled_back: int = 0
    in_doubt: int = 0  # xatm branches left prepared (owner alive, unknown owner, errors)
    foreign: int = 0  # prepared transactions that are not xatm's: untouched
    ended: int = 0  # COMMIT records of a log closed with an END record
    unreachable: tuple[str, ...] = ()  # resources skipped (down, or failing)
    actions: tuple[RecoveryAction, ...] = field(default=(), repr=False)
    heuristics: int = 0  # branches of committed transactions found rolled back outside xatm
    problems: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (resource, why)
    dry_run: bool = False

    @property
    def clean(self) -> bool:
        """True if nothing was left in doubt and every resource was reached."""
        return self.in_doubt == 0 and not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "committed": self.committed,
            "rolled_back": self.rolled_back,
            "in_doubt": self.in_doubt,
            "heuristics": self.heuristics,
            "foreign": self.foreign,
            "ended": self.ended,
            "unreachable": [{"resource": r, "error": m} for r, m in self.problems],
            "actions": [a.to_json() for a in self.actions],
        }


def verify_branch(participant: Participant, conn: Any, txid: int | None) -> tuple[Verdict, str]:
    """What became of a branch that is no longer prepared, as far as the server can tell."""
    if participant.kind != "postgresql":
        return "unknown", CANNOT_TELL
    if txid is None:
        return "unknown", CANNOT_TELL + ": no transaction id was logged"
    try:
        row = conn.execute("SELECT pg_xact_status(%s::text::xid8)", (str(int(txid)),)).fetchone()
    except Exception as e:
        if participant.is_connection_error(e):
            raise
        return "unknown", f"{CANNOT_TELL}: pg_xact_status failed: {redact(str(e).strip())}"
    status = None if row is None else row[0]
    if status == "committed":
        return "committed", f"committed (PostgreSQL transaction {txid})"
    if status == "aborted":
        return "aborted", f"rolled back (PostgreSQL transaction {txid} aborted)"
    if status == "in progress":
        return "in progress", f"PostgreSQL transaction {txid} is still in progress"
    return "unknown", f"{CANNOT_TELL}: the status of transaction {txid} is no longer kept"


@dataclass
class _Pass:
    manager: TransactionManager
    dry_run: bool
    actor: str
    progress: Callable[[str], None] | None = None
    #: node -> its pending decisions, for every dead peer we act for (taken over)
    peer_pending: dict[str, Mapping[str, LogRecord]] = field(default_factory=dict)
    peer_logs: dict[str, FileLog] = field(default_factory=dict)
    #: node -> "alive" | "unknown" | "unexamined" for peers whose branches are left alone
    peer_state: dict[str, str] = field(default_factory=dict)
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
    foreign: int = 0

    @property
    def own_node(self) -> str:
        return self.manager.node_id

    # -- step 1 ----------------------------------------------------------------------------
    def survey(self, names: list[str]) -> tuple[set[str], bool]:
        """List every resource once: (nodes owning an xatm branch, anything to do)."""
        owners: set[str] = set()
        found_any = False
        self.skipped = set(self.manager.resource_names) - set(names)
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
        participant, pool = self.manager._resource(name)
        try:
            conn = pool.get()
        except ResourceError as e:
            self._unreachable(name, str(e))
            return None
        try:
            found = participant.recover(conn)
        except Exception as e:
            pool.discard(conn)
            self._unreachable(name, _describe(e))
            return None
        pool.put(conn)
        return found

    @property
    def marker_resources(self) -> list[str]:
        """Resources that are (or were seen to be) holding commit-marker decision rows, and
        those not reached in this pass that were never seen without the table: a resource
        that may hold a decision row keeps presumed abort waiting until it is read."""
        unread = set(self.problems) | self.skipped
        unknown = {name for name in unread if name not in self.manager._markerless_resources}
        return sorted(self.manager._marker_resources | unknown)

    def read_markers(self, names: list[str]) -> None:
        """(Re-)read the decision rows of every resource that has the table."""
        self.markers.clear()
        self.marker_problems.clear()
        for name in names:
            if name in self.problems:
                continue
            participant, pool = self.manager._resource(name)
            try:
                conn = pool.get()
            except ResourceError as e:
                self.marker_problems[name] = str(e)
                continue
            try:
                rows = _marker_recovery.read_rows(participant, conn)
            except Exception as e:
                pool.discard(conn)
                self.marker_problems[name] = _describe(e)
                continue
            if rows is not None and not self.dry_run:
                with contextlib.suppress(Exception):
                    _marker_recovery.delete_old_fences(participant, conn)
            pool.put(conn)
            if rows is None:
                self.manager._markerless_resources.add(name)
                continue
            self.manager._markerless_resources.discard(name)
            self.manager._marker_resources.add(name)
            for gtrid, record in rows.items():
                self.markers[gtrid] = (name, record)
        for name in self.marker_resources:
            if name not in names or name in self.problems:
                self.marker_problems.setdefault(name, "not reached in this pass")

    def _probe_markers(self, gtrid: str) -> bool | None:
        """Is a decision row of ``gtrid`` committed anywhere? Waits out a marker commit in
        flight. None if a resource that may hold rows cannot be asked."""
        if self.marker_problems:
            return None
        for name in self.marker_resources:
            participant, _ = self.manager._resource(name)
            try:
                answer = _marker_recovery.probe_row(participant, gtrid, fence=not self.dry_run)
            except Exception as e:
                self.marker_problems.setdefault(name, _describe(e))
                return None
            if answer == "row":
                return True
        return False

    @property
    def shared(self) -> PostgresLog | None:
        return self.manager.shared_log

    def _owner_finished(self, gtrid: str) -> bool:
        """The coordinator of ``gtrid`` can take no further step: this node (not running
        it) or a dead peer."""
        node = parse_gtrid(gtrid)[0]
        if node == self.own_node:
            return self.manager._running(gtrid) is None
        if self.shared is not None:
            return not self.shared.node_alive(node)
        if node in self.peer_pending:
            return True
        return owner_state(self.manager.log_directory, node) == "dead"

    def _may_end_marker(self, gtrid: str) -> bool:
        """Is this decision row recovery's to delete (once its branches are finished)?

        Rows of a dead peer, or of an earlier process of this node, are; rows of this
        process's own transactions are deleted by it in batches (``xatm._marker``), so
        recovery takes them only if it committed one of their branches, or once they are
        old (then something kept the batch from coming)."""
        if not self._owner_finished(gtrid):
            return False
        node, created = parse_gtrid(gtrid)
        if node != self.own_node or created < self.manager._started_at:
            return True
        if any(g == gtrid for g, _ in self.committed_here):
            return True
        _, record = self.markers[gtrid]
        return time.time() - record.at > self.manager.timeout + MARKER_END_AGE

    def _unreachable(self, name: str, why: str) -> None:
        self.problems.setdefault(name, why)
        logger.warning("recovery: skipping resource %r: %s", name, why)

    def dead_peers_with_decisions(self) -> set[str]:
        """Peers whose coordinator is dead and whose log still holds a pending decision."""
        directory = self.manager.log_directory
        if directory is None:
            return set()  # a shared log needs no take-over: every decision is in one place
        out = set()
        for node in list_nodes(Path(directory)):
            if node == self.own_node:
                continue
            if owner_state(directory, node) == "dead" and read_log(Path(directory) / node).pending:
                out.add(node)
        return out

    # -- step 2 ----------------------------------------------------------------------------
    def open_peers(self, nodes: set[str]) -> None:
        if self.shared is not None:
            return
        directory = self.manager.log_directory
        for node in sorted(nodes - {self.own_node}):
            if directory is None or not (Path(directory) / node / "lock").exists():
                self.peer_state[node] = "unknown"
                continue
            if self.dry_run:
                # look, do not touch: no lock taken, no segment rewritten
                if owner_state(directory, node) == "dead":
                    self.peer_pending[node] = read_log(Path(directory) / node).pending
                else:
                    self.peer_state[node] = "alive"
                continue
            peer = FileLog.take_over(Path(directory), node)
            if peer is None:
                self.peer_state[node] = "alive"
                continue
            self.peer_logs[node] = peer
            self.peer_pending[node] = peer.pending()

    def take_snapshot(self, names: list[str]) -> None:
        self.read_markers(names)
        if self.shared is not None:
            for gtrid, record in self.shared.pending(all_nodes=True).items():
                self.snapshot[gtrid] = (parse_gtrid(gtrid)[0], record)
            return
        for gtrid, record in self.manager._log.pending().items():
            self.snapshot[gtrid] = (self.own_node, record)
        for node, pending in self.peer_pending.items():
            for gtrid, record in pending.items():
                self.snapshot[gtrid] = (node, record)

    def close_logs(self) -> None:
        for log in self.peer_logs.values():
            log.close()
        self.peer_logs.clear()

    def scan(self, name: str) -> None:
        if self.progress is not None:
            self.progress(f"scanning {name}")
        participant, pool = self.manager._resource(name)
        try:
            conn = pool.get()
        except ResourceError as e:
            self._unreachable(name, str(e))
            return
        try:
            found = participant.recover(conn)
            for branch in found:
                self.settle(name, branch, conn)
        except LogError:
            pool.discard(conn)
            raise  # the log failed, not this resource: the pass cannot go on
        except Exception as e:
            pool.discard(conn)
            if participant.is_connection_error(e):
                self._unreachable(name, f"lost during the pass: {_describe(e)}")
            else:
                logger.error("recovery: resource %r failed: %s", name, _describe(e))
                self.problems.setdefault(name, _describe(e))
            return
        pool.put(conn)
        self.scanned.add(name)

    def _record(
        self, gtrid: str, resource: str, branch: str, action: Action, reason: str, outcome: str
    ) -> None:
        self.actions.append(RecoveryAction(gtrid, resource, branch, action, reason, outcome))
        if not self.dry_run and action != "skip":
            self.manager._audit.record(gtrid, resource, branch, action, reason, outcome, self.actor)

    def settle(self, resource: str, found: PreparedBranch, conn: object) -> None:
        xid = found.xid
        if xid is None or not xid.is_xatm:
            self.foreign += 1
            return
        gtrid, node = xid.gtrid, xid.node_id
        manager = self.manager

        def record(action: Action, reason: str, outcome: str) -> None:
            self._record(gtrid, resource, xid.bqual, action, reason, outcome)

        def leave(reason: str) -> None:
            self.remaining.setdefault(gtrid, set()).add(resource)
            record("skip", reason, "left")

        if node == self.own_node:
            running = manager._running(gtrid)
            if running is not None:
                if self.dry_run:
                    expired = time.monotonic() > running.deadline
                elif running.abort_if_expired():
                    expired = True
                    manager._note_expired(gtrid, resource, self.actor)
                else:
                    expired = False
                if expired:
                    leave("past its timeout: its coordinator will roll it back")
                else:
                    leave("its transaction is still running in this process")
                return
            if self.shared is not None:
                shared_decided = self._shared_decision(
                    gtrid, xid.created_at, leave, owner_done=True
                )
                if shared_decided is None:
                    return
                decided = shared_decided
            else:
                # Not running now, so it has finished: read its decision only now (a
                # decision taken since the pass began is in the log already).
                decided = gtrid in manager._log.pending()
        elif self.shared is not None:
            shared_decided = self._shared_decision(gtrid, xid.created_at, leave, owner_done=False)
            if shared_decided is None:
                return
            decided = shared_decided
        elif node in self.peer_pending:
            decided = gtrid in self.peer_pending[node] or gtrid in self.markers
        else:
            state = self.peer_state.get(node, "unexamined")
            if state == "alive":
                leave(f"coordinator {node!r} is alive and resolves its own branches")
            elif state == "unknown":
                leave(f"no log of coordinator {node!r} in this log directory")
            else:
                leave(f"coordinator {node!r} was not examined in this pass: the next one will")
            return
        if not decided and may_use_marker(gtrid) and self.marker_resources:
            # no decision in a log: a decision row may exist, or be committing right now
            row = self._probe_markers(gtrid)
            if row is None:
                where = ", ".join(sorted(self.marker_problems))
                leave(f"its decision may be a commit-marker row on {where}, not reached")
                return
            decided = row
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
            record("error", reason, f"failed: {_describe(e)}")
            return
        done = result is PhaseTwo.DONE
        if not done and participant.kind == "mysql":
            # XA RECOVER listed it a moment ago: XAER_NOTA now most likely means a session
            # still attached to it (MariaDB lets only that session finish it), not "gone".
            # The next pass looks again; a branch really gone is then simply not listed.
            leave("listed by XA RECOVER but XAER_NOTA: a live session still holds it")
            return
        if not done:
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
        if decided:
            self.committed_here.add((gtrid, resource))
        logger.info(
            "recovery: %s %s branch %s on %r (%s)", action, gtrid, xid.bqual, resource, reason
        )
        record(action, reason, "done" if done else "not-found")

    def end_decided(self) -> int:
        """Close the COMMIT records whose branches are provably all finished; verify the
        branches this pass did not commit itself (heuristic detection)."""
        ended = 0
        for gtrid, (node, rec) in sorted(self.snapshot.items()):
            if node == self.own_node and (
                self.manager._running(gtrid) is not None
                or gtrid not in self.manager._log.pending()  # its coordinator ended it
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
            if self.shared is not None or node == self.own_node:
                log: Any = self.manager._log
            else:
                log = self.peer_logs[node]
            log.log_end(gtrid)
            self._record(gtrid, "", "", "end", "every branch is finished", "done")
            ended += 1
        for gtrid in sorted(self.markers):
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
            participant, pool = self.manager._resource(resource)
            try:
                conn = pool.get()
                try:
                    _marker_recovery.delete_row(participant, conn, gtrid)
                except Exception:
                    pool.discard(conn)
                    raise
                pool.put(conn)
            except Exception as e:
                logger.warning("recovery: cannot delete the decision row of %s: %s", gtrid, e)
                continue
            reason = "every branch is finished: decision row deleted"
            if took_part:
                self._record(gtrid, resource, "", "end", reason, "done")
            else:  # the coordinator finished it itself: report, do not audit
                self.actions.append(RecoveryAction(gtrid, resource, "", "end", reason, "done"))
        return ended

    def _shared_decision(
        self, gtrid: str, created_at: float, leave: Callable[[str], None], *, owner_done: bool
    ) -> bool | None:
        """With the shared log: True to commit, False to roll back, None when left.

        A logged decision is obeyed. With none, the transaction may be aborted (a
        conditional ABORT write, which a late COMMIT of its coordinator then loses) when its
        coordinator cannot act on it any more (``owner_done``; or its node holds no session
        on the log) or when it is older than the timeout; the write may find a COMMIT that
        won the race, which is then obeyed."""
        shared = self.shared
        assert shared is not None
        node = parse_gtrid(gtrid)[0]
        age = time.time() - created_at
        young = age <= self.manager.timeout + SKEW or has_long_timeout(gtrid)
        if not owner_done and young and shared.node_alive(node):
            # its live coordinator finishes it (also a COMMIT it is still carrying out:
            # committing its branches under it would only make it report false heuristics)
            leave(f"coordinator {node!r} is alive and the transaction is within its timeout")
            return None
        found = shared.decisions([gtrid]).get(gtrid)
        if found is not None:
            return not isinstance(found, str)
        if gtrid in self.markers:
            return True
        if may_use_marker(gtrid) and self.marker_resources:
            row = self._probe_markers(gtrid)
            if row is None:
                where = ", ".join(sorted(self.marker_problems))
                leave(f"its decision may be a commit-marker row on {where}, not reached")
                return None
            if row:
                return True
        if self.dry_run:
            return False
        return shared.log_abort(gtrid, by=self.actor) == "C"

    def _verify(self, gtrid: str, rec: LogRecord) -> bool:
        """Check each logged branch this pass did not commit; False if one is still open."""
        txids: Mapping[str, int] = getattr(rec, "txids", None) or {}
        for resource in rec.branches:
            if (gtrid, resource) in self.committed_here:
                continue
            participant, pool = self.manager._resource(resource)
            try:
                conn = pool.get()
            except ResourceError as e:
                self._unreachable(resource, str(e))
                return False
            try:
                verdict, text = verify_branch(participant, conn, txids.get(resource))
            except Exception as e:
                pool.discard(conn)
                self._unreachable(resource, f"lost during the pass: {_describe(e)}")
                return False
            pool.put(conn)
            if verdict == "in progress":
                return False
            if verdict == "aborted":
                logger.error(
                    "HEURISTIC OUTCOME: transaction %s was decided COMMIT, but its branch on"
                    " %r was %s: the databases disagree; see docs/operations.md",
                    gtrid,
                    resource,
                    text,
                )
                self._record(gtrid, resource, resource, "heuristic", "decision is COMMIT", text)
            else:  # not an action taken: reported, not audited
                self.actions.append(
                    RecoveryAction(
                        gtrid, resource, resource, "verify", "not prepared any more", text
                    )
                )
        return True


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return redact(text)


@_events.observed_pass  # metrics and tracing, from the report
def run_pass(
    manager: TransactionManager,
    *,
    dry_run: bool = False,
    resources: Callable[[], list[str]] | None = None,
    actor: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RecoveryReport:
    """One recovery pass over every resource of ``manager`` (or those ``resources()`` names)."""
    with manager._recovery_lock:
        shared = manager.shared_log
        if shared is not None and not dry_run and not shared.try_sweep_lock():
            logger.info("recovery: another process is resolving the shared log's transactions")
            return RecoveryReport(dry_run=dry_run)
        try:
            report = _run(
                manager, dry_run, resources, actor or f"recover@{manager.node_id}", progress
            )
            if shared is not None and not dry_run:
                # ended COMMITs go; ABORTs stay long enough to keep fencing late COMMITs
                shared.maybe_prune(max(MIN_ABORT_AGE, 100 * manager.timeout))
            return report
        finally:
            if shared is not None and not dry_run:
                shared.release_sweep_lock()


def _run(
    manager: TransactionManager,
    dry_run: bool,
    resources: Callable[[], list[str]] | None,
    actor: str,
    progress: Callable[[str], None] | None,
) -> RecoveryReport:
    started = time.monotonic()
    names = resources() if resources is not None else list(manager.resource_names)
    p = _Pass(manager, dry_run, actor, progress)
    if progress is not None:
        progress("listing prepared transactions")
    owners, found_any = p.survey(names)
    peers = p.dead_peers_with_decisions()
    ended = 0
    pending = (
        manager.shared_log.pending(all_nodes=True)
        if manager.shared_log is not None
        else manager._log.pending()
    )
    if found_any or peers or pending:
        p.foreign = 0  # counted again by the full scan
        try:
            p.open_peers(owners | peers)
            p.take_snapshot(names)
            for name in names:
                if name not in p.problems:
                    p.scan(name)
            ended = p.end_decided()
            if manager.shared_log is not None and not dry_run:
                manager.shared_log.flush()  # the ENDs: no COMMIT batch may come to carry them
        finally:
            p.close_logs()
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
        problems=tuple((n, p.problems[n]) for n in names if n in p.problems),
        dry_run=dry_run,
    )
    logger.debug("recovery pass took %.3f s: %s", time.monotonic() - started, report)
    return report
