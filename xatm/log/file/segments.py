"""A node's log directory on disk: segment files and their names, the ``horizon`` and
``carried`` files, writing at an offset, and deleting segments out of the retention window
(``xatm.log.file`` describes the layout)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from xatm.core.xid import validate_node_id

logger = logging.getLogger("xatm.log")

MAGIC = b"XATMLOG1\n"
SEGMENT_GLOB = "seg-*.xlog"
DEFAULT_SEGMENT_BYTES = 8 << 20
#: seconds ended COMMIT decisions are kept on disk (segments are deleted only once older)
DEFAULT_RETAIN = 300.0
#: the file holding a node log's horizon: decisions older than it may have been deleted
HORIZON_FILE = "horizon"
#: the file naming the newest segment known to begin with every COMMIT pending when it was
#: started: replay starts there (the older segments hold only retained, ended decisions)
CARRIED_FILE = "carried"


def segment_name(number: int) -> str:
    return f"seg-{number:08d}.xlog"


def segment_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def segment_files(node_dir: Path) -> list[Path]:
    """The segment files of one node, oldest first (other names are not xatm's: ignored)."""
    found = [p for p in node_dir.glob(SEGMENT_GLOB) if p.stem[4:].isdecimal() and p.is_file()]
    return sorted(found, key=segment_number)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def sync_data(fd: int) -> None:
    """Make what was written to a segment durable: its data and what reading it back needs
    (its size, its blocks), not its timestamps, whose journal commit ``fsync`` would add to
    every forced write (``fdatasync``; ``fsync`` where there is none)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def preallocate(fd: int, size: int) -> None:
    """Reserve the segment's blocks up to ``size`` bytes (a file that does not grow makes
    each later fsync cheaper: no size to journal; measured in docs/benchmarks.md). Where
    the file system cannot (or the disk is too full), the segment grows as it is written,
    as it would without this."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        logger.debug("log segment not preallocated: %s", e)


def list_nodes(directory: Path) -> list[str]:
    """The node_ids that have a log under ``directory``."""
    if not directory.is_dir():
        return []
    nodes = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and (child / "lock").exists():
            try:
                nodes.append(validate_node_id(child.name))
            except ValueError:
                continue
    return nodes


def horizon(node_dir: Path) -> float:
    """The time (seconds since the epoch) since which every COMMIT decision of the node is
    on disk, ended or not: decisions older than that may have been deleted.

    Written before each deletion of segments (:func:`raise_horizon`). A log whose first
    segment is still there never deleted any (0.0); one without the file whose first
    segment is gone was trimmed by an older xatm: the oldest segment's last write is the
    safe answer then (anything decided later is in it or after it)."""
    try:
        return float((node_dir / HORIZON_FILE).read_text("ascii").strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError):
        return time.time()  # unreadable: nothing older can be vouched for
    paths = segment_files(node_dir)
    if not paths or segment_number(paths[0]) == 1:
        return 0.0
    try:
        return paths[0].stat().st_mtime
    except OSError:
        return time.time()


def write_small(node_dir: Path, name: str, text: str) -> None:
    """Replace the small file ``name`` of a node's log with ``text``, durably."""
    tmp = node_dir / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, node_dir / name)
    fsync_dir(node_dir)


def raise_horizon(node_dir: Path, at: float) -> None:
    """Make the horizon at least ``at``, durably (before what is older is deleted)."""
    if (node_dir / HORIZON_FILE).exists() and horizon(node_dir) >= at:
        return
    write_small(node_dir, HORIZON_FILE, f"{at:.6f}\n")


def carried_from(node_dir: Path) -> int:
    """The number of the newest segment known to begin with every COMMIT that was pending
    when it was started (:data:`CARRIED_FILE`, written once that segment was fsynced); 0
    when unknown: replay must then read every segment."""
    try:
        number = int((node_dir / CARRIED_FILE).read_text("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0
    return number if (node_dir / segment_name(number)).is_file() else 0


def trim_segments(
    node_dir: Path, keep_from: int, retain: float, reference: float | None = None
) -> None:
    """Delete the segments numbered below ``keep_from`` that were last written more than
    ``retain`` seconds before ``reference`` (default: now), oldest first, stopping at the
    first one still in the window (so what is kept is always a run of consecutive
    segments); the horizon is raised to the newest deleted segment's last write first."""
    cutoff = (time.time() if reference is None else reference) - retain
    if retain <= 0:
        cutoff = float("inf")  # nothing retained: every older segment goes
    doomed: list[Path] = []
    newest = 0.0
    for path in segment_files(node_dir):
        if segment_number(path) >= keep_from:
            break
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime >= cutoff:
            break
        doomed.append(path)
        newest = max(newest, mtime)
    if not doomed:
        return
    raise_horizon(node_dir, newest)
    for old in doomed:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    fsync_dir(node_dir)
