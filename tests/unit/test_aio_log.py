"""The asyncio side of the file log (``xatm.log.aio``): COMMIT records appended on the loop
and forced in batches by the file log's own group commit, which calls back once per written
batch; a decision is acknowledged only once durable, a failed flush leaves every waiter in
doubt (LogError, not DecisionNotLogged), and no waiter is left waiting."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xatm.core.xid import new_gtrid
from xatm.errors import LogError
from xatm.log.aio import AsyncLog
from xatm.log.base import DecisionNotLogged
from xatm.log.file import FileLog, read_log


def test_concurrent_commits_are_durable_and_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FileLog(tmp_path, "aiolog")
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.002)  # a disk as slow as a real one: records pile up behind a flush
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    monkeypatch.setattr(os, "fdatasync", slow_fsync)  # the forced writes
    gtrids = [new_gtrid("aiolog") for _ in range(200)]

    async def main() -> None:
        alog = AsyncLog(log, 4)
        try:
            commits = (alog.log_commit(g, ["pg", "maria"], {}) for g in gtrids)
            await asyncio.wait_for(asyncio.gather(*commits), 30)
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

    monkeypatch.setattr(os, "fdatasync", failing_fsync)  # the forced writes

    async def main() -> None:
        alog = AsyncLog(log, 4)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(alog.log_commit(new_gtrid("aiolog"), ["pg"], {}) for _ in range(5)),
                    return_exceptions=True,
                ),
                10,
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
            # the log's flusher goes on (woken by the append)
            await asyncio.wait_for(alog.log_commit(new_gtrid("aiolog"), ["pg"], {}), 10)
        finally:
            await asyncio.to_thread(alog.shutdown)

    asyncio.run(main())
    assert gtrid in log.pending()  # the record was settled on disk all the same
    log.close()


class GatedFsync:
    """os.fsync held at a gate: each fsync waits until the test lets it through (and may
    be made to fail), so that a test decides which records a flush takes."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.entered = threading.Semaphore(0)  # released as each fsync begins
        self.gate = threading.Semaphore(0)
        self.fail: list[OSError] = []
        self.synced: dict[int, int] = {}  # fd -> its size at the end of its last fsync
        self.holding = False  # set once the log is open (opening it fsyncs)

    def __call__(self, fd: int) -> None:
        if self.holding:
            self.entered.release()
            self.gate.acquire()
        if self.fail:
            raise self.fail.pop()
        self.real(fd)
        self.synced[fd] = os.fstat(fd).st_size

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=10), "no flush began"

    def let_through(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def stop_holding(self) -> None:
        self.holding = False
        self.let_through(100)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedFsync]:
    gate = GatedFsync()
    monkeypatch.setattr(os, "fsync", gate)
    monkeypatch.setattr(os, "fdatasync", gate)  # the forced writes
    yield gate
    gate.stop_holding()


class Told:
    """A ``DurabilityCallback`` that records each call: (waiters, error, pending on disk)."""

    def __init__(self, log: FileLog) -> None:
        self.log = log
        self.calls: list[tuple[list[Any], BaseException | None, set[str]]] = []
        self.called = threading.Condition()

    def __call__(self, waiters: list[Any], error: BaseException | None) -> None:
        on_disk = set(read_log(self.log.node_dir, strict=False).pending)
        with self.called:
            self.calls.append((list(waiters), error, on_disk))
            self.called.notify_all()

    def wait_calls(self, n: int) -> None:
        with self.called:
            assert self.called.wait_for(lambda: len(self.calls) >= n, timeout=10), self.calls


def test_a_batch_is_told_once_after_its_fsync_and_a_record_appended_during_a_flush_goes_in_the_next(
    tmp_path: Path, gated: GatedFsync
) -> None:
    """The callback is called once per written batch, with every waiter of that batch, only
    after the batch's fsync; records appended while a flush runs are written by the next
    flush, which the file log's flusher thread leads on its own (nobody calls flush())."""
    log = FileLog(tmp_path, "aiolog")
    gated.holding = True
    told = Told(log)
    log.append_commit("g1", ["pg"], {}, told, "w1")  # wakes the flusher: flush 1 begins
    gated.wait_entered()
    log.append_commit("g2", ["pg"], {}, told, "w2")  # during flush 1: for flush 2
    log.append_commit("g3", ["pg"], {}, told, "w3")
    assert told.calls == []
    gated.let_through()
    told.wait_calls(1)
    gated.wait_entered()  # flush 2, handed over to the flusher thread
    assert told.calls[0][:2] == (["w1"], None)
    assert "g1" in told.calls[0][2]  # on disk when told
    assert set(log.pending()) == {"g1"}  # g2 and g3 are not decisions yet
    gated.let_through()
    told.wait_calls(2)
    waiters, error, on_disk = told.calls[1]
    assert (waiters, error) == (["w2", "w3"], None)  # one call for the whole batch
    assert {"g2", "g3"} <= on_disk
    assert log.forces == 2 and log.forced_records == 3
    gated.stop_holding()
    log.close()
    assert len(told.calls) == 2


def test_a_broken_log_tells_every_waiter_and_refuses_later_commits(
    tmp_path: Path, gated: GatedFsync, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed fsync breaks the log: the records of the failed flush and those appended
    during it are told the LogError (they are in doubt), a threaded committer waiting
    beside them gets it too, and every later record is refused before it is written."""
    log = FileLog(tmp_path, "aiolog")
    gated.holding = True
    told = Told(log)
    log.append_commit("g1", ["pg"], {}, told, "w1")
    gated.wait_entered()
    log.append_commit("g2", ["pg"], {}, told, "w2")
    threaded: list[BaseException] = []

    def commit() -> None:
        try:
            log.log_commit("g3", ["pg"])
        except BaseException as e:
            threaded.append(e)

    thread = threading.Thread(target=commit)
    thread.start()
    while not log._open.waiters:  # g3 appended, its thread parked on the open batch
        time.sleep(0.005)
    gated.fail.append(OSError(5, "Input/output error"))
    with caplog.at_level(logging.CRITICAL, logger="xatm.log"):
        gated.let_through()
        told.wait_calls(2)
        thread.join(10)
    assert sorted(w for call in told.calls for w in call[0]) == ["w1", "w2"]
    for _waiters, error, _ in told.calls:
        assert isinstance(error, LogError) and not isinstance(error, DecisionNotLogged)
        assert "Input/output error" in str(error)
    assert len(threaded) == 1 and isinstance(threaded[0], LogError)
    assert not isinstance(threaded[0], DecisionNotLogged)
    assert log.broken
    with pytest.raises(DecisionNotLogged):
        log.append_commit("g4", ["pg"], {}, told, "w4")
    gated.stop_holding()
    log.close()
    assert len(told.calls) == 2  # g4 is never told about


def test_asyncio_and_threaded_commits_share_a_flush_and_the_loop_is_woken_once_per_batch(
    tmp_path: Path, gated: GatedFsync
) -> None:
    """Twenty asyncio commits appended during one flush are forced by the next one with a
    threaded committer's record (one fsync), and resolved with one wake of the loop; each
    future resolves only once its record is on disk (fsynced)."""
    log = FileLog(tmp_path, "aiolog")
    gated.holding = True
    first = new_gtrid("aiolog")
    later = [new_gtrid("aiolog") for _ in range(20)]
    threaded = new_gtrid("aiolog")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakes: list[object] = []  # the log's wakes of the loop (to_thread's are left out)
        real_wake = loop.call_soon_threadsafe

        def counting_wake(callback: Callable[..., object], *args: Any) -> asyncio.Handle:
            if callback.__module__ == "xatm.log.aio":
                wakes.append(callback)
            return real_wake(callback, *args)

        loop.call_soon_threadsafe = counting_wake  # type: ignore[method-assign]
        alog = AsyncLog(log, 4)
        assert not [t for t in threading.enumerate() if t.name.startswith("xatm-aio-log")]
        head = asyncio.ensure_future(alog.log_commit(first, ["pg"], {}))
        await asyncio.to_thread(gated.wait_entered)  # flush 1 holds the first record
        tasks = [asyncio.ensure_future(alog.log_commit(g, ["pg"], {})) for g in later]
        await asyncio.sleep(0)  # all appended
        committer = asyncio.ensure_future(asyncio.to_thread(log.log_commit, threaded, ["pg"]))
        while not log._open.waiters:  # the threaded record appended, its thread parked
            await asyncio.sleep(0.005)
        gated.let_through()
        await asyncio.wait_for(head, 10)
        await asyncio.to_thread(gated.wait_entered)  # flush 2: the twenty and the thread's
        assert not any(t.done() for t in tasks)
        gated.let_through()
        await asyncio.wait_for(asyncio.gather(*tasks, committer), 10)
        assert len(wakes) == 2  # once per batch, not once per record
        # durable when resolved: every record lies within what the last fsync covered
        segment = log.segments()[-1][0]
        data = segment.read_bytes()
        synced = max(gated.synced.values())
        for g in [first, *later, threaded]:
            assert 0 <= data.index(g.encode()) < synced

    asyncio.run(main())
    assert log.forces == 2 and log.forced_records == 22
    gated.stop_holding()
    log.close()


def test_close_settles_the_records_still_waiting(tmp_path: Path, gated: GatedFsync) -> None:
    """close() while asyncio commits wait for their flush: they are forced and resolved
    before close() returns; later commits are refused."""
    log = FileLog(tmp_path, "aiolog")
    gated.holding = True
    gtrids = [new_gtrid("aiolog") for _ in range(5)]

    async def main() -> None:
        alog = AsyncLog(log, 4)
        head = asyncio.ensure_future(alog.log_commit(gtrids[0], ["pg"], {}))
        await asyncio.to_thread(gated.wait_entered)
        rest = [asyncio.ensure_future(alog.log_commit(g, ["pg"], {})) for g in gtrids[1:]]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(asyncio.to_thread(log.close))
        await asyncio.sleep(0.05)
        assert not closing.done()
        gated.stop_holding()
        await asyncio.wait_for(asyncio.gather(head, *rest, closing), 10)
        with pytest.raises(DecisionNotLogged):
            await alog.log_commit(new_gtrid("aiolog"), ["pg"], {})
        await asyncio.to_thread(alog.shutdown)

    asyncio.run(main())
    reopened = FileLog(tmp_path, "aiolog")
    assert set(reopened.pending()) == set(gtrids)
    reopened.close()


def test_no_commit_is_left_waiting_when_appended_as_a_flush_ends(tmp_path: Path) -> None:
    """Asyncio commits one after another (each appended right around the end of the
    previous flush) while threads commit beside them: every one is resolved, none waits
    for a flush that nobody starts."""
    log = FileLog(tmp_path, "aiolog")
    stop = threading.Event()

    def threaded() -> None:
        while not stop.is_set():
            log.log_commit(new_gtrid("aiolog"), ["pg"])

    threads = [threading.Thread(target=threaded) for _ in range(3)]

    async def main() -> None:
        alog = AsyncLog(log, 4)
        for t in threads:
            t.start()
        try:
            for i in range(300):
                commits = [alog.log_commit(new_gtrid("aiolog"), ["pg"], {}) for _ in range(i % 3)]
                await asyncio.wait_for(asyncio.gather(*commits), 10)
                await asyncio.wait_for(alog.log_commit(new_gtrid("aiolog"), ["pg"], {}), 10)
        finally:
            stop.set()
            for t in threads:
                await asyncio.to_thread(t.join)

    asyncio.run(main())
    log.close()
