"""The durable floor's decision file: the least a crash-safe 2PC coordinator must write.

``raw-durable`` (``benchmarks.modes``) is hand-written 2PC plus one durable decision per
transaction, written between the prepares and the commits. :class:`DecisionFile` is that
decision's cost and nothing more:

* the file is preallocated once (``posix_fallocate``) and fsynced with its directory, so a
  decision is written *in place* (``pwrite`` at the next offset; no size to journal, so
  ``fdatasync`` flushes the data block only); at the end of the file it wraps to offset 0
  (nothing is ever ended or retained: no recovery reads it);
* each decision is a CRC-framed record (length, crc32, ``C <gid>``), as a log must be able
  to tell a torn tail from a record;
* group commit: a thread whose record is not durable either *leads* (one ``fdatasync`` for
  every record written so far) or parks on a lock of its own; the leader, once its sync is
  over, releases the parked threads whose records it covered (one wake-up each, no condition
  they all contend for) and hands the next sync to the first thread left waiting, if any.
  No flusher thread, no END records, no recovery state.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

_FRAME = struct.Struct("<II")  # payload length, crc32

#: bytes preallocated for the file (decisions wrap around at its end)
DEFAULT_SIZE = 16 << 20


class _Parked:
    """A thread waiting for its record: released once the record is durable (``lead``
    False) or to lead the next sync (``lead`` True)."""

    __slots__ = ("lead", "lock", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.lead = False
        self.lock = threading.Lock()
        self.lock.acquire()


class DecisionFile:
    """A preallocated, group-committed, fdatasynced file of COMMIT decisions."""

    def __init__(self, path: Path, size: int = DEFAULT_SIZE) -> None:
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(self._fd, 0, size)
            os.fsync(self._fd)
            dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except BaseException:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self._pos = 0
        self._written = 0  # sequence number of the last record written (page cache)
        self._durable = 0  # every record up to this one is on disk
        self._syncing = False
        self._parked: list[_Parked] = []  # oldest first
        self.syncs = 0  # fdatasyncs issued
        self.records = 0  # records those syncs made durable

    def commit(self, gid: str) -> None:
        """Write the COMMIT decision of ``gid`` and return once it is on disk."""
        payload = b"C " + gid.encode()
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        parked = None
        with self._lock:
            pos = self._pos if self._pos + len(frame) <= self.size else 0
            os.pwrite(self._fd, frame, pos)  # into the page cache: covered by the next sync
            self._pos = pos + len(frame)
            self._written += 1
            if self._syncing:
                parked = _Parked(self._written)
                self._parked.append(parked)
            else:
                self._syncing = True
        if parked is not None:
            parked.lock.acquire()  # released once durable, or to lead the next sync
            if not parked.lead:
                return
        self._lead()

    def _lead(self) -> None:
        """Sync every record written so far; wake the threads it covered; hand over."""
        with self._lock:
            target = self._written
        try:
            os.fdatasync(self._fd)
        except BaseException:
            with self._lock:  # a benchmark: every waiter then fails on a sync of its own
                self._syncing = False
                waiting, self._parked = self._parked, []
            for parked in waiting:
                parked.lead = True
                parked.lock.release()
            raise
        with self._lock:
            self.syncs += 1
            self.records += target - self._durable
            self._durable = target
            keep = []
            for parked in self._parked:
                if parked.seq <= target:
                    parked.lock.release()
                else:
                    keep.append(parked)
            if keep:  # the oldest thread left waiting leads the next sync (still syncing)
                first = keep.pop(0)
                first.lead = True
                first.lock.release()
            else:
                self._syncing = False
            self._parked = keep

    def counters(self) -> tuple[int, int]:
        """(fdatasyncs, records they made durable) so far."""
        return self.syncs, self.records

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
