"""The coordinator log for asyncio: COMMIT decisions forced in batches, off the event loop.

With a file log (``xatm.log.file.FileLog``) a transaction appends its COMMIT record on the
event loop (:meth:`~xatm.log.file.FileLog.append_commit`: a buffer, no I/O) with a future
and awaits that future. The file log's own group commit forces the record: its flusher
thread (woken by the append if no flush is under way), or a threaded committer of the same
log that leads a flush, writes every record appended meanwhile with one ``fsync`` (never on
the loop). The flush that writes a batch calls back once for all of this loop's records in
it, and that callback wakes the loop once (one ``call_soon_threadsafe``), which resolves the
batch's futures; records appended during a flush go in the next. No thread is parked per
waiting transaction, no thread of this module's own stands between the loop and the log,
and no thread hop is made per record.

Any other log (the shared PostgreSQL log) is called as the threaded manager calls it:
``log_commit`` on a worker thread per waiting transaction, whose group commit batches them.

A waiter cancelled while its record waits (``asyncio.run()`` cancels every task left at its
shutdown, the shielded one that ends a transaction included) waits on until the record's
flush is over (durable, or the log broken), then lets the cancellation through: as the file log
does for a thread interrupted in ``log_commit``. Until then its transaction is still running
here, so no recovery pass presumes it aborted while its COMMIT is about to reach the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from xatm.errors import LogError
from xatm.log.base import CoordinatorLog, DurabilityCallback


@runtime_checkable
class BatchedLog(Protocol):
    """A log whose COMMIT records can be appended now and are reported durable later, a
    whole flush's worth in one call (``xatm.log.file.FileLog.append_commit``)."""

    def append_commit(
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int] | None,
        callback: DurabilityCallback,
        waiter: object,
    ) -> None: ...


class _Loop:
    """The records of one event loop: told by the log that the flush of some is over, it wakes
    that loop once to resolve their futures."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def wake(self, waiters: list[asyncio.Future[None]], error: LogError | None) -> None:
        """On the thread that ran the flush (the log's ``DurabilityCallback``): one wake of
        the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(_resolve, waiters, error)


class AsyncLog:
    """Forces COMMIT decisions for the transactions of one event loop (see the module)."""

    def __init__(self, log: CoordinatorLog, threads: int) -> None:
        self._log = log
        self._batched: BatchedLog | None = log if isinstance(log, BatchedLog) else None
        #: the threads that wait in ``log_commit`` (as many as transactions may wait at
        #: once, so that the log's group commit batches them); none for a batched log
        self._threads: ThreadPoolExecutor | None = None
        if self._batched is None:
            self._threads = ThreadPoolExecutor(threads, thread_name_prefix="xatm-aio-log")
        self._loop: _Loop | None = None  # the loop of the last commit, told by the log

    async def log_commit(
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int],
        deadline: float | None = None,
    ) -> None:
        """Return once the COMMIT decision of ``gtrid`` is durable (as ``log_commit``)."""
        loop = asyncio.get_running_loop()
        log = self._batched
        if log is None:
            call = functools.partial(self._log.log_commit, gtrid, branches, txids, deadline)
            await _wait_out(loop.run_in_executor(self._threads, call))
            return
        told = self._loop
        if told is None or told.loop is not loop:
            told = self._loop = _Loop(loop)
        done = loop.create_future()
        # DecisionNotLogged: nothing was written, and ``done`` is never resolved
        log.append_commit(gtrid, branches, txids, told.wake, done)
        # Cancelled while waiting: the flush goes on all the same and ends the record's wait
        # (on disk, or the log broken); the caller is left in doubt, as with log_commit.
        await _wait_out(done)

    def log_end(self, gtrid: str) -> asyncio.Future[None] | None:
        """Record the END of ``gtrid``: None if done (a file log appends it, no wait),
        else a future to await (the shared log may block: on a worker thread)."""
        if self._batched is not None:
            self._log.log_end(gtrid)
            return None
        return asyncio.get_running_loop().run_in_executor(self._threads, self._log.log_end, gtrid)

    def shutdown(self) -> None:
        """Stop the threads, if any (blocking: call it on a worker thread). Records of a
        batched log still waiting are told by its flushes (at the latest its close)."""
        if self._threads is not None:
            self._threads.shutdown()


async def _wait_out(waiting: asyncio.Future[None]) -> None:
    """Await ``waiting``; if cancelled meanwhile, go on waiting until it is done (it always
    is: a flush or the log's close ends every record's wait), then raise the
    cancellation."""
    cancelled: asyncio.CancelledError | None = None
    while not waiting.done():
        try:
            await asyncio.shield(waiting)  # never cancels ``waiting`` itself
        except asyncio.CancelledError as e:
            if waiting.cancelled():  # cancelled by someone else: nothing to wait for
                raise
            cancelled = e
        except BaseException:
            break  # the record's flush failed: its error raised below, or the cancellation
    if cancelled is not None:
        raise cancelled
    waiting.result()


def _resolve(batch: list[asyncio.Future[None]], error: LogError | None) -> None:
    """On the loop: the batch's records are durable (``error`` None) or in doubt."""
    for done in batch:
        if done.done():  # its waiter was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            failure = LogError(str(error))  # one exception per waiter (each gets a traceback)
            failure.__cause__ = error.__cause__
            done.set_exception(failure)
