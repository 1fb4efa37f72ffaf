"""Retention of file logs: the finished log of a node gone for good is removed after a while.

A service whose node_id changes per process (a worker number, a pid) leaves one log folder
per process, and every ``xatm`` command that acts leaves its own (``<node>-cli``); without
retention ``xatm log`` lists them for ever. A node's folder is removed when all of these
hold, checked in this order, holding the node's log lock for the last ones:

* it is not this process's own node, and nothing in it was written for ``retention``
  seconds;
* its coordinator is dead (its log lock is free: taken here without waiting);
* its log is readable and holds no pending decision (every COMMIT has its END);
* no resource holds a prepared branch of that node, and every resource could be asked
  (a branch without a decision is rolled back by recovery only while the node's log lists
  the process that made it).

The folder is first renamed (``.retired-<node>-<time>``, which no one lists or opens) and
then deleted; its audit file (``audit.d/<node>.jsonl``) is kept. Each removal is an audit
entry (action ``retire``) of the process that did it, and a log line at INFO.

A sweeper asks for it through its node's store (``xatm.log.store``: a shared log keeps no
files, so it retires none); ``xatm.recovery.retention`` re-exports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xatm.core.logfields import log_fields
from xatm.errors import LogError
from xatm.log.file.reader import read_log
from xatm.log.file.segments import list_nodes

logger = logging.getLogger("xatm.retention")

#: seconds a dead node's finished log is kept (7 days); 0 keeps every log
DEFAULT_LOG_RETENTION = 7 * 86400.0
#: seconds between two looks at the log directory by a sweeper
RETIRE_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class Retirement:
    """What became of one candidate log (one not written for the retention period)."""

    node: str
    last_write: float  # seconds since the epoch
    removed: bool
    reason: str  # why it was kept, or what was removed


def last_write(node_dir: Path) -> float:
    """The newest modification time in ``node_dir`` (the folder and its files)."""
    newest = node_dir.stat().st_mtime
    for child in node_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, child.lstat().st_mtime)
    return newest


def _lock(node_dir: Path) -> int | None:
    """The node's log lock, taken without waiting; None if its coordinator holds it."""
    fd = os.open(node_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def retire_logs(
    directory: str | os.PathLike[str],
    retention: float,
    *,
    own_node: str,
    prepared_nodes: Callable[[], set[str] | None],
    audit: Callable[[str, str], object],
    dry_run: bool = False,
    now: float | None = None,
) -> list[Retirement]:
    """Remove the logs under ``directory`` that the rules of this module allow.

    ``prepared_nodes()``: the node_ids with a branch prepared on some resource, or None if
    a resource could not be asked (then nothing is removed); called once, and only if a log
    got that far. ``audit(reason, outcome)`` records one removal. ``dry_run``: decide,
    remove nothing."""
    if retention <= 0:
        return []
    base = Path(directory)
    now = time.time() if now is None else now
    out: list[Retirement] = []
    asked: list[set[str] | None] = []
    for grave in base.glob(".retired-*"):  # a removal a crash interrupted
        shutil.rmtree(grave, ignore_errors=True)
    for node in list_nodes(base):
        node_dir = base / node
        if node == own_node:
            continue
        try:
            written = last_write(node_dir)
        except FileNotFoundError:
            continue
        if now - written < retention:
            continue

        def keep(why: str, node: str = node, written: float = written) -> None:
            out.append(Retirement(node, written, False, why))

        try:
            fd = _lock(node_dir)
        except OSError as e:
            keep(f"its log lock cannot be taken: {e.strerror or e}")
            continue
        if fd is None:
            keep("its coordinator is alive")
            continue
        try:
            try:
                pending = len(read_log(node_dir).pending)
            except (LogError, OSError) as e:
                keep(f"its log cannot be read: {e}")
                continue
            if pending:
                keep(f"{pending} pending decision(s)")
                continue
            if not asked:
                asked.append(prepared_nodes())
            found = asked[0]
            if found is None:
                keep("a resource could not be asked for its prepared branches")
                continue
            if node in found:
                keep("a branch of it is still prepared")
                continue
            days = (now - written) / 86400.0
            what = (
                f"log of dead node {node!r} removed: settled, last written {days:.1f} day(s)"
                f" ago (retention {retention / 86400.0:g} day(s))"
            )
            if dry_run:
                out.append(Retirement(node, written, False, "would be removed"))
                continue
            grave = base / f".retired-{node}-{int(now)}"
            os.rename(node_dir, grave)  # nobody lists or opens it from here on
        finally:
            os.close(fd)
        shutil.rmtree(grave, ignore_errors=True)
        audit(what, "removed")
        logger.info("retention: %s", what, extra=log_fields(own_node))
        out.append(Retirement(node, written, True, what))
    return out
