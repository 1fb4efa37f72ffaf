"""The embedded file log: append-only segments with CRC framing and group commit.

Layout under the log directory (all directories 0700, all files 0600)::

    <log>/<node_id>/lock                 flock()ed by the live coordinator of node_id
    <log>/<node_id>/seg-00000042.xlog    segments; only the newest one is appended to

Each segment starts with :data:`MAGIC` and holds framed records (see ``_records``).

* **Forcing.** ``log_commit`` appends a COMMIT record and waits until it is on disk. A
  waiter that finds no flush under way becomes the *leader*: it writes everything appended
  so far in one ``write`` and one ``fsync``. Records appended meanwhile wait for the next
  flush (group commit), each thread parked on a lock of its own (``_Batch``), woken once,
  when its batch is durable; the next flush is led by the log's flusher thread (started on
  first need), woken by the leader that finishes, so no waiter is woken only to elect a
  leader. If a write or fsync fails, the log is *broken*: waiters get
  :class:`~xatm.errors.LogError` and every later commit is refused, because what reached
  the disk is no longer known.
* **Forcing without a waiting thread** (the asyncio manager, ``xatm.log.aio``):
  ``append_commit`` appends a COMMIT record, leaves a callback and a waiter with the
  record's batch, and returns at once. If no flush is under way it wakes the flusher thread
  to lead one (else the flush under way hands the next one over, as above). The flush that
  writes the batch, on whichever thread led it, calls each callback once with all of its
  waiters of that batch (records durable, or the log broken), after the lock is released.
  Such records share flushes with ``log_commit``'s.
* **END records** are not forced: ``log_end`` only queues the record (no lock, nothing
  woken); the next flush writes it, after the COMMIT it ends (that COMMIT is on disk before
  ``log_end`` can be called).
* **Opening.** All segments are read in order; a torn or corrupt tail ends a segment's
  readable part and is ignored. Then a new segment is started holding a copy of every
  pending COMMIT record, it is fsynced (with the directory), and the older segments are
  deleted once they are out of the retention window (below). The same *carry-forward*
  happens whenever the current segment outgrows ``segment_bytes``, so the log holds about
  the segments written in the last ``retain`` seconds plus the pending records.
* **Retention.** Ended COMMIT decisions are kept for ``retain`` seconds (``DEFAULT_RETAIN``):
  an older segment is deleted only once it was last written more than ``retain`` seconds
  before the log's last write (at a rotation: before now), oldest first. Opening reads only
  the segments from the newest one known to begin with every pending COMMIT (the file
  ``<node>/carried``, written once that segment is fsynced): the retained ones before it
  hold only ended decisions, so they cost disk, not start-up time. After a PostgreSQL
  failover a branch whose ``COMMIT PREPARED`` the new primary never received is prepared
  again although its decision was ended: recovery finds the decision among the retained
  ones (:func:`retained_decisions`, every segment read) and commits it, and the failover
  report lists the decisions of the window before the switch (``xatm.node.failover``).
  The *horizon* (:func:`horizon`, the file ``<node>/horizon``) is the time before which
  decisions may have been deleted: it is written (fsynced) before a segment is deleted, so
  every COMMIT decided after it is still on disk.
* **Ownership.** The ``lock`` file is flock()ed exclusively for as long as the log is open.
  The kernel drops the lock when the process dies, however it dies, so "the lock can be
  taken" proves that no live process owns that node's log. Recovery uses that to take over
  the logs of dead peers in the same directory. This is why the directory must be on a
  local file system (not NFS).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xatm.core import events as _events
from xatm.core.logfields import log_fields
from xatm.core.records import HEADER, MAX_PAYLOAD, LogRecord, frame_at, next_good_frame, read_frames
from xatm.core.xid import validate_node_id
from xatm.errors import LogCorrupt, LogError, LogLocked, XatmError
from xatm.log.audit import AuditTrail
from xatm.log.base import DecisionNotLogged, DurabilityCallback, OwnerState

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


def _segment_name(number: int) -> str:
    return f"seg-{number:08d}.xlog"


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def _segment_files(node_dir: Path) -> list[Path]:
    """The segment files of one node, oldest first (other names are not xatm's: ignored)."""
    found = [p for p in node_dir.glob(SEGMENT_GLOB) if p.stem[4:].isdecimal() and p.is_file()]
    return sorted(found, key=_segment_number)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _preallocate(fd: int, size: int) -> None:
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

    Written before each deletion of segments (:func:`_raise_horizon`). A log whose first
    segment is still there never deleted any (0.0); one without the file whose first
    segment is gone was trimmed by an older xatm: the oldest segment's last write is the
    safe answer then (anything decided later is in it or after it)."""
    try:
        return float((node_dir / HORIZON_FILE).read_text("ascii").strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError):
        return time.time()  # unreadable: nothing older can be vouched for
    paths = _segment_files(node_dir)
    if not paths or _segment_number(paths[0]) == 1:
        return 0.0
    try:
        return paths[0].stat().st_mtime
    except OSError:
        return time.time()


def _write_small(node_dir: Path, name: str, text: str) -> None:
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


def _raise_horizon(node_dir: Path, at: float) -> None:
    """Make the horizon at least ``at``, durably (before what is older is deleted)."""
    if (node_dir / HORIZON_FILE).exists() and horizon(node_dir) >= at:
        return
    _write_small(node_dir, HORIZON_FILE, f"{at:.6f}\n")


def _carried_from(node_dir: Path) -> int:
    """The number of the newest segment known to begin with every COMMIT that was pending
    when it was started (:data:`CARRIED_FILE`, written once that segment was fsynced); 0
    when unknown: replay must then read every segment."""
    try:
        number = int((node_dir / CARRIED_FILE).read_text("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0
    return number if (node_dir / _segment_name(number)).is_file() else 0


def _trim_segments(
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
    for path in _segment_files(node_dir):
        if _segment_number(path) >= keep_from:
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
    _raise_horizon(node_dir, newest)
    for old in doomed:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    fsync_dir(node_dir)


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
    return Retained(out, since)


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
    paths = _segment_files(node_dir)
    return [
        scan_segment(p, newest=i == len(paths) - 1)
        for i, p in enumerate(paths)
        if _segment_number(p) >= since
    ]


def replay(scans: Sequence[SegmentScan]) -> dict[str, LogRecord]:
    """The pending COMMITs (no later END) of the records of ``scans``, in order."""
    return _pending(r for scan in scans for r in scan.records)


def _pending(records: Iterable[LogRecord]) -> dict[str, LogRecord]:
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


def _checked_scans(node_dir: Path) -> list[SegmentScan]:
    """The segments of one node that hold its pending decisions (from the newest one known
    to begin with every pending COMMIT, :func:`_carried_from`), read; LogCorrupt if one is
    damaged anywhere but in a torn tail of the newest (a torn tail is logged and ignored).
    The older segments hold only ended decisions kept for the retention window: they are
    not read when a log is opened."""
    scans = scan_log(node_dir, since=_carried_from(node_dir))
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
    scans = _checked_scans(node_dir)
    return replay(scans), [(s.path, s.size, s.torn > 0) for s in scans]


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
    paths = _segment_files(node_dir)
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
    pending = _pending(records)
    if not paths:
        return Salvage(node_id, 0, 0, (), (), None)
    number = _segment_number(paths[-1]) + 1
    new = node_dir / _segment_name(number)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, MAGIC + b"".join(r.encode() for r in pending.values()))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(node_dir)
    _write_small(node_dir, CARRIED_FILE, f"{number}\n")
    _raise_horizon(node_dir, time.time())  # only the pending decisions are kept
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


class _Batch:
    """Records appended between two flushes, and who waits for them.

    Each waiting thread parks on a lock of its own, which the flush that writes the batch
    releases (or fails to): one wake-up per waiter and no lock they all contend for on waking (an
    ``Event``'s waiters all take its condition's lock again, one after the other, a convoy
    that cost about 0.1 ms of client CPU per transaction at 48 threads). Records appended
    without a waiting thread (``append_commit``) leave a callback and a waiter instead,
    grouped by callback, so that the end of the flush calls each callback once. Every method
    is called with the log's lock held."""

    __slots__ = ("listeners", "over", "waiters")

    def __init__(self) -> None:
        #: the flush that writes the batch is over (durable, or the log broken)
        self.over = False
        self.waiters: list[threading.Lock] = []
        #: callback -> the waiters it is told about (None until a record leaves one)
        self.listeners: dict[DurabilityCallback, list[Any]] | None = None

    def park(self) -> threading.Lock | None:
        """A lock held for the caller, released when the batch's flush is over (acquire it
        to wait); None if it is over already."""
        if self.over:
            return None
        parked = threading.Lock()
        parked.acquire()
        self.waiters.append(parked)
        return parked

    def listen(self, callback: DurabilityCallback, waiter: object) -> None:
        """Have ``callback`` told about ``waiter`` when the batch's flush is over (it is not
        yet: a record is appended to it only while the log is not broken)."""
        listeners = self.listeners
        if listeners is None:
            self.listeners = {callback: [waiter]}
        else:
            waiters = listeners.get(callback)
            if waiters is None:
                listeners[callback] = [waiter]
            else:
                waiters.append(waiter)

    def end(self) -> dict[DurabilityCallback, list[Any]] | None:
        """Wake every waiting thread: the batch is on disk, or the log is broken. Returns the
        callbacks to tell (outside the lock: :meth:`FileLog._tell`)."""
        self.over = True
        waiters, self.waiters = self.waiters, []
        for parked in waiters:
            parked.release()
        listeners, self.listeners = self.listeners, None
        return listeners


class FileLog:
    """The coordinator log of one node_id in a local directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        node_id: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        lock_timeout: float = 10.0,
        wait_for_lock: bool = True,
        retain: float = DEFAULT_RETAIN,
    ) -> None:
        self._node_id = validate_node_id(node_id)
        self.directory = Path(directory)
        self.node_dir = self.directory / node_id
        self.segment_bytes = segment_bytes
        self.retain = retain
        self._reference: float | None = None  # the time the log was last written before opening
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        #: END records queued by ``log_end`` without the lock (deque appends are atomic),
        #: moved into the buffer by whoever next holds it (``_take_ends``)
        self._ends: collections.deque[tuple[str, bytes]] = collections.deque()
        self._appended = 0  # sequence number of the last appended record
        self._durable = 0  # every record up to this sequence number is on disk
        self._flushing = False
        self._open = _Batch()  # the batch that appended records join until a flush takes it
        self._broken: BaseException | None = None
        self._pending: dict[str, LogRecord] = {}
        #: sequence number of each pending COMMIT appended by this process: one above
        #: ``_durable`` is in memory only, and ``pending()`` does not show it
        self._commit_seq: dict[str, int] = {}
        self._fd = -1
        self._segment: Path | None = None
        self._segment_size = 0
        self._lock_fd = -1
        self.forces = 0  # number of fsyncs issued for forced records (group commit metric)
        self.forced_records = 0  # COMMIT records forced (lazy END records not counted)
        self._forced_in_buffer = 0
        self._flush_wanted = False  # flush() waits for records that no COMMIT forces
        self._flusher: threading.Thread | None = None  # leads a flush that records wait for
        self._flusher_wake = threading.Condition(self._lock)
        self._closing = False
        try:
            for d in (self.directory, self.node_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.node_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise LogError(f"cannot open the coordinator log in {self.node_dir}: {e}") from e
        if not self._acquire(lock_timeout if wait_for_lock else 0.0):
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise LogLocked(
                f"the log of node_id {node_id!r} in {self.directory} is held by another live"
                " process; every coordinator process needs its own node_id"
            )
        try:
            self._open_segments()
        except OSError as e:
            self.close()
            raise LogError(f"cannot open the coordinator log in {self.node_dir}: {e}") from e
        except BaseException:  # LogCorrupt, or an interrupt: release the lock all the same
            self.close()
            raise

    @classmethod
    def take_over(
        cls, directory: Path, node_id: str, *, retain: float = DEFAULT_RETAIN
    ) -> FileLog | None:
        """Open a peer's log if its owner is dead (its lock is free), else return None."""
        try:
            return cls(directory, node_id, wait_for_lock=False, retain=retain)
        except LogLocked:
            return None

    # -- CoordinatorLog --------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self._node_id

    def log_commit(
        self, gtrid: str, branches: Sequence[str], txids: Mapping[str, int] | None = None
    ) -> None:
        record = LogRecord("COMMIT", gtrid, tuple(branches), time.time(), dict(txids or {}))
        self._append(record, force=True)

    def log_end(self, gtrid: str) -> None:
        # Queued without taking the lock that committers wait on: the next flush writes it.
        self._ends.append((gtrid, LogRecord("END", gtrid).encode()))

    def append_commit(
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int] | None,
        callback: DurabilityCallback,
        waiter: object,
    ) -> None:
        """:meth:`log_commit` without its wait, for a caller that must not block (the
        asyncio manager, ``xatm.log.aio``): the COMMIT record is appended (no I/O) and
        counted as forced, the flusher thread is woken if no flush is under way, and returns.
        Once the flush that writes the record is over, ``callback`` is called with ``waiter``
        (and the other waiters that records of that flush left with the same ``callback``,
        one call for all): ``None`` if the record is durable (a decision, shown by
        :meth:`pending`), else the :class:`~xatm.errors.LogError` of the broken log (in
        doubt). See :data:`~xatm.log.base.DurabilityCallback` for where it is called.
        DecisionNotLogged if the log refuses the record (nothing is written, ``callback`` is
        never called)."""
        record = LogRecord("COMMIT", gtrid, tuple(branches), time.time(), dict(txids or {}))
        self._append(record, force=True, callback=callback, waiter=waiter)

    def pending(self) -> Mapping[str, LogRecord]:
        with self._lock:
            self._take_ends()
            if self._broken is not None:
                # What reached the disk is unknown: acting on the in-memory view could
                # commit branches that a restart (reading the disk) would roll back.
                raise LogError(
                    f"the coordinator log {self.node_dir} failed ({self._broken}); its"
                    " decisions can be trusted again only after a restart re-reads it"
                )
            # Only what is on disk: a COMMIT still waiting for its fsync is not a decision
            # yet (if the process died now, a restart would not find it).
            durable, seqs = self._durable, self._commit_seq
            return {g: r for g, r in self._pending.items() if seqs.get(g, 0) <= durable}

    def flush(self) -> None:
        with self._lock:
            self._take_ends()
            if self._broken is not None or self._fd < 0:
                return
            target, batch = self._appended, self._open
            if target > self._durable:
                self._flush_wanted = True  # no COMMIT may force these: the flusher must
        self._wait_durable(target, batch)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(LogError):
                self.flush()
            with self._lock:
                self._closing = True
                self._flusher_wake.notify()
                flusher = self._flusher
            if flusher is not None and flusher is not threading.current_thread():
                flusher.join()
            if self._broken is None:
                # a closed log's files hold only what was written (a restart would cut the
                # preallocated tail all the same); best effort: it is also cut at open
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._segment_size)
                    os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- inspection ------------------------------------------------------------------------
    def segments(self) -> list[tuple[Path, int]]:
        """(path, bytes in use) of each segment file, oldest first (the newest one's file is
        longer: it ends in preallocated space)."""
        current, used = self._segment, self._segment_size
        return [
            (p, used if p == current else p.stat().st_size) for p in _segment_files(self.node_dir)
        ]

    @property
    def broken(self) -> bool:
        return self._broken is not None

    # -- internals -------------------------------------------------------------------------
    def _acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LogError(f"cannot lock {self.node_dir / 'lock'}: {e}") from e
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _open_segments(self) -> None:
        scans = _checked_scans(self.node_dir)  # LogCorrupt: nothing is touched
        pending = replay(scans)
        # the window is kept back from the log's last write, not from now: after a long
        # stop, the last decisions of the process that stopped are still there to look at
        self._reference = scans[-1].path.stat().st_mtime if scans else None
        if scans and scans[-1].good < scans[-1].size + scans[-1].unused:
            # Cut a torn tail, or preallocated space never written, off first: if a crash
            # comes before the older segments are deleted below, this one is no longer the
            # newest, and must read as clean.
            with open(scans[-1].path, "r+b") as f:
                f.truncate(scans[-1].good)
                os.fsync(f.fileno())
        self._pending = pending
        last = max((_segment_number(s.path) for s in scans), default=0)
        self._start_segment(last + 1, [s.path for s in scans], list(pending.values()))

    def _start_segment(self, number: int, obsolete: list[Path], carried: list[LogRecord]) -> None:
        """Begin segment ``number`` holding the ``carried`` COMMITs; delete the older
        segments that are out of the retention window (``obsolete`` says whether any
        older one may be)."""
        path = self.node_dir / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = MAGIC + b"".join(r.encode() for r in carried)
            _write_at(fd, data, 0)
            _preallocate(fd, self.segment_bytes)
            os.fsync(fd)
            fsync_dir(self.node_dir)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._segment_size = fd, path, len(data)
        _write_small(self.node_dir, CARRIED_FILE, f"{number}\n")  # replay starts here now
        if obsolete:
            reference, self._reference = self._reference, None  # the first trim only
            _trim_segments(self.node_dir, number, self.retain, reference)

    def _append(
        self,
        record: LogRecord,
        *,
        force: bool,
        callback: DurabilityCallback | None = None,
        waiter: object = None,
    ) -> None:
        """Append ``record``; if ``force``, wait until it is on disk, or (``callback``) have
        its batch tell ``callback`` about ``waiter`` and see that a flush will write it."""
        frame = record.encode()
        wait = force and callback is None
        seq, batch = 0, None
        try:
            with self._lock:
                if self._broken is not None:
                    raise DecisionNotLogged(
                        f"the coordinator log {self.node_dir} failed earlier and accepts no"
                        f" more decisions: {self._broken}"
                    )
                if self._fd < 0 or self._closing:
                    raise DecisionNotLogged(f"the coordinator log {self.node_dir} is closed")
                self._appended += 1
                seq = self._appended
                batch = self._open
                self._buffer.append(frame)
                if force:
                    self._forced_in_buffer += 1
                if record.kind == "COMMIT":
                    self._pending[record.gtrid] = record
                    self._commit_seq[record.gtrid] = seq
                else:
                    self._pending.pop(record.gtrid, None)
                    self._commit_seq.pop(record.gtrid, None)
                if callback is not None:
                    self._open.listen(callback, waiter)
                    if not self._flushing:  # else the flush under way hands the next over
                        self._hand_over()
            if wait:
                self._wait_durable(seq, batch)
        except BaseException as e:
            if not wait or seq == 0 or isinstance(e, Exception):
                raise
            # KeyboardInterrupt, SystemExit... while the record waits for its fsync: wait
            # until its flush is over (on disk, or the log broken), so that the caller's "in
            # doubt" is resolved by what the disk holds, then let the interrupt through.
            self._wait_out(seq, batch)
            raise

    def _wait_out(self, seq: int, batch: _Batch | None) -> None:
        """Wait until record ``seq`` is on disk or the log is broken, whatever interrupts."""
        while True:
            try:
                self._wait_durable(seq, batch)
                return
            except Exception:
                return  # the log is broken: pending() refuses, nothing acts on it
            except BaseException:  # another interrupt: the record's flush ends first
                continue

    def _take_ends(self) -> None:
        """Move the queued END records into the buffer (the lock is held)."""
        ends = self._ends
        while ends:
            gtrid, frame = ends.popleft()
            self._appended += 1
            self._buffer.append(frame)
            self._pending.pop(gtrid, None)
            self._commit_seq.pop(gtrid, None)

    def _wait_durable(self, seq: int, batch: _Batch | None = None) -> None:
        """Return once record ``seq`` is on disk, leading a flush if none is under way.

        Waiters park on their own batch (``_Batch.park``), so a flush wakes only the threads
        whose records it wrote; the flush that records wait for next is led by the flusher thread
        (``_hand_over``), not by a waiter woken for it."""
        while True:
            if self._durable >= seq:  # an int only ever raised: no lock needed to read it
                return
            lead = False
            taken: _Batch | None = None
            frames: list[bytes] = []
            upto = forced = 0
            failure: BaseException | None = None
            try:
                with self._lock:
                    if self._durable >= seq:
                        return
                    if self._broken is not None:
                        raise LogError(f"forcing the coordinator log failed: {self._broken}")
                    if self._flushing:
                        parked = (batch if batch is not None else self._open).park()
                    else:
                        fresh = _Batch()
                        lead = self._flushing = True  # one statement: no interrupt between
                        taken, self._open = self._open, fresh
                        frames, upto, forced = self._take_records()
                if not lead:
                    if parked is not None:
                        parked.acquire()  # released when the batch's flush is over
                    continue
                self._write(frames)
            except BaseException as e:  # an OSError, or a signal's exception
                if not lead:
                    raise
                failure = e  # what reached the disk is unknown: the log is broken
            self._flushed(taken, upto, forced, failure)
            if failure is not None and not isinstance(failure, Exception):
                raise failure  # an interrupt during the flush: the log is broken, let it through

    def _take_records(self) -> tuple[list[bytes], int, int]:
        """The leader takes every record appended so far: (frames, the last one's sequence
        number, how many are forced). The lock is held."""
        self._take_ends()
        self._flush_wanted = False
        frames, upto = self._buffer, self._appended
        forced, self._forced_in_buffer = self._forced_in_buffer, 0
        self._buffer = []
        return frames, upto, forced

    def _flushed(
        self, taken: _Batch | None, upto: int, forced: int, failure: BaseException | None
    ) -> None:
        """The leader's flush of batch ``taken`` is over: records up to ``upto`` are durable,
        or the log is broken (``failure``). Wakes the batch's waiters, hands the next flush
        over if records wait for one, and then tells the batch's callbacks."""
        told = broken = None
        with self._lock:
            self._flushing = False
            if failure is None:
                self._durable = upto
                self.forced_records += forced
            else:
                self._broken = failure
                logger.critical(
                    "coordinator log %s failed: %s",
                    self.node_dir,
                    failure,
                    extra=log_fields(self._node_id),
                )
            if taken is not None:
                told = taken.end()
            if failure is not None:
                broken = self._open.end()  # its waiters get the LogError
            elif self._forced_in_buffer or self._flush_wanted:
                self._hand_over()
        if told is not None or broken is not None:
            error = None
            if failure is not None:
                error = LogError(f"forcing the coordinator log failed: {failure}")
                error.__cause__ = failure
            self._tell(told, error)
            self._tell(broken, error)

    def _tell(
        self, listeners: dict[DurabilityCallback, list[Any]] | None, error: LogError | None
    ) -> None:
        """Call each callback of a batch whose flush is over once with its waiters (the lock is not
        held). A callback that raises is logged: the flush that called it is over all the
        same, and the thread that ran it (a committer, maybe) must not fail for it. An
        interrupt is let through once every other callback is told."""
        if listeners is None:
            return
        interrupt: BaseException | None = None
        for callback, waiters in listeners.items():
            try:
                callback(waiters, error)
            except Exception:
                logger.exception("coordinator log %s: a durability callback failed", self.node_dir)
            except BaseException as e:
                interrupt = e
        if interrupt is not None:
            raise interrupt

    def _hand_over(self) -> None:
        """Records wait for the next flush: wake the flusher thread to lead it (the lock is
        held). One thread is woken, where waking the batch's waiters would wake them all."""
        if self._flusher is None or not self._flusher.is_alive():  # (gone in a forked child)
            self._flusher = threading.Thread(
                target=self._flusher_loop, name=f"xatm-log-{self._node_id}", daemon=True
            )
            self._flusher.start()
        self._flusher_wake.notify()

    def _flusher_loop(self) -> None:
        """The flusher thread: lead each flush that waiting records need, until closed."""
        while True:
            with self._lock:
                while (
                    self._flushing
                    or self._broken is not None
                    or not (self._forced_in_buffer or self._flush_wanted)
                ):
                    if self._closing:  # nothing waits for a flush: done (records that
                        return  # still come, racing close(), start a flusher again)
                    self._flusher_wake.wait()
                self._flushing = True
                taken, self._open = self._open, _Batch()
                frames, upto, forced = self._take_records()
            failure: BaseException | None = None
            try:
                self._write(frames)
            except BaseException as e:
                failure = e
            self._flushed(taken, upto, forced, failure)

    def _write(self, batch: list[bytes]) -> None:
        """Write and fsync one batch (only the leader calls this); rotate if it is due."""
        if batch:
            data = b"".join(batch)
            _write_at(self._fd, data, self._segment_size)
            os.fsync(self._fd)
            self._segment_size += len(data)
            self.forces += 1
            _events.log_forced(self._node_id)
        if self._segment_size > self.segment_bytes and self._segment is not None:
            # Records appended from here on stay in the buffer and go to the new segment.
            with self._lock:
                self._take_ends()
                carried = list(self._pending.values())
            current = self._segment
            # Cut the preallocated space off the segment that stops being the newest: only
            # the newest may end in zeros (``scan_segment``)
            os.ftruncate(self._fd, self._segment_size)
            os.fsync(self._fd)
            self._start_segment(_segment_number(current) + 1, [current], carried)


# -- reading a node's log without its lock (inspection, recovery's look at peers) ----------


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
    scans = scan_log(node_dir, since=0 if every else _carried_from(node_dir))
    if strict:
        check(scans)  # LogCorrupt: the decisions after the damage are unknown
    segments = tuple(
        SegmentInfo(s.path.name, s.size, len(s.records), s.size - s.good, s.corrupt) for s in scans
    )
    return LogSnapshot(replay(scans), segments)


def owner_state(log_directory: str | os.PathLike[str] | None, node: str) -> OwnerState:
    """Is the coordinator of ``node`` alive? Probes its log's lock without waiting.

    "unknown" when ``node`` has no log in ``log_directory``. The probe holds the lock for
    an instant only; a coordinator starting at that very moment waits for it (it polls).
    A log held by *this* process through another descriptor also reads as "alive".
    """
    if log_directory is None:
        return "unknown"
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
