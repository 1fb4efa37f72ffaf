"""The asyncio side of the file log (``xatm._aio_log``): COMMIT records appended on the loop
and forced in batches by one flusher thread; a decision is acknowledged only once durable,
and a failed flush leaves the waiters in doubt (LogError, not DecisionNotLogged)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from xatm._aio_log import AsyncLog
from xatm._filelog import FileLog
from xatm._log import DecisionNotLogged
from xatm._xid import new_gtrid
from xatm.errors import LogError


def test_concurrent_commits_are_durable_and_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FileLog(tmp_path, "aiolog")
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.002)  # a disk as slow as a real one: records pile up behind a flush
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    gtrids = [new_gtrid("aiolog") for _ in range(200)]

    async def main() -> None:
        alog = AsyncLog(log, 4)
        try:
            await asyncio.gather(*(alog.log_commit(g, ["pg", "maria"], {}) for g in gtrids))
            # every acknowledged decision is on disk (pending() shows only durable ones)
            assert set(log.pending()) == set(gtrids)
        finally:
            await asyncio.to_thread(alog.shutdown)

    asyncio.run(main())
    assert log.forced_records == 200
    assert 0 < log.forces < 200
    log.close()
    reopened = FileLog(tmp_path, "aiolog")
    assert set(reopened.pending()) == set(gtrids)
    reopened.close()


def test_a_failed_flush_leaves_the_decisions_in_doubt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = FileLog(tmp_path, "aiolog")
    failures = [OSError(5, "Input/output error")]
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)

    async def main() -> None:
        alog = AsyncLog(log, 4)
        try:
            results = await asyncio.gather(
                *(alog.log_commit(new_gtrid("aiolog"), ["pg"], {}) for _ in range(5)),
                return_exceptions=True,
            )
            # the first record went to the failed flush: not "certainly not written", what
            # reached the disk is unknown; the others were in it too, or refused by the
            # broken log before anything was written (DecisionNotLogged)
            assert all(isinstance(r, LogError) for r in results)
            assert not isinstance(results[0], DecisionNotLogged)
            assert "Input/output error" in str(results[0])
            # the broken log refuses further decisions before writing anything
            with pytest.raises(DecisionNotLogged):
                await alog.log_commit(new_gtrid("aiolog"), ["pg"], {})
        finally:
            await asyncio.to_thread(alog.shutdown)

    with caplog.at_level(logging.CRITICAL, logger="xatm.log"):
        asyncio.run(main())
    assert log.broken
    log.close()


def test_a_cancelled_waiter_does_not_stop_the_flush(tmp_path: Path) -> None:
    log = FileLog(tmp_path, "aiolog")
    gtrid = new_gtrid("aiolog")

    async def main() -> None:
        alog = AsyncLog(log, 4)
        try:
            task = asyncio.ensure_future(alog.log_commit(gtrid, ["pg"], {}))
            await asyncio.sleep(0)  # appended, waiting for its flush
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await alog.log_commit(new_gtrid("aiolog"), ["pg"], {})  # the flusher goes on
        finally:
            await asyncio.to_thread(alog.shutdown)

    asyncio.run(main())
    assert gtrid in log.pending()  # the record was settled on disk all the same
    log.close()
