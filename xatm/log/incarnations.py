"""The processes a node's file log has hosted: its incarnations, in ``<log>/<node>/incarnations``.

Every manager names itself with a fresh random incarnation, carried in each gtrid it makes
(``xatm.core.xid.incarnation_of``). A manager opening a file log appends its incarnation here,
durably, before it makes any transaction, while it holds the log's lock (``xatm.log.file``).
So whoever holds that lock later knows: an incarnation listed here belonged to a process that
held this log and has ended (the lock is exclusive and dies with its process); its decisions
are in this log, and presumed abort may be applied to its undecided branches. A gtrid of this
node whose incarnation is *not* listed was made by a process that never held this log: a
second process with the same node_id and another log directory. Nothing here can tell what it
decided, so recovery leaves its branches (``xatm.core.decide``, owner ``stranger``).

The file keeps the newest :data:`KEEP` incarnations (compacted when it holds twice as many).
An incarnation dropped from it only makes its branches, if any were still prepared, count as
a stranger's: left in doubt, never presumed aborted. That is the safe side.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from xatm.log.file import fsync_dir

FILE = "incarnations"
#: incarnations kept in the file (one line each, about 25 bytes)
KEEP = 4096
_LINE_RE = re.compile(r"([0-9a-f]{10}) [0-9]+")


def read(node_dir: Path) -> frozenset[str] | None:
    """The incarnations that held this node's log, or None if none was ever recorded (a log
    of xatm 0.2, or no log at all)."""
    try:
        text = (node_dir / FILE).read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return frozenset()  # unreadable: nothing is known (strangers: left in doubt)
    found = (_LINE_RE.fullmatch(line.strip()) for line in text.splitlines())
    return frozenset(m.group(1) for m in found if m is not None)


def record(node_dir: Path, incarnation: str) -> None:
    """Append ``incarnation`` (durably: the file and the directory are fsynced). The caller
    holds the node's log lock."""
    path = node_dir / FILE
    line = f"{incarnation} {int(time.time())}\n".encode("ascii")
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        lines = []
    if len(lines) >= 2 * KEEP:
        tmp = node_dir / f"{FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join([*lines[-KEEP:], line]))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(node_dir)
        return
    if lines and not lines[-1].endswith(b"\n"):
        line = b"\n" + line  # after a torn append: never glue this line to its remains
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not lines:
        fsync_dir(node_dir)
