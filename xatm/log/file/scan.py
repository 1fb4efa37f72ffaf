"""Reading a node's segments: each one up to its first bad frame, a torn tail told from
corruption, the pending decisions replayed, and the decisions still retained."""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from xatm.core.records import HEADER, MAX_PAYLOAD, LogRecord, next_good_frame, read_frames
from xatm.errors import LogCorrupt
from xatm.log.file.segments import (
    MAGIC,
    carried_from,
    horizon,
    segment_files,
    segment_number,
)

logger = logging.getLogger("xatm.log")


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """One segment file as read from disk, up to its first bad frame."""

    path: Path
    size: int  # bytes in use: the file's size less a never written preallocated tail
    records: tuple[LogRecord, ...]  # the good records before the first bad frame
    good: int  # where the readable part ends (``size`` when every frame is good)
    #: why the bytes from ``good`` on are corruption, not a torn tail (None: clean or torn)
    corrupt: str | None = None
    #: bytes of preallocated space after ``size`` that were never written (zeros; the
    #: newest segment of a live log only)
    unused: int = 0

    @property
    def torn(self) -> int:
        """Bytes ignored as a torn tail (0 when the segment is clean or corrupt)."""
        return 0 if self.corrupt is not None else self.size - self.good


def _damage(data: bytes, good: int, newest: bool) -> str | None:
    """None if the bytes from ``good`` on can be a tail torn by a crash, else what makes
    them corruption.

    A crash tears only the last write, which is at the end of the newest segment, and what
    it leaves is short (the file ends inside a frame) or zero-filled (blocks allocated but
    never written). So a bad frame is corruption when it is in an older segment, when a good
    frame follows it, or when it is complete (its length fits in the file), holds no zero
    byte and still fails its CRC (a flipped bit) or passes its CRC but is no record."""
    if not newest:
        return "a bad frame in a segment that is not the newest (a crash tears only the newest)"
    resumes = next_good_frame(data, good)
    if resumes is not None:
        return f"a bad frame followed by good frames (the next one at offset {resumes})"
    if good >= len(MAGIC) and good + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, good)
        payload = data[good + HEADER.size : good + HEADER.size + length]
        if 0 < length <= MAX_PAYLOAD and len(payload) == length and b"\0" not in payload:
            if zlib.crc32(payload) == crc:
                return "a frame whose checksum is right but whose payload is not a record"
            return "a complete frame with a wrong checksum (a torn write leaves no such frame)"
    return None


def in_use(data: bytes, good: int) -> int:
    """Where the written part of a segment's bytes ends: after the last non-zero byte, and
    not before ``good`` (a frame's last byte is never zero: its payload ends with ``}``).
    The zeros after it are preallocated space never written (:meth:`FileLog._start_segment`)."""
    return max(good, len(data.rstrip(b"\0")))


def scan_segment(path: Path, *, newest: bool) -> SegmentScan:
    """Read one segment; ``newest``: it is the last one (the only one a crash can tear,
    and the only one that may end in preallocated, never written space)."""
    data = path.read_bytes()
    if MAGIC.startswith(data):
        return SegmentScan(path, len(data), (), len(data))  # torn while being created: empty
    records: list[LogRecord] = []
    good = 0
    if data.startswith(MAGIC):
        good = len(MAGIC)
        for end, record in read_frames(data, good):
            records.append(record)
            good = end
    # An older segment was cut to its written length before a newer one began, so zeros at
    # its end are damage like any other bad bytes.
    used = in_use(data, good) if newest else len(data)
    corrupt = None if good == used else _damage(data, good, newest)
    return SegmentScan(path, used, tuple(records), good, corrupt, len(data) - used)


def scan_log(node_dir: Path, *, since: int = 0) -> list[SegmentScan]:
    """Read the segments of one node's log numbered ``since`` or more, oldest first."""
    paths = segment_files(node_dir)
    return [
        scan_segment(p, newest=i == len(paths) - 1)
        for i, p in enumerate(paths)
        if segment_number(p) >= since
    ]


def replay(scans: Sequence[SegmentScan]) -> dict[str, LogRecord]:
    """The pending COMMITs (no later END) of the records of ``scans``, in order."""
    return pending_of(r for scan in scans for r in scan.records)


def pending_of(records: Iterable[LogRecord]) -> dict[str, LogRecord]:
    pending: dict[str, LogRecord] = {}
    for record in records:
        if record.kind == "COMMIT":
            pending[record.gtrid] = record
        else:
            pending.pop(record.gtrid, None)
    return pending


def check(scans: Sequence[SegmentScan]) -> None:
    """Raise LogCorrupt for the first corrupt segment of ``scans``."""
    for scan in scans:
        if scan.corrupt is not None:
            raise LogCorrupt(
                f"the coordinator log is corrupt: {scan.path} at offset {scan.good}:"
                f" {scan.corrupt}. The records from there on may hold COMMIT decisions, so"
                " this log is not used and the file is left as it is; `xatm log` shows the"
                " damage and `xatm log salvage` keeps every readable record (see"
                " docs/operations.md, 'A corrupt coordinator log')",
                path=str(scan.path),
                offset=scan.good,
            )


def checked_scans(node_dir: Path) -> list[SegmentScan]:
    """The segments of one node that hold its pending decisions (from the newest one known
    to begin with every pending COMMIT, :func:`carried_from`), read; LogCorrupt if one is
    damaged anywhere but in a torn tail of the newest (a torn tail is logged and ignored).
    The older segments hold only ended decisions kept for the retention window: they are
    not read when a log is opened."""
    scans = scan_log(node_dir, since=carried_from(node_dir))
    check(scans)
    for scan in scans:
        if scan.torn:
            logger.warning(
                "log segment %s: ignoring %d bytes of torn tail after offset %d",
                scan.path,
                scan.torn,
                scan.good,
            )
    return scans


def read_segments(node_dir: Path) -> tuple[dict[str, LogRecord], list[tuple[Path, int, bool]]]:
    """Replay every segment of one node: (pending COMMITs, [(segment, size, torn)]).

    Raises LogCorrupt if a segment is damaged anywhere but in a torn tail of the newest."""
    scans = checked_scans(node_dir)
    return replay(scans), [(s.path, s.size, s.torn > 0) for s in scans]


@dataclass(frozen=True, slots=True)
class Retained:
    """A node's COMMIT decisions still on disk, and since when all of them are."""

    decisions: Mapping[str, LogRecord]
    horizon: float


def retained_decisions(node_dir: Path) -> Retained:
    """Every COMMIT decision still on disk in the node's segments, pending or ended (the
    last copy of each), read without the log's lock (every segment: this is only asked
    after a failover). A damaged segment is read up to its damage, and the horizon is
    moved past its last write (what followed the damage is unknown)."""
    for _attempt in range(5):
        try:
            scans = scan_log(node_dir)
            break
        except FileNotFoundError:
            continue  # a segment was trimmed while we read: read again
    else:
        scans = scan_log(node_dir)
    out: dict[str, LogRecord] = {}
    since = horizon(node_dir)
    for scan in scans:
        if scan.corrupt is not None:
            with contextlib.suppress(OSError):
                since = max(since, scan.path.stat().st_mtime)
        for record in scan.records:
            if record.kind == "COMMIT":
                out[record.gtrid] = record
            elif record.kind == "ABORT":  # overruled by hand: not a decision any more
                out.pop(record.gtrid, None)
    return Retained(out, since)
