"""Where a node's commit-marker decision rows may be: recorded in its log directory.

A transaction whose gtrid carries the marker flag may keep its COMMIT decision as a row in
one of its coordinator's ``commit_markers`` resources instead of the log. Presumed abort for
such a transaction is only safe once every resource that may hold the row has been read. The
recoverer may not share the coordinator's configuration (a peer with another resource set),
so the coordinator records the names in ``<log>/<node_id>/markers`` when it opens its log: the
union of every ``commit_markers`` it was ever started with, one name per line, written
atomically and fsynced before any transaction of the node can use a marker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from xatm.log.file import fsync_dir

FILE = "markers"


def read(node_dir: Path) -> frozenset[str] | None:
    """The recorded marker resources of a node, or None if none were ever recorded."""
    try:
        text = (node_dir / FILE).read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return frozenset()  # unreadable: callers treat an empty set as "cannot tell"
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def record(node_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the node's recorded marker resources (durably)."""
    wanted = set(names)
    if not wanted:
        return
    known = read(node_dir) or frozenset()
    if wanted <= known:
        return
    tmp = node_dir / f"{FILE}.tmp"
    data = "".join(f"{n}\n" for n in sorted(wanted | known)).encode("ascii")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, node_dir / FILE)
    fsync_dir(node_dir)
