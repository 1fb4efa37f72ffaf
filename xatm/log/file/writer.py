"""The live log of one node: appending records, group commit (one fsync for every waiter,
led by a waiter or the flusher thread), rotation and retention (``FileLog``)."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xatm.core import events as _events
from xatm.core.logfields import log_fields
from xatm.core.records import LogRecord
from xatm.core.xid import validate_node_id
from xatm.errors import LogError, LogLocked
from xatm.log.base import DecisionNotLogged, DurabilityCallback
from xatm.log.file.scan import checked_scans, replay
from xatm.log.file.segments import (
    CARRIED_FILE,
    DEFAULT_RETAIN,
    DEFAULT_SEGMENT_BYTES,
    MAGIC,
    fsync_dir,
    preallocate,
    segment_files,
    segment_name,
    segment_number,
    sync_data,
    trim_segments,
    write_at,
    write_small,
)

logger = logging.getLogger("xatm.log")


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
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int] | None = None,
        deadline: float | None = None,
    ) -> None:
        # a local write and fsync: no socket to cut, so no deadline (a stalled disk holds
        # its callers, and the log is broken if a write fails)
        record = LogRecord("COMMIT", gtrid, tuple(branches), time.time(), dict(txids or {}))
        self._append(record, force=True)

    def log_end(self, gtrid: str) -> None:
        # Queued without taking the lock that committers wait on: the next flush writes it.
        self._ends.append((gtrid, LogRecord("END", gtrid).encode()))

    def log_overrule(self, gtrid: str, by: str) -> None:
        # forced like a COMMIT: the operator's branches are rolled back only once it is durable
        self._append(LogRecord("ABORT", gtrid), force=True)

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
            (p, used if p == current else p.stat().st_size) for p in segment_files(self.node_dir)
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
        scans = checked_scans(self.node_dir)  # LogCorrupt: nothing is touched
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
        last = max((segment_number(s.path) for s in scans), default=0)
        self._start_segment(last + 1, [s.path for s in scans], list(pending.values()))

    def _start_segment(self, number: int, obsolete: list[Path], carried: list[LogRecord]) -> None:
        """Begin segment ``number`` holding the ``carried`` COMMITs; delete the older
        segments that are out of the retention window (``obsolete`` says whether any
        older one may be)."""
        path = self.node_dir / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = MAGIC + b"".join(r.encode() for r in carried)
            write_at(fd, data, 0)
            preallocate(fd, self.segment_bytes)
            os.fsync(fd)
            fsync_dir(self.node_dir)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._segment_size = fd, path, len(data)
        write_small(self.node_dir, CARRIED_FILE, f"{number}\n")  # replay starts here now
        if obsolete:
            reference, self._reference = self._reference, None  # the first trim only
            trim_segments(self.node_dir, number, self.retain, reference)

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
            write_at(self._fd, data, self._segment_size)
            sync_data(self._fd)
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
            self._start_segment(segment_number(current) + 1, [current], carried)
