"""The embedded file log: append-only segments with CRC framing and group commit.

Layout under the log directory (all directories 0700, all files 0600)::

    <log>/<node_id>/lock                 flock()ed by the live coordinator of node_id
    <log>/<node_id>/seg-00000042.xlog    segments; only the newest one is appended to

Each segment starts with :data:`MAGIC` and holds framed records (``xatm.core.records``).

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

Modules: ``segments`` (the directory on disk: names, the ``horizon`` and ``carried`` files,
trimming), ``scan`` (reading segments, torn tails and corruption, replay), ``writer``
(``FileLog``: appends, group commit, rotation), ``reader`` (the operators' and peers' read
without the lock), ``salvage`` (rebuilding a damaged log), ``retention`` (removing the finished
logs of nodes gone for good).
"""

from __future__ import annotations

from xatm.log.file.reader import LogSnapshot, SegmentInfo, owner_state, read_log
from xatm.log.file.salvage import Salvage, salvage_log
from xatm.log.file.scan import (
    Retained,
    SegmentScan,
    check,
    in_use,
    read_segments,
    replay,
    retained_decisions,
    scan_log,
    scan_segment,
)
from xatm.log.file.segments import (
    CARRIED_FILE,
    DEFAULT_RETAIN,
    DEFAULT_SEGMENT_BYTES,
    HORIZON_FILE,
    MAGIC,
    SEGMENT_GLOB,
    fsync_dir,
    horizon,
    list_nodes,
)
from xatm.log.file.writer import FileLog

__all__ = [
    "CARRIED_FILE",
    "DEFAULT_RETAIN",
    "DEFAULT_SEGMENT_BYTES",
    "HORIZON_FILE",
    "MAGIC",
    "SEGMENT_GLOB",
    "FileLog",
    "LogSnapshot",
    "Retained",
    "Salvage",
    "SegmentInfo",
    "SegmentScan",
    "check",
    "fsync_dir",
    "horizon",
    "in_use",
    "list_nodes",
    "owner_state",
    "read_log",
    "read_segments",
    "replay",
    "retained_decisions",
    "salvage_log",
    "scan_log",
    "scan_segment",
]
