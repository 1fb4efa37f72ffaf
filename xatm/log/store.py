"""Where a node keeps its durable state: one store, chosen once from the configuration.

The configuration's ``log`` is a directory (files) or a PostgreSQL URL (the shared log); it is
read once, here (:func:`open_store` for a manager's checked arguments, :func:`store_from_setting`
for an operator's config value), and the :class:`Store` it gives serves everything a node keeps
durably, so that nothing above asks which kind it is:

* the coordinator log (:meth:`Store.open_log`);
* the audit trail (:meth:`Store.audit_trail`), the saga records (:meth:`Store.saga_store`,
  ``xatm.log.saga_state``) and the nodes' records of their resources' timelines
  (:meth:`Store.timelines`, ``xatm.log.timelines``);
* the logs as operators read them (:meth:`Store.view`, ``xatm.log.view``: who owns a node, its
  pending decisions, ...), as a recovery pass reads and writes them (:meth:`Store.fleet`,
  ``xatm.log.fleet``), every node's pending decisions (:meth:`Store.read_pending`, the backlog)
  and the nodes whose logs are kept as files (:meth:`Store.nodes`);
* each node's side files (:meth:`Store.record_node`: its commit-marker resources and its
  incarnations, ``xatm.log.node_markers``, ``xatm.log.incarnations``) and the retirement of dead
  nodes' finished logs (:meth:`Store.retire_logs`, ``xatm.log.file.retention``): the shared log
  keeps no files, so it records and retires none;
* :meth:`Store.describe`: the directory or the redacted URL, for messages.

:class:`FileStore` is a directory of node logs. :class:`PostgresStore` is the shared log's
database: a manager's store opens the ``PostgresLog`` as its coordinator log (holding the node's
lock) and reads and writes everything else through it; an operator's store, which has no
coordinator log of its own, opens one on first use without taking any node's lock, and closes
it in :meth:`Store.close`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from xatm.core.records import LogRecord
from xatm.core.urls import ResourceSpec, log_is_shared, redact
from xatm.core.xid import parse_gtrid
from xatm.log import incarnations as _incarnations
from xatm.log import node_markers as _node_markers
from xatm.log.audit import Audit, AuditTrail, SharedAuditTrail
from xatm.log.base import CoordinatorLog
from xatm.log.file import DEFAULT_RETAIN, DEFAULT_SEGMENT_BYTES, FileLog, list_nodes
from xatm.log.file import retention as _retention
from xatm.log.fleet import FileFleet, Fleet, SharedFleet
from xatm.log.saga_state import FileSagaStore, PostgresSagaStore, SagaStore
from xatm.log.shared import PostgresLog
from xatm.log.timelines import FileTimelines, SharedTimelines, TimelineStore
from xatm.log.view import FileLogs, LogView, SharedLogs

#: what the backlog reads: every node's pending COMMIT records, and why this node's own log
#: cannot be read (None: it can)
Pending = tuple[dict[str, Mapping[str, LogRecord]], str | None]


class Store(Protocol):
    """Everything a node keeps durably (see the module docstring)."""

    def describe(self) -> str:
        """The log directory, or the shared log's URL with its password hidden."""
        ...

    def open_log(
        self,
        node_id: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        lock_timeout: float = 30.0,
        retain: float = DEFAULT_RETAIN,
    ) -> CoordinatorLog:
        """``node_id``'s coordinator log, opened (its lock held) for a manager; the caller
        closes it. ``segment_bytes`` and ``lock_timeout`` are a file log's."""
        ...

    def audit_trail(self, node_id: str) -> Audit:
        """Where this process (``node_id``) appends its audit entries."""
        ...

    def saga_store(self, node_id: str) -> SagaStore:
        """The saga records (``node_id``: the process that claims and writes them)."""
        ...

    def view(
        self,
        *,
        own_node: str | None = None,
        own_log: CoordinatorLog | None = None,
        own_pending: Callable[[], Mapping[str, LogRecord]] | None = None,
    ) -> LogView:
        """The logs as operators' code reads them; ``own_node`` is this process's node, whose
        log is ``own_log`` and whose pending decisions ``own_pending`` gives."""
        ...

    def fleet(
        self,
        *,
        own_node: str,
        own_log: CoordinatorLog,
        own_incarnations: frozenset[str] | None,
        retain: float,
        dry_run: bool,
    ) -> Fleet:
        """The logs as one recovery pass reads and writes them (``xatm.log.fleet``)."""
        ...

    def read_pending(self, own_node: str, own_log: CoordinatorLog) -> Pending:
        """Every node's pending COMMIT records as the logs hold them now (this node's from
        ``own_log``), and why this node's own log cannot be read (None: it can)."""
        ...

    def nodes(self) -> list[str]:
        """The nodes whose logs are kept as files here (none for the shared log; nothing is
        opened to tell)."""
        ...

    def timelines(self) -> TimelineStore:
        """Where the nodes' records of their resources' timelines are kept."""
        ...

    def record_node(
        self, node_id: str, *, markers: Iterable[str], incarnation: str
    ) -> frozenset[str] | None:
        """Record, in ``node_id``'s side files, its commit-marker resources and (its log's
        lock held) this process's ``incarnation``; return the incarnations its log lists.
        None: the store keeps no side files (the shared log, where a presumed abort is fenced
        and needs no such proof)."""
        ...

    def retire_logs(
        self,
        retention: float,
        *,
        own_node: str,
        prepared_nodes: Callable[[], set[str] | None],
        audit: Callable[[str, str], object],
        dry_run: bool = False,
        now: float | None = None,
    ) -> list[_retention.Retirement]:
        """Remove the finished logs of nodes dead for ``retention`` seconds
        (``xatm.log.file.retention``); the shared log keeps no files: none."""
        ...

    def close(self) -> None:
        """Close what the store opened itself (not the coordinator log it gave out)."""
        ...


class FileStore:
    """A directory: ``<log>/<node_id>/`` per node (its log and side files), ``audit.d/``,
    ``sagas.d/``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = str(directory)

    def describe(self) -> str:
        return self.directory

    def open_log(
        self,
        node_id: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        lock_timeout: float = 30.0,
        retain: float = DEFAULT_RETAIN,
    ) -> CoordinatorLog:
        return FileLog(
            self.directory,
            node_id,
            segment_bytes=segment_bytes,
            lock_timeout=lock_timeout,
            retain=retain,
        )

    def audit_trail(self, node_id: str) -> Audit:
        return AuditTrail(self.directory, node_id)

    def saga_store(self, node_id: str) -> SagaStore:
        return FileSagaStore(self.directory)

    def view(
        self,
        *,
        own_node: str | None = None,
        own_log: CoordinatorLog | None = None,
        own_pending: Callable[[], Mapping[str, LogRecord]] | None = None,
    ) -> LogView:
        return FileLogs(self.directory, own_node=own_node, own_log=own_log, own_pending=own_pending)

    def fleet(
        self,
        *,
        own_node: str,
        own_log: CoordinatorLog,
        own_incarnations: frozenset[str] | None,
        retain: float,
        dry_run: bool,
    ) -> Fleet:
        return FileFleet(
            self.directory,
            own_node=own_node,
            own_log=own_log,
            own_incarnations=own_incarnations,
            retain=retain,
            dry_run=dry_run,
        )

    def read_pending(self, own_node: str, own_log: CoordinatorLog) -> Pending:
        out: dict[str, Mapping[str, LogRecord]] = {}
        failed: str | None = None
        try:
            out[own_node] = dict(own_log.pending())
        except Exception as e:
            failed = f"{type(e).__name__}: {e}"
        view = FileLogs(self.directory)
        for node in view.nodes():
            if node == own_node:
                continue
            try:
                out[node] = view.read(node, strict=False).pending
            except Exception:
                continue  # a log being rewritten or removed: the next scrape reads it
        return out, failed

    def nodes(self) -> list[str]:
        return list_nodes(Path(self.directory))

    def timelines(self) -> TimelineStore:
        return FileTimelines(self.directory)

    def record_node(
        self, node_id: str, *, markers: Iterable[str], incarnation: str
    ) -> frozenset[str] | None:
        node_dir = Path(self.directory) / node_id
        # before any transaction can use a marker, say where its rows may be
        _node_markers.record(node_dir, markers)
        # and, holding the log's lock, that this process's gtrids are this log's
        _incarnations.record(node_dir, incarnation)
        return _incarnations.read(node_dir)

    def retire_logs(
        self,
        retention: float,
        *,
        own_node: str,
        prepared_nodes: Callable[[], set[str] | None],
        audit: Callable[[str, str], object],
        dry_run: bool = False,
        now: float | None = None,
    ) -> list[_retention.Retirement]:
        return _retention.retire_logs(
            self.directory,
            retention,
            own_node=own_node,
            prepared_nodes=prepared_nodes,
            audit=audit,
            dry_run=dry_run,
            now=now,
        )

    def close(self) -> None:
        pass


class PostgresStore:
    """The shared log's database (``xatm.log.shared``), at ``url``, as node ``node_id`` sees it.

    ``url`` is kept as given (a text URL is parsed when the log is opened, so a malformed one
    fails there, as a doctor's check or the first read)."""

    def __init__(self, url: str | ResourceSpec, node_id: str) -> None:
        self.url = url
        self.node_id = node_id
        self._log: PostgresLog | None = None
        self._owned = False  # the log was opened here for reading (an operator's store)

    def describe(self) -> str:
        return self.url.redacted() if isinstance(self.url, ResourceSpec) else redact(self.url)

    @property
    def log(self) -> PostgresLog:
        """The manager's coordinator log once :meth:`open_log` opened it; else one opened
        here on first use, without any node's lock (closed by :meth:`close`)."""
        if self._log is None:
            self._log = PostgresLog(self.url, self.node_id, hold_node_lock=False)
            self._owned = True
        return self._log

    def open_log(
        self,
        node_id: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        lock_timeout: float = 30.0,
        retain: float = DEFAULT_RETAIN,
    ) -> CoordinatorLog:
        self.close()
        self._log = PostgresLog(self.url, node_id)  # holds node_id's lock while it is open
        return self._log

    def audit_trail(self, node_id: str) -> Audit:
        return SharedAuditTrail(self.log, node_id)

    def saga_store(self, node_id: str) -> SagaStore:
        return PostgresSagaStore(self.log, node_id)

    def view(
        self,
        *,
        own_node: str | None = None,
        own_log: CoordinatorLog | None = None,
        own_pending: Callable[[], Mapping[str, LogRecord]] | None = None,
    ) -> LogView:
        return SharedLogs(self.log, own_node=own_node)

    def fleet(
        self,
        *,
        own_node: str,
        own_log: CoordinatorLog,
        own_incarnations: frozenset[str] | None,
        retain: float,
        dry_run: bool,
    ) -> Fleet:
        return SharedFleet(self.log, dry_run=dry_run, retain=retain)

    def read_pending(self, own_node: str, own_log: CoordinatorLog) -> Pending:
        try:
            every = self.log.pending(all_nodes=True)
        except Exception as e:
            return {}, f"{type(e).__name__}: {e}"
        grouped: dict[str, dict[str, LogRecord]] = {}
        for gtrid, rec in every.items():
            try:
                node = parse_gtrid(gtrid)[0]
            except ValueError:
                node = own_node
            grouped.setdefault(node, {})[gtrid] = rec
        return dict(grouped), None

    def nodes(self) -> list[str]:
        return []  # the decisions are rows of one table, not files per node

    def timelines(self) -> TimelineStore:
        return SharedTimelines(self.log)

    def record_node(
        self, node_id: str, *, markers: Iterable[str], incarnation: str
    ) -> frozenset[str] | None:
        return None  # no side files: no commit markers with it, and a presumed abort is fenced

    def retire_logs(
        self,
        retention: float,
        *,
        own_node: str,
        prepared_nodes: Callable[[], set[str] | None],
        audit: Callable[[str, str], object],
        dry_run: bool = False,
        now: float | None = None,
    ) -> list[_retention.Retirement]:
        return []  # no log files to retire: ended decisions are pruned by recovery passes

    def close(self) -> None:
        if self._owned and self._log is not None:
            self._log.close()
        if self._owned:
            self._log, self._owned = None, False


def open_store(
    *, log_directory: str | None, log_spec: str | ResourceSpec | None, node_id: str
) -> Store:
    """The store of a manager's checked arguments (``xatm.coordinator.arguments``): the
    directory, else the shared log at ``log_spec``; opens nothing."""
    if log_directory is not None:
        return FileStore(log_directory)
    assert log_spec is not None
    return PostgresStore(log_spec, node_id)


def store_from_setting(log: str | os.PathLike[str], node_id: str) -> Store:
    """The store of a configuration's ``log`` as an operator's tools read it (a URL, or a
    directory taken as it is), for node ``node_id``; opens nothing."""
    if log_is_shared(log):
        return PostgresStore(str(log), node_id)
    return FileStore(log)


# -- what the public attributes and the doctor's two checks still name ----------------------
def directory_of(store: Store) -> str | None:
    """The log directory (``tm.log_directory``); None with the shared log."""
    return store.directory if isinstance(store, FileStore) else None


def shared_log_of(store: Store) -> PostgresLog | None:
    """The shared log (``tm.shared_log``; an operator's is opened here on first use); None
    with a file log."""
    return store.log if isinstance(store, PostgresStore) else None


def shared_url_of(store: Store) -> str | ResourceSpec | None:
    """The shared log's URL, not opened (the doctor checks it); None with a file log."""
    return store.url if isinstance(store, PostgresStore) else None
