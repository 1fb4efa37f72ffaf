"""The coordinator log for asyncio: COMMIT decisions forced in batches, off the event loop.

With a file log (``xatm._filelog.FileLog``) a transaction appends its COMMIT record on the
event loop (:meth:`~xatm._filelog.FileLog.append_commit`: a buffer, no I/O) and awaits a
future. One flusher thread forces every record appended meanwhile with a single ``flush()``
(group commit: the fsync never runs on the loop) and wakes the loop once for the whole
batch, which resolves the batch's futures; records appended during a flush go in the next.
No thread is parked per waiting transaction, and no thread hop is made per record.

Any other log (the shared PostgreSQL log) is called as the threaded manager calls it:
``log_commit`` on a worker thread per waiting transaction, whose group commit batches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from ._log import CoordinatorLog
from .errors import LogError


@runtime_checkable
class BatchedLog(Protocol):
    """A log whose COMMIT records can be appended now and forced later, many at once."""

    @property
    def broken(self) -> bool: ...

    def append_commit(
        self, gtrid: str, branches: Sequence[str], txids: Mapping[str, int] | None = None
    ) -> None: ...

    def flush(self) -> None: ...


class AsyncLog:
    """Forces COMMIT decisions for the transactions of one event loop (see the module)."""

    def __init__(self, log: CoordinatorLog, threads: int) -> None:
        self._log = log
        self._batched: BatchedLog | None = log if isinstance(log, BatchedLog) else None
        #: the flusher (batched) or the threads that wait in ``log_commit`` (as many as
        #: transactions may wait at once, so that the log's group commit batches them)
        self._threads = ThreadPoolExecutor(
            1 if self._batched is not None else threads, thread_name_prefix="xatm-aio-log"
        )
        self._lock = threading.Lock()
        self._waiting: list[asyncio.Future[None]] = []  # appended, for the next flush
        self._flushing = False  # the flusher thread runs (or is about to)

    async def log_commit(
        self, gtrid: str, branches: Sequence[str], txids: Mapping[str, int]
    ) -> None:
        """Return once the COMMIT decision of ``gtrid`` is durable (as ``log_commit``)."""
        loop = asyncio.get_running_loop()
        log = self._batched
        if log is None:
            call = functools.partial(self._log.log_commit, gtrid, branches, txids)
            await loop.run_in_executor(self._threads, call)
            return
        log.append_commit(gtrid, branches, txids)  # DecisionNotLogged: nothing was written
        done = loop.create_future()
        with self._lock:
            self._waiting.append(done)
            start, self._flushing = not self._flushing, True
        if start:
            try:
                self._threads.submit(self._flusher, loop)
            except BaseException:  # shut down: nothing will force the record
                with self._lock:
                    self._flushing = False
                raise
        # Cancelled while waiting: the flush goes on all the same and settles the record
        # (on disk, or the log broken); the caller is left in doubt, as with log_commit.
        await done

    def _flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        """The flusher thread: force what is appended, wake the loop for that batch, and
        go on while more records wait."""
        log = self._batched
        assert log is not None
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._flushing = False
                    return
            error: BaseException | None = None
            try:
                log.flush()  # every record appended before the batch's futures were added
                if log.broken:
                    error = LogError("the coordinator log failed: the decision may not be durable")
            except BaseException as e:  # a LogError: the log broke during this flush
                error = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, batch, error)

    def log_end(self, gtrid: str) -> asyncio.Future[None] | None:
        """Record the END of ``gtrid``: None if done (a file log appends it, no wait),
        else a future to await (the shared log may block: on a worker thread)."""
        if self._batched is not None:
            self._log.log_end(gtrid)
            return None
        return asyncio.get_running_loop().run_in_executor(self._threads, self._log.log_end, gtrid)

    def shutdown(self) -> None:
        """Stop the threads (blocking: call it on a worker thread)."""
        self._threads.shutdown()


def _resolve(batch: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """On the loop: the batch's records are durable (``error`` None) or in doubt."""
    for done in batch:
        if done.done():  # its waiter was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            text = str(error) if isinstance(error, LogError) else f"forcing it failed: {error}"
            failure = LogError(text)
            failure.__cause__ = error
            done.set_exception(failure)
