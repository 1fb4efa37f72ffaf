"""Salvaging a dead node's damaged log: every good frame kept, the damage moved aside
(``xatm log salvage``)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from xatm.core.records import LogRecord, frame_at, next_good_frame
from xatm.core.xid import validate_node_id
from xatm.errors import LogError, LogLocked
from xatm.log.audit import AuditTrail
from xatm.log.file.scan import in_use, pending_of
from xatm.log.file.segments import (
    CARRIED_FILE,
    MAGIC,
    fsync_dir,
    raise_horizon,
    segment_files,
    segment_name,
    segment_number,
    write_small,
)

logger = logging.getLogger("xatm.log")


@dataclass(frozen=True, slots=True)
class Salvage:
    """What :func:`salvage` did to one node's log."""

    node: str
    kept: int  # pending COMMITs written to the new segment
    records: int  # good records read in all
    #: (segment name, start, end) of each run of bytes that could not be read
    damaged: tuple[tuple[str, int, int], ...]
    #: decision times of the last good record before and the first after each damaged run
    around: tuple[tuple[float | None, float | None], ...]
    moved_to: Path | None  # where the old segments went (None: the log was empty)


def salvage_log(
    directory: str | os.PathLike[str], node_id: str, *, actor: str, audit_node: str
) -> Salvage:
    """Rebuild a dead node's log from every good frame of its segments, skipping damage.

    Takes the node's lock (LogLocked if its coordinator is alive), reads every segment
    frame by frame and, past a bad frame, from the next good one; writes a new segment
    holding the pending COMMITs (fsynced), and only then moves the old segments into
    ``<node>/salvaged-<UTC time>/`` (kept for the operator, never read again by xatm). A
    COMMIT that was in a damaged run is lost: ``around`` says which decision times bound
    each run, so the operator can check the transactions of that window. The salvage is
    recorded in the audit trail (action ``salvage``, by ``actor``, as node ``audit_node``)."""
    node_dir = Path(directory) / validate_node_id(node_id)
    if not (node_dir / "lock").exists():
        raise LogError(f"no coordinator log of node_id {node_id!r} in {directory}")
    lock_fd = os.open(node_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LogLocked(
                f"the log of node_id {node_id!r} in {directory} is held by a live process:"
                " stop it first (a live coordinator never runs on a corrupt log)"
            ) from None
        done = _salvage_locked(node_dir, node_id)
    finally:
        os.close(lock_fd)  # releases the flock
    runs = ", ".join(f"{name} bytes {start}-{end}" for name, start, end in done.damaged)
    trail = AuditTrail(directory, audit_node)
    trail.record(
        "",
        "",
        "",
        "salvage",
        f"log of node {node_id}: {len(done.damaged)} damaged run(s){': ' if runs else ''}{runs}",
        f"kept {done.kept} pending decision(s) of {done.records} good record(s);"
        f" old segments moved to {done.moved_to}",
        actor,
    )
    trail.close()
    return done


def _salvage_locked(node_dir: Path, node_id: str) -> Salvage:
    paths = segment_files(node_dir)
    records: list[LogRecord] = []
    damaged: list[tuple[str, int, int]] = []
    around: list[tuple[float | None, float | None]] = []
    gaps: list[int] = []  # index into records where each damaged run was
    for path in paths:
        data = path.read_bytes()
        if path == paths[-1]:
            data = data[: in_use(data, 0)]  # the newest one's preallocated, unwritten tail
        if MAGIC.startswith(data):
            continue
        pos = len(MAGIC) if data.startswith(MAGIC) else 0
        while pos < len(data):
            frame = frame_at(data, pos)
            if frame is not None:
                records.append(frame[1])
                pos = frame[0]
                continue
            resumes = next_good_frame(data, pos)
            end = len(data) if resumes is None else resumes
            damaged.append((path.name, pos, end))
            gaps.append(len(records))
            pos = end
    for gap in gaps:
        before = next((r.at for r in reversed(records[:gap]) if r.kind == "COMMIT"), None)
        after = next((r.at for r in records[gap:] if r.kind == "COMMIT"), None)
        around.append((before, after))
    pending = pending_of(records)
    if not paths:
        return Salvage(node_id, 0, 0, (), (), None)
    number = segment_number(paths[-1]) + 1
    new = node_dir / segment_name(number)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, MAGIC + b"".join(r.encode() for r in pending.values()))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(node_dir)
    write_small(node_dir, CARRIED_FILE, f"{number}\n")
    raise_horizon(node_dir, time.time())  # only the pending decisions are kept
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    keep = node_dir / f"salvaged-{stamp}"
    keep.mkdir(mode=0o700)
    for path in paths:
        path.rename(keep / path.name)
    fsync_dir(keep)
    fsync_dir(node_dir)
    logger.warning(
        "salvaged the log of %s: kept %d pending decision(s) of %d good record(s);"
        " %d damaged run(s); old segments moved to %s",
        node_id,
        len(pending),
        len(records),
        len(damaged),
        keep,
    )
    return Salvage(node_id, len(pending), len(records), tuple(damaged), tuple(around), keep)
