"""The embedded file log: append-only segments with CRC framing and group commit.

Layout under the log directory (all directories 0700, all files 0600)::

    <log>/<node_id>/lock                 flock()ed by the live coordinator of node_id
    <log>/<node_id>/seg-00000042.xlog    segments; only the newest one is appended to

Each segment starts with :data:`MAGIC` and holds framed records (see ``_records``).

* **Forcing.** ``log_commit`` appends a COMMIT record and waits until it is on disk. The
  first waiter becomes the *leader*: it writes everything appended so far in one ``write``
  and one ``fsync``; the others wait for it (group commit). If a write or fsync fails, the log
  is *broken*: waiters get :class:`~xatm.errors.LogError` and every later commit is refused,
  because what reached the disk is no longer known.
* **Opening.** All segments are read in order; a torn or corrupt tail ends a segment's
  readable part and is ignored. Then a new segment is started holding a copy of every
  pending COMMIT record, it is fsynced (with the directory), and the older segments are
  deleted. The same *carry-forward* happens whenever the current segment outgrows
  ``segment_bytes``, so the log never holds more than one full segment plus the pending
  records.
* **Ownership.** The ``lock`` file is flock()ed exclusively for as long as the log is open.
  The kernel drops the lock when the process dies, however it dies, so "the lock can be
  taken" proves that no live process owns that node's log. Recovery uses that to take over
  the logs of dead peers in the same directory. This is why the directory must be on a
  local file system (not NFS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import _events
from ._log import DecisionNotLogged
from ._records import LogRecord, read_frames
from ._xid import validate_node_id
from .errors import LogError, LogLocked

logger = logging.getLogger("xatm.log")

MAGIC = b"XATMLOG1\n"
SEGMENT_GLOB = "seg-*.xlog"
DEFAULT_SEGMENT_BYTES = 8 << 20


def _segment_name(number: int) -> str:
    return f"seg-{number:08d}.xlog"


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def read_segments(node_dir: Path) -> tuple[dict[str, LogRecord], list[tuple[Path, int, bool]]]:
    """Replay every segment of one node: (pending COMMITs, [(segment, size, torn)])."""
    pending: dict[str, LogRecord] = {}
    segments = []
    for seg in sorted(node_dir.glob(SEGMENT_GLOB), key=_segment_number):
        data = seg.read_bytes()
        good = 0
        if data.startswith(MAGIC):
            good = len(MAGIC)
            for end, record in read_frames(data, len(MAGIC)):
                good = end
                if record.kind == "COMMIT":
                    pending[record.gtrid] = record
                else:
                    pending.pop(record.gtrid, None)
        torn = good != len(data)
        if torn:
            logger.warning(
                "log segment %s: ignoring %d bytes of torn or corrupt tail after offset %d",
                seg,
                len(data) - good,
                good,
            )
        segments.append((seg, len(data), torn))
    return pending, segments


class _Batch:
    """Records appended between two flushes; its event wakes the threads waiting on them."""

    __slots__ = ("signal",)

    def __init__(self) -> None:
        self.signal = threading.Event()


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
    ) -> None:
        self._node_id = validate_node_id(node_id)
        self.directory = Path(directory)
        self.node_dir = self.directory / node_id
        self.segment_bytes = segment_bytes
        self._cond = threading.Condition(threading.Lock())
        self._buffer: list[bytes] = []
        self._appended = 0  # sequence number of the last appended record
        self._durable = 0  # every record up to this sequence number is on disk
        self._flushing = False
        self._open = _Batch()  # the batch that appended records join until a flush takes it
        self._broken: BaseException | None = None
        self._pending: dict[str, LogRecord] = {}
        self._fd = -1
        self._segment: Path | None = None
        self._segment_size = 0
        self._lock_fd = -1
        self.forces = 0  # number of fsyncs issued for forced records (group commit metric)
        self.forced_records = 0  # COMMIT records forced (lazy END records not counted)
        self._forced_in_buffer = 0
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

    @classmethod
    def take_over(cls, directory: Path, node_id: str) -> FileLog | None:
        """Open a peer's log if its owner is dead (its lock is free), else return None."""
        try:
            return cls(directory, node_id, wait_for_lock=False)
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
        self._append(LogRecord("END", gtrid), force=False)

    def pending(self) -> Mapping[str, LogRecord]:
        with self._cond:
            if self._broken is not None:
                # What reached the disk is unknown: acting on the in-memory view could
                # commit branches that a restart (reading the disk) would roll back.
                raise LogError(
                    f"the coordinator log {self.node_dir} failed ({self._broken}); its"
                    " decisions can be trusted again only after a restart re-reads it"
                )
            return dict(self._pending)

    def flush(self) -> None:
        with self._cond:
            if self._broken is not None or self._fd < 0:
                return
            target, batch = self._appended, self._open
        self._wait_durable(target, batch)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(LogError):
                self.flush()
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- inspection ------------------------------------------------------------------------
    def segments(self) -> list[tuple[Path, int]]:
        """(path, size in bytes) of each segment file, oldest first."""
        return [
            (p, p.stat().st_size)
            for p in sorted(self.node_dir.glob(SEGMENT_GLOB), key=_segment_number)
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
        pending, segments = read_segments(self.node_dir)
        self._pending = pending
        last = max((_segment_number(p) for p, _, _ in segments), default=0)
        self._start_segment(last + 1, [p for p, _, _ in segments], list(pending.values()))

    def _start_segment(self, number: int, obsolete: list[Path], carried: list[LogRecord]) -> None:
        """Begin segment ``number`` holding the ``carried`` COMMITs; delete ``obsolete``."""
        path = self.node_dir / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            data = MAGIC + b"".join(r.encode() for r in carried)
            os.write(fd, data)
            os.fsync(fd)
            _fsync_dir(self.node_dir)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._segment_size = fd, path, len(data)
        for old in obsolete:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        if obsolete:
            _fsync_dir(self.node_dir)

    def _append(self, record: LogRecord, *, force: bool) -> None:
        frame = record.encode()
        with self._cond:
            if self._broken is not None:
                raise DecisionNotLogged(
                    f"the coordinator log {self.node_dir} failed earlier and accepts no more"
                    f" decisions: {self._broken}"
                )
            if self._fd < 0:
                raise DecisionNotLogged(f"the coordinator log {self.node_dir} is closed")
            self._buffer.append(frame)
            if force:
                self._forced_in_buffer += 1
            self._appended += 1
            seq = self._appended
            batch = self._open
            if record.kind == "COMMIT":
                self._pending[record.gtrid] = record
            else:
                self._pending.pop(record.gtrid, None)
        if force:
            self._wait_durable(seq, batch)

    def _wait_durable(self, seq: int, batch: _Batch | None = None) -> None:
        """Return once record ``seq`` is on disk, leading a flush if none is under way.

        Waiters sleep on their own batch's event, so a flush wakes only the threads whose
        records it wrote (and, when more records are waiting, hands the lead to them)."""
        while True:
            with self._cond:
                if self._durable >= seq:
                    return
                if self._broken is not None:
                    raise LogError(f"forcing the coordinator log failed: {self._broken}")
                if self._flushing:
                    wait_on = batch if batch is not None else self._open
                    lead = False
                else:
                    self._flushing = True
                    taken, self._open = self._open, _Batch()
                    taken.signal.clear()  # from now on it means "written"
                    frames, upto = self._buffer, self._appended
                    forced, self._forced_in_buffer = self._forced_in_buffer, 0
                    self._buffer = []
                    lead = True
            if not lead:
                wait_on.signal.wait()
                continue
            failure: BaseException | None = None
            try:
                self._write(frames)
            except BaseException as e:  # an OSError, or a signal's exception
                failure = e
            with self._cond:
                self._flushing = False
                if failure is None:
                    self._durable = upto
                    self.forced_records += forced
                else:
                    self._broken = failure
                    logger.critical("coordinator log %s failed: %s", self.node_dir, failure)
                taken.signal.set()
                if self._buffer or failure is not None:
                    self._open.signal.set()  # records are waiting: one of them leads next

    def _write(self, batch: list[bytes]) -> None:
        """Write and fsync one batch (only the leader calls this); rotate if it is due."""
        if batch:
            data = b"".join(batch)
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
            self._segment_size += len(data)
            self.forces += 1
            _events.log_forced(self._node_id)
        if self._segment_size > self.segment_bytes and self._segment is not None:
            # Records appended from here on stay in the buffer and go to the new segment.
            with self._cond:
                carried = list(self._pending.values())
            current = self._segment
            self._start_segment(_segment_number(current) + 1, [current], carried)
