"""The coordinator logs of one deployment, as operators' code reads them: one class per kind.

Inspection (``xatm.ops.inspect``) and manual resolution (``xatm.ops.resolve``) ask the same
questions of either kind of log, and ask them here instead of switching on the kind:

* who owns node N: this process, a live coordinator, a dead one, or unknown (no log of it
  here) (:meth:`LogView.owner`);
* what N logged: its pending COMMIT records (or every node's), whether an ABORT decision is
  logged for a gtrid, where N's commit-marker rows may be, and the audit trail;
* the node logs kept as files (to list and compact), read without their lock, and a dead
  node's log taken over (locked) and closed again;
* what N's log still retains of its decisions, ended ones included (``retain`` seconds),
  and since when it retains all of them (its horizon); each node's record of its
  PostgreSQL resources' timelines (``xatm.log.timelines``);
* N's log opened to write a decision for one of its transactions
  (:meth:`LogView.open_for_decision`): its own log for this process's node, a dead node's log
  taken over for the duration, the shared table for anyone; with what it holds for the gtrid
  and, where the log can fence, a conditional ABORT.

:class:`FileLogs` is a directory of per-node file logs (``xatm.log.file``): the owner of a
node is whoever holds its log's ``flock``, a live node's log is read without the lock.
:class:`SharedLogs` is the shared PostgreSQL log (``xatm.log.shared``): a node is alive while a
session holds its advisory lock, and a decision is a row any process may write (an ABORT
conditionally: fencing). The node's store (``xatm.log.store``) gives the view of its kind. Only
facts are gathered here; what to do with them is decided elsewhere (``xatm.core.decide``,
``xatm.ops.resolve``). A recovery pass asks its own interface (``xatm.log.fleet``), which locks
and writes as a pass must.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from xatm.core.records import LogRecord
from xatm.errors import XatmError
from xatm.log import incarnations as _incarnations
from xatm.log import node_markers as _node_markers
from xatm.log.audit import AuditEntry, read_audit
from xatm.log.base import CoordinatorLog, OwnerState
from xatm.log.file import (
    FileLog,
    LogSnapshot,
    Retained,
    list_nodes,
    owner_state,
    read_log,
    retained_decisions,
)
from xatm.log.timelines import FileTimelines, SharedTimelines, TimelineStore

if TYPE_CHECKING:
    from xatm.log.shared import PostgresLog

#: what a log holds for one gtrid: its COMMIT record, an ABORT decision ("A"), or nothing
Found = LogRecord | Literal["A"] | None
#: the answer of a conditional ABORT: it landed ("A"), a COMMIT won ("C"), or it gave up
#: waiting ("busy")
AbortAnswer = Literal["A", "C", "busy"]


class OpenedLog(Protocol):
    """A node's log, opened to write a decision for one of its transactions."""

    @property
    def log(self) -> CoordinatorLog | None:
        """Where a decision can be written; None when the node's log is not held here."""
        ...

    def decision(self, gtrid: str) -> Found:
        """What the log holds for ``gtrid`` now (read again at every call)."""
        ...

    def fence_abort(self, gtrid: str, by: str) -> AbortAnswer | None:
        """Log ABORT for ``gtrid`` where the log fences a late COMMIT with it (the shared
        log) and return the decision that holds; None where a presumed abort writes
        nothing (a file log)."""
        ...


class LogView(Protocol):
    """The coordinator logs of a deployment, read (see the module docstring)."""

    #: every node's decisions are in one table, and a presumed abort is fenced there
    shared: bool

    def owner(self, node: str) -> OwnerState:
        """Who owns ``node``'s log now: this process, a live or dead coordinator, unknown."""
        ...

    def pending(self, node: str, owner: OwnerState) -> Mapping[str, LogRecord]:
        """The pending COMMIT records of ``node``, whose owner was just found to be
        ``owner``. The shared log answers with every node's (one table): look a gtrid up."""
        ...

    def every_pending(
        self, node_pending: Callable[[str], Mapping[str, LogRecord]]
    ) -> list[Mapping[str, LogRecord]]:
        """The pending COMMIT records of every node: a file log's per node, each through
        ``node_pending`` (the caller's cache of :meth:`pending`); the shared log's table."""
        ...

    def aborted(self, gtrid: str) -> bool:
        """An ABORT decision is logged for ``gtrid`` (only the shared log holds them)."""
        ...

    def marker_resources(self, node: str) -> frozenset[str] | None:
        """The resources recorded as ``node``'s commit-marker resources (None: none are
        recorded, or the shared log, which has no commit markers)."""
        ...

    def incarnations(self, node: str) -> frozenset[str] | None:
        """The incarnations (processes) that held ``node``'s file log (None: none recorded,
        or the shared log, where a presumed abort is fenced and needs no such proof)."""
        ...

    def audit(self, gtrid: str | None = None) -> list[AuditEntry]:
        """The audit trail of every node (of one transaction if ``gtrid`` is given)."""
        ...

    def retained(self, node: str, gtrid: str) -> LogRecord | None:
        """``node``'s COMMIT decision of ``gtrid`` if its log still holds it, ended or not."""
        ...

    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]:
        """``node``'s COMMIT decisions still held, made in ``[start, end)``, ended or not."""
        ...

    def horizon(self, node: str) -> float:
        """The time since which ``node``'s log holds every COMMIT it decided."""
        ...

    def log_switches(self) -> tuple[float, ...]:
        """When the log's own database was found on a new timeline (a failover that may
        have lost decisions: ``xatm.core.decide.log_failed_over_since``); none for files."""
        ...

    def timelines(self) -> TimelineStore:
        """Where the nodes' records of their resources' timelines are kept."""
        ...

    def nodes(self) -> list[str]:
        """The nodes whose log is kept as files here (none for the shared log)."""
        ...

    def read(self, node: str, *, strict: bool = True, every: bool = False) -> LogSnapshot:
        """``node``'s log files as they are on disk, read without the lock (the shared log
        keeps no files: nothing): those holding its pending decisions, or ``every`` one
        (the retained ones too). ``strict``: a corrupt segment raises LogCorrupt."""
        ...

    def take_over(
        self, node: str, wait: float, *, keep_ended: bool = True
    ) -> contextlib.AbstractContextManager[CoordinatorLog]:
        """``node``'s log, held while the context lasts: a file log locked (LogLocked if its
        lock stays held for ``wait`` seconds) and closed again; the shared log as it is.
        ``keep_ended`` False drops a file log's retained ended decisions (compaction)."""
        ...

    def open_for_decision(
        self, node: str, owner: OwnerState, wait: float
    ) -> contextlib.AbstractContextManager[OpenedLog]:
        """``node``'s log opened to write a decision, while the context lasts. A file log:
        this process's own log, a dead owner's log taken over (LogLocked if its lock stays
        held for ``wait`` seconds: a recovery pass, or the coordinator restarting), or no
        log (a live owner's is then read without its lock). The shared log: its table."""
        ...


class _FileOpened:
    """A file log opened for a decision: the log held (or none), and the log to read
    without its lock when the node's live coordinator holds it."""

    def __init__(self, log: CoordinatorLog | None, unlocked: Path | None) -> None:
        self.log = log
        self._unlocked = unlocked

    def decision(self, gtrid: str) -> Found:
        record = self.log.pending().get(gtrid) if self.log is not None else None
        if record is None and self._unlocked is not None:
            # look (without the lock) at what the live coordinator logged
            record = read_log(self._unlocked).pending.get(gtrid)
        return record

    def fence_abort(self, gtrid: str, by: str) -> AbortAnswer | None:
        return None  # presumed abort needs no record in a file log


class FileLogs:
    """A directory of per-node file logs (``xatm.log.file``); ``own_node`` is this
    process's node, whose log is ``own_log`` and whose pending decisions ``own_pending``
    gives (without them, its log is read from disk like any other)."""

    shared = False

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        own_node: str | None = None,
        own_log: CoordinatorLog | None = None,
        own_pending: Callable[[], Mapping[str, LogRecord]] | None = None,
    ) -> None:
        self.directory = str(directory)
        self._own_node = own_node
        self._own_log = own_log
        self._own_pending = own_pending
        self._retained: dict[str, Retained] = {}  # read once per view

    def owner(self, node: str) -> OwnerState:
        if node == self._own_node:
            return "this-process"
        return owner_state(self.directory, node)

    def _every_retained(self, node: str) -> Retained:
        if node not in self._retained:
            self._retained[node] = retained_decisions(Path(self.directory) / node)
        return self._retained[node]

    def retained(self, node: str, gtrid: str) -> LogRecord | None:
        return self._every_retained(node).decisions.get(gtrid)

    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]:
        every = self._every_retained(node).decisions.values()
        return sorted((r for r in every if start <= r.at < end), key=lambda r: (r.at, r.gtrid))

    def horizon(self, node: str) -> float:
        return self._every_retained(node).horizon

    def log_switches(self) -> tuple[float, ...]:
        return ()

    def timelines(self) -> TimelineStore:
        return FileTimelines(self.directory)

    def pending(self, node: str, owner: OwnerState) -> Mapping[str, LogRecord]:
        if owner == "this-process" and self._own_pending is not None:
            return self._own_pending()
        if owner == "unknown":
            return {}
        try:
            return read_log(Path(self.directory) / node).pending
        except OSError as e:
            raise XatmError(f"cannot read the log of node {node!r}: {e}") from None

    def every_pending(
        self, node_pending: Callable[[str], Mapping[str, LogRecord]]
    ) -> list[Mapping[str, LogRecord]]:
        return [node_pending(node) for node in self.nodes()]

    def aborted(self, gtrid: str) -> bool:
        return False  # a file log records no ABORT: presumed abort

    def marker_resources(self, node: str) -> frozenset[str] | None:
        return _node_markers.read(Path(self.directory) / node)

    def incarnations(self, node: str) -> frozenset[str] | None:
        return _incarnations.read(Path(self.directory) / node)

    def audit(self, gtrid: str | None = None) -> list[AuditEntry]:
        return read_audit(self.directory, gtrid)

    def nodes(self) -> list[str]:
        return list_nodes(Path(self.directory))

    def read(self, node: str, *, strict: bool = True, every: bool = False) -> LogSnapshot:
        return read_log(Path(self.directory) / node, strict=strict, every=every)

    @contextlib.contextmanager
    def take_over(
        self, node: str, wait: float, *, keep_ended: bool = True
    ) -> Iterator[CoordinatorLog]:
        if keep_ended:
            log = FileLog(Path(self.directory), node, lock_timeout=wait)
        else:
            log = FileLog(Path(self.directory), node, lock_timeout=wait, retain=0.0)
        try:
            yield log
        finally:
            log.close()

    @contextlib.contextmanager
    def open_for_decision(self, node: str, owner: OwnerState, wait: float) -> Iterator[OpenedLog]:
        if owner == "this-process":
            yield _FileOpened(self._own_log, None)
        elif owner == "dead":
            with self.take_over(node, wait) as log:
                yield _FileOpened(log, None)
        else:
            unlocked = None
            if owner == "alive":
                unlocked = Path(self.directory) / node  # read without its owner's lock
            yield _FileOpened(None, unlocked)


class _SharedOpened:
    """The shared log opened for a decision: any process may write it."""

    def __init__(self, log: PostgresLog) -> None:
        self._log = log

    @property
    def log(self) -> CoordinatorLog:
        return self._log

    def decision(self, gtrid: str) -> Found:
        found = self._log.decisions([gtrid]).get(gtrid)
        if found is None or isinstance(found, LogRecord):
            return found
        return "A"

    def fence_abort(self, gtrid: str, by: str) -> AbortAnswer | None:
        return self._log.log_abort(gtrid, by=by)


class SharedLogs:
    """The shared PostgreSQL log (``xatm.log.shared``): every node's decisions in one table; a
    node is alive while a session holds its node lock. ``own_node`` is this process's."""

    shared = True

    def __init__(self, log: PostgresLog, *, own_node: str | None = None) -> None:
        self._log = log
        self._own_node = own_node

    def owner(self, node: str) -> OwnerState:
        if node == self._own_node:
            return "this-process"
        return "alive" if self._log.node_alive(node) else "dead"

    def pending(self, node: str, owner: OwnerState) -> Mapping[str, LogRecord]:
        return dict(self._log.pending(all_nodes=True))

    def every_pending(
        self, node_pending: Callable[[str], Mapping[str, LogRecord]]
    ) -> list[Mapping[str, LogRecord]]:
        return [dict(self._log.pending(all_nodes=True))]

    def aborted(self, gtrid: str) -> bool:
        return bool(self._log.decisions([gtrid]).get(gtrid) == "A")

    def retained(self, node: str, gtrid: str) -> LogRecord | None:
        found = self._log.decisions([gtrid]).get(gtrid)  # ended rows stay until pruned
        return found if isinstance(found, LogRecord) else None

    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]:
        return self._log.decided_between(node, start, end)

    def horizon(self, node: str) -> float:
        return self._log.horizon()

    def log_switches(self) -> tuple[float, ...]:
        return self._log.log_switches()

    def timelines(self) -> TimelineStore:
        return SharedTimelines(self._log)

    def marker_resources(self, node: str) -> frozenset[str] | None:
        return None  # commit markers cannot be combined with the shared log

    def incarnations(self, node: str) -> frozenset[str] | None:
        return None  # a presumed abort is a fenced ABORT write here

    def audit(self, gtrid: str | None = None) -> list[AuditEntry]:
        return list(self._log.read_audit(gtrid))

    def nodes(self) -> list[str]:
        return []  # the decisions are rows of one table, not files per node

    def read(self, node: str, *, strict: bool = True, every: bool = False) -> LogSnapshot:
        return LogSnapshot({}, ())

    @contextlib.contextmanager
    def take_over(
        self, node: str, wait: float, *, keep_ended: bool = True
    ) -> Iterator[CoordinatorLog]:
        yield self._log  # nothing to take over: any process writes the table

    @contextlib.contextmanager
    def open_for_decision(self, node: str, owner: OwnerState, wait: float) -> Iterator[OpenedLog]:
        yield _SharedOpened(self._log)
