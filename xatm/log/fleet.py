"""Every node's decisions, as one recovery pass reads them: one class per kind of log.

A recovery pass needs the same things of either log, and asks them here instead of
switching on the kind:

* whether it may resolve now (:meth:`Fleet.begin`; the shared log lets one process at a time);
* which peers' coordinators are dead with decisions pending, and their logs *opened* (a file
  log is taken over by its flock; the shared table needs nothing);
* the state of a peer's coordinator, the decisions pending (the snapshot), the decision of one
  gtrid, the END of a decision, and where a node's commit-marker rows may be;
* what a node's log retains of its ended decisions, since when, and its record of its
  resources' timelines (after a PostgreSQL failover, ``xatm.node.failover``);
* a presumed abort written first where the log can fence it (only the shared log: a
  conditional ABORT row), and the housekeeping after the pass.

:class:`FileFleet` is a directory of node logs (``xatm.log.file``), :class:`SharedFleet` the
shared PostgreSQL table (``xatm.log.shared``). The node's store (``xatm.log.store``) makes the
one of its kind for each pass (``xatm.recovery.run``). What inspection and manual resolution
ask too (the state of a node's coordinator, a node's log read without its lock, its
commit-marker resources) each fleet asks the read-side view of the same kind
(``xatm.log.view``); what only a pass does (taking logs over for the pass, the snapshot, ENDs,
the fenced abort, the sweeper lock) is here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

from xatm.core.decide import Logged
from xatm.core.logfields import log_fields
from xatm.core.records import LogRecord
from xatm.core.urls import redact
from xatm.core.xid import parse_gtrid
from xatm.errors import LogCorrupt
from xatm.log.base import CoordinatorLog
from xatm.log.file import FileLog
from xatm.log.shared import MIN_ABORT_AGE, PostgresLog
from xatm.log.timelines import ResourceTimeline
from xatm.log.view import AbortAnswer, FileLogs, SharedLogs

logger = logging.getLogger("xatm.recovery")

#: a peer's coordinator, seen from this pass: ``dead`` (its log opened here), ``alive``,
#: ``unknown`` (no log of it here), ``corrupt`` (its log cannot be trusted), ``unexamined``
#: (it appeared after the pass opened the logs)
PeerState = Literal["dead", "alive", "unknown", "corrupt", "unexamined"]


class Fleet(Protocol):
    """What a recovery pass asks of the log (see the module docstring)."""

    #: the decisions of every node are in one table, and a presumed abort is fenced there
    shared: bool

    def begin(self) -> bool: ...

    def end(self, timeout: float) -> None: ...

    def dead_with_pending(self) -> set[str]: ...

    def open(self, nodes: set[str]) -> None: ...

    def peer(self, node: str) -> PeerState: ...

    def coordinator_dead(self, node: str) -> bool: ...

    def pending(self) -> dict[str, tuple[str, LogRecord]]: ...

    def anything_pending(self) -> bool: ...

    def decision(self, gtrid: str, node: str) -> Logged: ...

    def abort(self, gtrid: str, by: str) -> AbortAnswer: ...

    def log_end(self, gtrid: str, node: str) -> None: ...

    def marker_resources(self, node: str) -> frozenset[str] | None: ...

    def incarnations(self, node: str) -> frozenset[str] | None: ...

    def retained(self, gtrid: str, node: str) -> bool: ...

    def horizon(self, node: str) -> float: ...

    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]: ...

    def timelines(self, node: str) -> dict[str, ResourceTimeline]: ...

    def log_switches(self) -> tuple[float, ...]: ...

    def close(self) -> None: ...


class _Retained:
    """What both fleets read from their log's view about retained decisions and
    timelines (``self._view``), each at most once per pass."""

    _view: FileLogs | SharedLogs
    _timelines: dict[str, dict[str, ResourceTimeline]]
    _switches: tuple[float, ...] | None = None

    def retained(self, gtrid: str, node: str) -> bool:
        return self._view.retained(node, gtrid) is not None

    def horizon(self, node: str) -> float:
        return self._view.horizon(node)

    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]:
        return self._view.decided_between(node, start, end)

    def timelines(self, node: str) -> dict[str, ResourceTimeline]:
        if node not in self._timelines:
            self._timelines[node] = self._view.timelines().load(node)
        return self._timelines[node]

    def log_switches(self) -> tuple[float, ...]:
        if self._switches is None:
            self._switches = self._view.log_switches()
        return self._switches


class FileFleet(_Retained):
    """The node logs of one directory; a dead peer's log is taken over (locked) while the
    pass acts for it, or only read in a dry run. ``own_node`` is this process's node, whose
    log is ``own_log`` and whose file log lists ``own_incarnations``; a peer's log taken over
    keeps its ended decisions ``retain`` seconds."""

    shared = False

    def __init__(
        self,
        directory: str,
        *,
        own_node: str,
        own_log: CoordinatorLog,
        own_incarnations: frozenset[str] | None,
        retain: float,
        dry_run: bool,
    ) -> None:
        self._own_node = own_node
        self._own_log = own_log
        self._own_incarnations = own_incarnations
        self._retain = retain
        self._dir = Path(directory)
        self._view = FileLogs(directory, own_node=own_node, own_log=own_log)
        self._dry_run = dry_run
        self._pending: dict[str, Mapping[str, LogRecord]] = {}  # opened peer -> its pending
        self._logs: dict[str, FileLog] = {}
        self._state: dict[str, PeerState] = {}
        self._incarnations: dict[str, frozenset[str] | None] = {}
        self._timelines = {}

    def begin(self) -> bool:
        return True

    def end(self, timeout: float) -> None:
        pass

    def dead_with_pending(self) -> set[str]:
        out = set()
        for node in self._view.nodes():
            if node == self._own_node or self._view.owner(node) != "dead":
                continue
            try:
                if self._view.read(node).pending:
                    out.add(node)
            except LogCorrupt as e:
                if not self._dry_run:  # a dry run (a plan, or manual resolution) only looks
                    logger.error("recovery: %s", e, extra=log_fields(self._own_node))
                out.add(node)  # examined (and left alone) by open
        return out

    def open(self, nodes: set[str]) -> None:
        for node in sorted(nodes - {self._own_node}):
            if not (self._dir / node / "lock").exists():
                self._state[node] = "unknown"
                continue
            try:
                if self._dry_run:  # look, do not touch: no lock taken, no segment rewritten
                    if self._view.owner(node) == "dead":
                        self._pending[node] = self._view.read(node).pending
                        self._state[node] = "dead"
                    else:
                        self._state[node] = "alive"
                    continue
                peer = FileLog.take_over(self._dir, node, retain=self._retain)
            except LogCorrupt:
                self._state[node] = "corrupt"  # its decisions are unknown: leave them
                continue
            if peer is None:
                self._state[node] = "alive"
                continue
            self._logs[node] = peer
            self._pending[node] = peer.pending()
            self._state[node] = "dead"

    def peer(self, node: str) -> PeerState:
        # only a log opened by this pass says "dead": its decisions were read
        return self._state.get(node, "unexamined")

    def coordinator_dead(self, node: str) -> bool:
        return self._state.get(node) == "dead" or self._view.owner(node) == "dead"

    def pending(self) -> dict[str, tuple[str, LogRecord]]:
        out = {g: (self._own_node, r) for g, r in self._own_log.pending().items()}
        for node, pending in self._pending.items():
            for gtrid, record in pending.items():
                out[gtrid] = (node, record)
        return out

    def anything_pending(self) -> bool:
        return bool(self._own_log.pending())

    def decision(self, gtrid: str, node: str) -> Logged:
        # this node's is read now (a decision taken since the pass began is in it already)
        pending = self._own_log.pending() if node == self._own_node else self._pending.get(node)
        return Logged.COMMIT if pending is not None and gtrid in pending else Logged.NONE

    def abort(self, gtrid: str, by: str) -> AbortAnswer:
        return "A"  # presumed abort needs no record in a file log

    def log_end(self, gtrid: str, node: str) -> None:
        log = self._own_log if node == self._own_node else self._logs[node]
        log.log_end(gtrid)

    def marker_resources(self, node: str) -> frozenset[str] | None:
        return self._view.marker_resources(node)

    def incarnations(self, node: str) -> frozenset[str] | None:
        if node == self._own_node:
            return self._own_incarnations
        if node not in self._incarnations:
            self._incarnations[node] = self._view.incarnations(node)
        return self._incarnations[node]

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()


class SharedFleet(_Retained):
    """The shared PostgreSQL log: every node's decisions in one table, nothing to take over;
    a node is alive while a session holds its node lock; one process resolves at a time."""

    shared = True

    def __init__(self, log: PostgresLog, *, dry_run: bool, retain: float) -> None:
        self._log = log
        self._view = SharedLogs(log)  # no own node: this pass asks only of its peers
        self._dry_run = dry_run
        self._locked = False
        self._retain = retain
        self._timelines = {}

    def begin(self) -> bool:
        if self._dry_run:
            return True
        self._locked = self._log.try_sweep_lock()
        if not self._locked:
            logger.info("recovery: another process is resolving the shared log's transactions")
        return self._locked

    def end(self, timeout: float) -> None:
        if not self._locked:
            return
        try:
            self._log.flush()  # the ENDs: no COMMIT batch may come to carry them
            # ended COMMITs go; ABORTs stay long enough to keep fencing late COMMITs.
            # Housekeeping only: its failure must not turn a good pass into an error.
            try:
                self._log.maybe_prune(max(MIN_ABORT_AGE, 100 * timeout), retain=self._retain)
            except Exception as e:
                logger.warning("recovery: pruning the shared log failed: %s", redact(str(e)))
        finally:
            self._log.release_sweep_lock()
            self._locked = False

    def dead_with_pending(self) -> set[str]:
        return set()  # every decision is in one place: nothing to take over

    def open(self, nodes: set[str]) -> None:
        pass

    def peer(self, node: str) -> PeerState:
        return "alive" if self._view.owner(node) == "alive" else "dead"

    def coordinator_dead(self, node: str) -> bool:
        return self._view.owner(node) == "dead"

    def pending(self) -> dict[str, tuple[str, LogRecord]]:
        return {g: (parse_gtrid(g)[0], r) for g, r in self._log.pending(all_nodes=True).items()}

    def anything_pending(self) -> bool:
        return bool(self._log.pending(all_nodes=True))

    def decision(self, gtrid: str, node: str) -> Logged:
        found = self._log.decisions([gtrid]).get(gtrid)
        if found is None:
            return Logged.NONE
        return Logged.ABORT if isinstance(found, str) else Logged.COMMIT

    def abort(self, gtrid: str, by: str) -> AbortAnswer:
        return self._log.log_abort(gtrid, by=by)

    def log_end(self, gtrid: str, node: str) -> None:
        self._log.log_end(gtrid)

    def marker_resources(self, node: str) -> frozenset[str] | None:
        return self._view.marker_resources(node)  # None: no commit markers with it

    def incarnations(self, node: str) -> frozenset[str] | None:
        return None  # every decision is in the table, and a presumed abort is fenced there

    def close(self) -> None:
        pass
