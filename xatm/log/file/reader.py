"""Reading a node's log without its lock (inspection, recovery's look at peers): its
pending decisions and segments, and whether its owner is alive."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xatm.core.records import LogRecord
from xatm.errors import XatmError
from xatm.log.base import OwnerState
from xatm.log.file.scan import check, replay, scan_log
from xatm.log.file.segments import carried_from


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment file of a node's log."""

    name: str
    size: int
    records: int
    torn_bytes: int  # bytes after the last good record (a torn or corrupt tail)
    corrupt: str | None = None  # why those bytes are corruption, not a torn tail


@dataclass(frozen=True, slots=True)
class LogSnapshot:
    """A node's log as read from disk: its pending COMMIT records and its segments."""

    pending: Mapping[str, LogRecord]
    segments: tuple[SegmentInfo, ...]


def read_log(node_dir: Path, *, strict: bool = True, every: bool = False) -> LogSnapshot:
    """Read a node's segments without its lock (tolerates a concurrent rotation): those
    that hold its pending decisions, or with ``every`` all of them (the retained ones too).

    A corrupt segment raises LogCorrupt (``strict``), or is reported in its SegmentInfo."""
    for _attempt in range(5):
        try:
            return _read_log_once(node_dir, strict, every)
        except FileNotFoundError:
            continue  # a segment was rotated away while we read: read again
    return _read_log_once(node_dir, strict, every)


def _read_log_once(node_dir: Path, strict: bool, every: bool) -> LogSnapshot:
    if not node_dir.is_dir():
        return LogSnapshot({}, ())
    scans = scan_log(node_dir, since=0 if every else carried_from(node_dir))
    if strict:
        check(scans)  # LogCorrupt: the decisions after the damage are unknown
    segments = tuple(
        SegmentInfo(s.path.name, s.size, len(s.records), s.size - s.good, s.corrupt) for s in scans
    )
    return LogSnapshot(replay(scans), segments)


def owner_state(log_directory: str | os.PathLike[str], node: str) -> OwnerState:
    """Is the coordinator of ``node`` alive? Probes its log's lock without waiting.

    "unknown" when ``node`` has no log in ``log_directory``. The probe holds the lock for
    an instant only; a coordinator starting at that very moment waits for it (it polls).
    A log held by *this* process through another descriptor also reads as "alive".
    """
    lock = Path(log_directory) / node / "lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "unknown"
    except OSError as e:
        raise XatmError(f"cannot read the log lock {lock}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return "alive"
            raise XatmError(f"cannot probe the log lock {lock}: {e.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "dead"
    finally:
        os.close(fd)
