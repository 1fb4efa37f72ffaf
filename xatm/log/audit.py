"""The audit trail: one JSON line per action taken on an in-doubt branch.

Every commit, rollback, expiry, heuristic outcome found, decision record closed and manual
resolution is appended, with the time, the gtrid, the branch, its resource, the reason, the
outcome and the actor (``sweeper@api-1``, ``recover@api-1``, ``cli:alice``...). Layout::

    <log>/audit.d/<node_id>.jsonl     one file per process (node_id), mode 0600

The directory name holds a dot, which no node_id may, so it can never be mistaken for a
node's log. Each line is written with one ``write`` on an ``O_APPEND`` descriptor (so it
reaches the OS at once and lines of one file never interleave); it is not fsynced: the trail
is for people, the decision log is what recovery trusts. Readers skip lines they cannot parse.
With the shared log, the entries are rows of its ``audit`` table (:class:`SharedAuditTrail`).
The node's store (``xatm.log.store``) gives the trail of its kind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("xatm.audit")

AUDIT_DIR = "audit.d"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One action taken on a branch (or on a whole transaction: ``branch`` is then "")."""

    at: float  # seconds since the epoch
    gtrid: str
    resource: str
    branch: str
    action: str  # commit, rollback, expire, heuristic, end, refuse ...
    reason: str
    outcome: str
    actor: str
    node: str  # the node_id of the process that acted

    @property
    def time(self) -> str:
        """``at`` as an ISO 8601 UTC timestamp with milliseconds."""
        return format_time(self.at)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["time"] = self.time
        return body


def format_time(at: float) -> str:
    ms = round(at * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{ms:03d}Z"


class Audit(Protocol):
    """Where this process's audit entries go."""

    def record(
        self,
        gtrid: str,
        resource: str,
        branch: str,
        action: str,
        reason: str,
        outcome: str,
        actor: str,
    ) -> AuditEntry:
        """Append one entry; a failure to write is logged, never raised."""
        ...

    def close(self) -> None: ...


class AuditSink(Protocol):
    """A table that keeps audit entries (the shared log's, ``xatm.log.shared``)."""

    def audit(self, entry: AuditEntry) -> None: ...


class AuditTrail:
    """Appends this process's entries to ``<log>/audit.d/<node_id>.jsonl`` (file log)."""

    def __init__(self, log_directory: str | os.PathLike[str], node_id: str) -> None:
        self.directory = Path(log_directory) / AUDIT_DIR
        self.path = self.directory / f"{node_id}.jsonl"
        self.node_id = node_id
        self._lock = threading.Lock()
        self._fd = -1
        self._failed = False

    def record(
        self,
        gtrid: str,
        resource: str,
        branch: str,
        action: str,
        reason: str,
        outcome: str,
        actor: str,
    ) -> AuditEntry:
        """Append one entry; a failure to write is logged, never raised."""
        entry = AuditEntry(
            time.time(), gtrid, resource, branch, action, reason, outcome, actor, self.node_id
        )
        line = json.dumps(asdict(entry), separators=(",", ":"), sort_keys=True) + "\n"
        with self._lock:
            try:
                if self._fd < 0:
                    self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._fd = os.open(
                        self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                    )
                os.write(self._fd, line.encode("utf-8"))
                self._failed = False
            except OSError as e:
                if not self._failed:  # say it once per failure streak, not once per entry
                    logger.error("cannot write the audit trail %s: %s", self.path, e)
                self._failed = True
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1


class SharedAuditTrail:
    """Appends this process's entries to the shared log's ``audit`` table (``sink``)."""

    def __init__(self, sink: AuditSink, node_id: str) -> None:
        self.sink = sink
        self.node_id = node_id

    def record(
        self,
        gtrid: str,
        resource: str,
        branch: str,
        action: str,
        reason: str,
        outcome: str,
        actor: str,
    ) -> AuditEntry:
        """Append one entry (the sink logs a failure to write, never raises it)."""
        entry = AuditEntry(
            time.time(), gtrid, resource, branch, action, reason, outcome, actor, self.node_id
        )
        self.sink.audit(entry)
        return entry

    def close(self) -> None:
        pass


def read_audit(log_directory: str | os.PathLike[str], gtrid: str | None = None) -> list[AuditEntry]:
    """Every entry of every node's audit file (only those of ``gtrid`` if given), by time."""
    directory = Path(log_directory) / AUDIT_DIR
    if not directory.is_dir():
        return []
    entries: list[AuditEntry] = []
    for path in sorted(directory.glob("*.jsonl")):
        try:
            text = path.read_text("utf-8", errors="replace")
        except OSError as e:
            logger.warning("cannot read the audit trail %s: %s", path, e)
            continue
        for line in text.splitlines():
            entry = _parse(line)
            if entry is not None and (gtrid is None or entry.gtrid == gtrid):
                entries.append(entry)
    entries.sort(key=lambda e: e.at)
    return entries


def _parse(line: str) -> AuditEntry | None:
    try:
        body = json.loads(line)
        return AuditEntry(
            at=float(body["at"]),
            gtrid=str(body["gtrid"]),
            resource=str(body.get("resource", "")),
            branch=str(body.get("branch", "")),
            action=str(body["action"]),
            reason=str(body.get("reason", "")),
            outcome=str(body.get("outcome", "")),
            actor=str(body.get("actor", "")),
            node=str(body.get("node", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None
