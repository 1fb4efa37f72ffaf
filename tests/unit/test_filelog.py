"""Unit tests of the embedded coordinator log (``xatm.log.file``) and its record framing.

No database server is needed: every test works on a log directory in tmp_path.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from xatm.core.records import HEADER, MAX_PAYLOAD, LogRecord, read_frames
from xatm.core.xid import new_gtrid
from xatm.errors import ConfigurationError, LogError, LogLocked
from xatm.log.base import DecisionNotLogged
from xatm.log.file import MAGIC, FileLog, horizon, list_nodes, read_log, retained_decisions

NODE = "node-a"


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def opened(logdir: Path) -> Iterator[list[FileLog]]:
    """Logs opened by a test; closed after it (closing twice is harmless)."""
    logs: list[FileLog] = []
    yield logs
    for log in logs:
        log.close()


def open_log(logs: list[FileLog], directory: Path, node_id: str = NODE, **kw: object) -> FileLog:
    kw.setdefault("retain", 0.0)  # the log's mechanics; retention has tests of its own
    log = FileLog(directory, node_id, **kw)  # type: ignore[arg-type]
    logs.append(log)
    return log


def reopen(logs: list[FileLog], log: FileLog, **kw: object) -> FileLog:
    log.close()
    return open_log(logs, log.directory, log.node_id, **kw)


def gtrid(i: int) -> str:
    return f"xatm.{NODE}.{i:011x}{i:016x}"


def only_segment(log: FileLog) -> Path:
    segments = log.segments()
    assert len(segments) == 1, segments
    return segments[0][0]


def frame_bounds(data: bytes) -> list[tuple[int, int]]:
    """(start, end) offset of each good frame of a segment's bytes."""
    bounds = []
    start = len(MAGIC)
    for end, _ in read_frames(data, len(MAGIC)):
        bounds.append((start, end))
        start = end
    return bounds


def write_three(logs: list[FileLog], logdir: Path) -> tuple[Path, list[tuple[int, int]]]:
    """A closed log whose one segment holds COMMITs of gtrid(1), gtrid(2), gtrid(3)."""
    log = open_log(logs, logdir)
    for i in (1, 2, 3):
        log.log_commit(gtrid(i), ["pg1", "maria"])
    seg = only_segment(log)
    log.close()
    data = seg.read_bytes()
    bounds = frame_bounds(data)
    assert len(bounds) == 3 and bounds[-1][1] == len(data)
    return seg, bounds


# -- records -------------------------------------------------------------------------------
def test_record_round_trip_with_txids() -> None:
    commit = LogRecord("COMMIT", gtrid(1), ("pg1", "maria"), 1.5, {"pg1": 1234})
    assert [r for _, r in read_frames(commit.encode(), 0)] == [commit]


def test_record_round_trip() -> None:
    commit = LogRecord("COMMIT", gtrid(1), ("pg1", "maria"), 1700000000.1234)
    end = LogRecord("END", gtrid(1))
    data = MAGIC + commit.encode() + end.encode()
    got = [r for _, r in read_frames(data, len(MAGIC))]
    assert got[0] == LogRecord("COMMIT", gtrid(1), ("pg1", "maria"), 1700000000.123)
    assert got[1] == end
    frame = commit.encode()
    length, crc = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    assert crc == zlib.crc32(frame[HEADER.size :])
    assert LogRecord.decode(frame[HEADER.size :]) == got[0]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"k":"PREPARE","g":"x"}',
        b'{"k":"END","g":7}',
        b'{"g":"x"}',
        b"not json",
        b"[1]",
        b'"text"',
        b'{"k":"COMMIT","g":"x","t":"soon"}',
        b'{"k":"COMMIT","g":"x","b":5}',
        b'{"k":"COMMIT","g":"x","x":[1]}',
        b'{"k":"COMMIT","g":"x","x":"ab"}',
        b'{"k":"COMMIT","g":"x","x":{"pg1":"abc"}}',
    ],
)
def test_record_decode_rejects_malformed(payload: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        LogRecord.decode(payload)
    # a frame with a good CRC around it ends the readable part, it does not crash the reader
    good = LogRecord("END", gtrid(1)).encode()
    assert [r.gtrid for _, r in read_frames(good + _frame(payload) + good, 0)] == [gtrid(1)]


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def test_read_frames_stops_at_bad_crc() -> None:
    a, b, c = (LogRecord("END", gtrid(i)).encode() for i in (1, 2, 3))
    bad = bytearray(b)
    bad[-2] ^= 0x01
    data = a + bytes(bad) + c
    assert [r.gtrid for _, r in read_frames(data, 0)] == [gtrid(1)]


def test_read_frames_stops_at_oversize_length() -> None:
    a = LogRecord("END", gtrid(1)).encode()
    # a frame that claims more than MAX_PAYLOAD, with that many bytes actually present
    huge = b"x" * (MAX_PAYLOAD + 1)
    data = a + HEADER.pack(len(huge), zlib.crc32(huge)) + huge + a
    assert [end for end, _ in read_frames(data, 0)] == [len(a)]


def test_read_frames_stops_at_zero_length_and_undecodable_payload() -> None:
    a = LogRecord("END", gtrid(1)).encode()
    assert len(list(read_frames(a + HEADER.pack(0, 0) + a, 0))) == 1
    # a good CRC over a payload that is not a record
    assert len(list(read_frames(a + _frame(b'{"k":"NOPE","g":"x"}') + a, 0))) == 1


def test_read_frames_stops_at_truncated_frame() -> None:
    a, b = (LogRecord("COMMIT", gtrid(i), ("pg1",), 1.0).encode() for i in (1, 2))
    for cut in (1, HEADER.size - 1, HEADER.size, HEADER.size + 3, len(b) - 1):
        data = a + b[:cut]
        assert [end for end, _ in read_frames(data, 0)] == [len(a)], cut
    assert list(read_frames(b"", 0)) == []


# -- commit, end, reopen -------------------------------------------------------------------
def test_commit_is_pending_after_reopen(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir)
    assert log.node_id == NODE
    assert log.pending() == {}
    before = time.time()
    g = new_gtrid(NODE)
    log.log_commit(g, ["pg1", "maria"])
    assert set(log.pending()) == {g}
    log = reopen(opened, log)
    record = log.pending()[g]
    assert record.kind == "COMMIT"
    assert record.branches == ("pg1", "maria")
    assert before - 1 <= record.at <= time.time() + 1


def test_end_removes_the_commit_after_reopen(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir)
    log.log_commit(gtrid(1), ["pg1"])
    log.log_commit(gtrid(2), ["pg2"])
    log.log_end(gtrid(1))  # lazy: close() writes it out
    assert set(log.pending()) == {gtrid(2)}
    log = reopen(opened, log)
    assert set(log.pending()) == {gtrid(2)}
    log.log_end(gtrid(2))
    log.flush()
    log = reopen(opened, log)
    assert log.pending() == {}


def test_an_overruled_commit_is_neither_pending_nor_retained(
    logdir: Path, opened: list[FileLog]
) -> None:
    """An operator's hand rollback of a decided transaction (``log_overrule``): an ABORT
    record, durable when the call returns, that ends the COMMIT's pending life and its
    retention (an ENDed COMMIT stays retained: a failover may need it)."""
    log = open_log(opened, logdir, retain=3600.0)
    for i in (1, 2):
        log.log_commit(gtrid(i), ["pg1", "maria"])
    log.log_overrule(gtrid(1), by="cli:test")  # forced: on disk now
    assert set(log.pending()) == {gtrid(2)}
    assert set(read_log(logdir / NODE).pending) == {gtrid(2)}  # read from the disk
    log.log_end(gtrid(2))
    log = reopen(opened, log, retain=3600.0)
    assert log.pending() == {}
    assert set(retained_decisions(logdir / NODE).decisions) == {gtrid(2)}
    record = LogRecord("ABORT", gtrid(1))
    assert LogRecord.decode(record.encode()[HEADER.size :]) == record


def test_closed_log_refuses_decisions(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir)
    log.close()
    with pytest.raises(DecisionNotLogged):
        log.log_commit(gtrid(1), ["pg1"])


def test_invalid_node_id_is_refused(logdir: Path) -> None:
    with pytest.raises(ConfigurationError):
        FileLog(logdir, "../escape")
    assert not logdir.exists()


# -- torn and corrupt tails ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["mid-header", "end-of-header", "mid-payload", "last-byte"])
def test_torn_tail_is_ignored(
    where: str, logdir: Path, opened: list[FileLog], caplog: pytest.LogCaptureFixture
) -> None:
    seg, bounds = write_three(opened, logdir)
    start, end = bounds[-1]
    cut = {
        "mid-header": start + 3,
        "end-of-header": start + HEADER.size,
        "mid-payload": start + HEADER.size + (end - start - HEADER.size) // 2,
        "last-byte": end - 1,
    }[where]
    with seg.open("r+b") as f:
        f.truncate(cut)
    with caplog.at_level(logging.WARNING, logger="xatm.log"):
        log = open_log(opened, logdir)
    assert set(log.pending()) == {gtrid(1), gtrid(2)}
    assert any("torn tail" in r.getMessage() for r in caplog.records)
    log.log_commit(gtrid(4), ["pg1"])
    log.log_end(gtrid(1))
    log = reopen(opened, log)
    assert set(log.pending()) == {gtrid(2), gtrid(4)}
    assert log.pending()[gtrid(4)].branches == ("pg1",)


def test_tail_torn_inside_magic(logdir: Path, opened: list[FileLog]) -> None:
    seg, _ = write_three(opened, logdir)
    with seg.open("r+b") as f:
        f.truncate(4)
    log = open_log(opened, logdir)
    assert log.pending() == {}
    log.log_commit(gtrid(5), ["pg1"])
    log = reopen(opened, log)
    assert set(log.pending()) == {gtrid(5)}


# Corruption (a bad frame that no crash can have left) refuses to open the log instead:
# tests/unit/test_log_corruption.py.


def test_empty_segment_file_is_ignored(logdir: Path, opened: list[FileLog]) -> None:
    node_dir = logdir / NODE
    node_dir.mkdir(parents=True)
    (node_dir / "seg-00000001.xlog").write_bytes(b"")
    log = open_log(opened, logdir)
    assert log.pending() == {}


# -- rotation ------------------------------------------------------------------------------
def test_rotation_bounds_the_log_and_carries_pending_commits(
    logdir: Path, opened: list[FileLog]
) -> None:
    segment_bytes = 2048
    log = open_log(opened, logdir, segment_bytes=segment_bytes)
    kept = [gtrid(1_000_000 + i) for i in range(3)]
    for g in kept:
        log.log_commit(g, ["pg1", "pg2", "maria"])
    first_segment = only_segment(log).name
    frame = len(LogRecord("COMMIT", gtrid(0), ("pg1", "pg2"), time.time()).encode())
    bound = segment_bytes + 2 * frame + len(MAGIC)
    sizes = []
    for i in range(400):
        log.log_commit(gtrid(i), ["pg1", "pg2"])
        log.log_end(gtrid(i))
        segments = log.segments()
        assert len(segments) == 1, segments
        sizes.append(segments[0][1])
        assert segments[0][1] <= bound
    assert only_segment(log).name != first_segment  # it did rotate
    assert min(sizes) < segment_bytes // 2  # ... and started small again
    assert set(log.pending()) == set(kept)
    log = reopen(opened, log, segment_bytes=segment_bytes)
    assert set(log.pending()) == set(kept)
    assert log.pending()[kept[0]].branches == ("pg1", "pg2", "maria")
    ((path, used),) = log.segments()
    assert used < segment_bytes  # in use: the pending COMMITs only
    assert path.stat().st_size == segment_bytes  # the file: preallocated for what comes


def hammer(
    log: FileLog, *, commits: int, end_unless_multiple_of: int, check_durable: bool = False
) -> None:
    """8 threads each log ``commits`` COMMITs at once, and the END of each one whose number
    is not a multiple of ``end_unless_multiple_of``; ``check_durable``: each COMMIT is read
    back from disk when log_commit returns."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(commits):
                g = gtrid(t * 1000 + i)
                log.log_commit(g, ["pg1", "maria"])
                if check_durable:
                    assert g in read_log(log.node_dir).pending  # on disk on return
                if i % end_unless_multiple_of:
                    log.log_end(g)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def _age(path: Path, seconds: float) -> None:
    """Make a file look last written ``seconds`` ago."""
    at = time.time() - seconds
    os.utime(path, (at, at))


def test_ended_decisions_are_retained_for_the_window(logdir: Path, opened: list[FileLog]) -> None:
    """Ended COMMITs stay on disk (found by retained_decisions) while their segment was
    written within ``retain`` seconds; older segments go, oldest first, and the horizon is
    raised to their last write before they are deleted."""
    log = open_log(opened, logdir, segment_bytes=1024, retain=60.0)
    node_dir = logdir / NODE
    assert horizon(node_dir) == 0.0  # nothing deleted yet: every decision is there
    for i in range(30):
        log.log_commit(gtrid(i), ["pg1", "maria"], {"pg1": 1000 + i})
        log.log_end(gtrid(i))
    log.flush()
    segments = [p for p, _ in log.segments()]
    assert len(segments) > 2  # rotated, and nothing out of the window was deleted
    kept = retained_decisions(node_dir).decisions
    assert set(kept) == {gtrid(i) for i in range(30)} and kept[gtrid(7)].txids == {"pg1": 1007}
    assert log.pending() == {}
    # the two oldest segments age out of the window; the next rotation deletes them
    for old in segments[:2]:
        _age(old, 120.0)
    for i in range(30, 45):
        log.log_commit(gtrid(i), ["pg1"])
        log.log_end(gtrid(i))
    log.flush()
    assert not segments[0].exists() and not segments[1].exists() and segments[2].exists()
    aged = time.time() - 120.0
    assert aged - 1 < horizon(node_dir) < aged + 1
    assert gtrid(29) in retained_decisions(node_dir).decisions
    # opening reads only the segments that hold pending decisions: not the retained ones
    log.close()
    reopened = open_log(opened, logdir, retain=60.0)
    assert reopened.pending() == {}
    assert (node_dir / "carried").read_text().strip() == str(
        int(reopened.segments()[-1][0].stem[4:])
    )


def test_an_aged_segment_between_two_fresh_ones_is_kept(
    logdir: Path, opened: list[FileLog]
) -> None:
    """Only a run of the oldest segments is deleted: what is kept stays consecutive."""
    log = open_log(opened, logdir, segment_bytes=1024, retain=60.0)
    for i in range(30):
        log.log_commit(gtrid(i), ["pg1"])
        log.log_end(gtrid(i))
    segments = [p for p, _ in log.segments()]
    _age(segments[1], 120.0)
    log.close()
    open_log(opened, logdir, retain=60.0)
    assert all(p.exists() for p in segments)


def test_a_log_reopened_after_a_long_stop_keeps_its_last_window(
    logdir: Path, opened: list[FileLog]
) -> None:
    """The window is counted back from the log's last write: a coordinator that was down
    for longer than ``retain`` still finds the decisions of its last moments (what the
    failover report checks), while a log with nothing retained keeps only what is pending."""
    log = open_log(opened, logdir, retain=60.0)
    for i in range(5):
        log.log_commit(gtrid(i), ["pg1"])
        log.log_end(gtrid(i))
    log.close()
    (seg,) = [p for p, _ in log.segments()]
    _age(seg, 3600.0)  # stopped an hour ago
    open_log(opened, logdir, retain=60.0).close()
    assert set(retained_decisions(logdir / NODE).decisions) == {gtrid(i) for i in range(5)}
    assert horizon(logdir / NODE) == 0.0
    open_log(opened, logdir, retain=0.0).close()
    assert retained_decisions(logdir / NODE).decisions == {}
    assert horizon(logdir / NODE) > time.time() - 5


def test_a_horizon_of_an_older_log_without_its_file(logdir: Path, opened: list[FileLog]) -> None:
    """A log trimmed by an xatm that kept no horizon: its oldest segment's last write is the
    safe answer (anything decided later is there)."""
    node_dir = logdir / NODE
    node_dir.mkdir(parents=True)
    (node_dir / "lock").touch()
    seg = node_dir / "seg-00000005.xlog"
    seg.write_bytes(MAGIC)
    _age(seg, 100.0)
    assert abs(horizon(node_dir) - (time.time() - 100.0)) < 1
    (node_dir / "horizon").write_text("garbage")
    assert horizon(node_dir) > time.time() - 5  # unreadable: nothing older is vouched for


def test_opening_does_not_read_the_retained_segments(
    logdir: Path, opened: list[FileLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay starts at the segment named in ``carried`` (it began with every pending
    COMMIT): a damaged retained segment before it neither slows nor stops the opening, and
    the decisions after its damage no longer count as retained (the horizon moves)."""
    log = open_log(opened, logdir, segment_bytes=1024, retain=60.0)
    log.log_commit(gtrid(999), ["pg1"])  # pending throughout: carried into every segment
    for i in range(30):
        log.log_commit(gtrid(i), ["pg1"])
        log.log_end(gtrid(i))
    log.close()
    first = log.segments()[0][0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + HEADER.size + 2] ^= 0x20  # a flipped bit in its first frame
    first.write_bytes(bytes(data))
    reopened = open_log(opened, logdir, retain=60.0)
    assert set(reopened.pending()) == {gtrid(999)}
    kept = retained_decisions(logdir / NODE)
    assert kept.horizon >= first.stat().st_mtime - 1
    # without the file, every segment is read again, and the damage refuses the log
    reopened.close()
    (logdir / NODE / "carried").unlink()
    with pytest.raises(LogError, match="corrupt"):
        FileLog(logdir, NODE, retain=60.0)


def test_rotation_under_concurrent_commits(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir, segment_bytes=1024)
    hammer(log, commits=50, end_unless_multiple_of=5)
    expected = {gtrid(t * 1000 + i) for t in range(8) for i in range(0, 50, 5)}
    assert set(log.pending()) == expected
    log = reopen(opened, log)
    assert set(log.pending()) == expected
    assert len(log.segments()) == 1


# -- files and permissions -----------------------------------------------------------------
def test_files_are_private(logdir: Path, opened: list[FileLog]) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the modes
    try:
        log = open_log(opened, logdir)
        log.log_commit(gtrid(1), ["pg1"])
    finally:
        os.umask(old)
    for d in (logdir, logdir / NODE):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = list((logdir / NODE).iterdir())
    assert {f.name for f in files} == {"lock", "carried", "seg-00000001.xlog"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_list_nodes(logdir: Path, opened: list[FileLog]) -> None:
    assert list_nodes(logdir) == []
    open_log(opened, logdir, "b-2")
    open_log(opened, logdir, "a_1")
    (logdir / "no-lock-file").mkdir()
    (logdir / "bad.name").mkdir()
    (logdir / "bad.name" / "lock").touch()
    (logdir / "stray-file").write_text("x")
    assert list_nodes(logdir) == ["a_1", "b-2"]


# -- ownership -----------------------------------------------------------------------------
def test_second_open_in_the_same_process_is_locked_out(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir)
    with pytest.raises(LogLocked, match="node-a"):
        FileLog(logdir, NODE, lock_timeout=0.1)
    with pytest.raises(LogLocked):
        FileLog(logdir, NODE, wait_for_lock=False)
    # another node_id in the same directory is independent
    other = open_log(opened, logdir, "node-b")
    other.log_commit(gtrid(9), ["pg1"])
    assert log.pending() == {}


def test_take_over(logdir: Path, opened: list[FileLog]) -> None:
    log = open_log(opened, logdir)
    log.log_commit(gtrid(1), ["pg1"])
    assert FileLog.take_over(logdir, NODE) is None
    log.close()
    taken = FileLog.take_over(logdir, NODE)
    assert taken is not None
    opened.append(taken)
    assert set(taken.pending()) == {gtrid(1)}


def test_take_over_after_the_owner_was_killed(logdir: Path, opened: list[FileLog]) -> None:
    g = new_gtrid("victim")
    code = textwrap.dedent(
        f"""
        import os, signal
        from xatm.log.file import FileLog
        log = FileLog({str(logdir)!r}, "victim")
        log.log_commit({g!r}, ["pg1", "maria"])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert list_nodes(logdir) == ["victim"]
    taken = FileLog.take_over(logdir, "victim")
    assert taken is not None
    opened.append(taken)
    assert taken.pending()[g].branches == ("pg1", "maria")


# -- group commit and failures -------------------------------------------------------------
def test_group_commit_shares_fsyncs(
    logdir: Path, opened: list[FileLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(opened, logdir)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        # a disk as slow as a real one, so that waiters pile up behind the leader
        time.sleep(0.002)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    monkeypatch.setattr(os, "fdatasync", slow_fsync)  # the forced writes
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(20):
                log.log_commit(gtrid(t * 100 + i), ["pg1"])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert log.forced_records == 320
    assert 0 < log.forces < 320
    log = reopen(opened, log)
    assert len(log.pending()) == 320


def test_failed_fsync_breaks_the_log(
    logdir: Path,
    opened: list[FileLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = open_log(opened, logdir)
    log.log_commit(gtrid(1), ["pg1"])
    real_fsync = os.fsync
    failures = [OSError(5, "Input/output error")]

    def failing_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)

    monkeypatch.setattr(os, "fdatasync", failing_fsync)  # the forced writes
    with (
        caplog.at_level(logging.CRITICAL, logger="xatm.log"),
        pytest.raises(LogError) as excinfo,
    ):
        log.log_commit(gtrid(2), ["pg1"])
    # the record may or may not be on disk: not the "certainly not written" error
    assert not isinstance(excinfo.value, DecisionNotLogged)
    assert "Input/output error" in str(excinfo.value)
    assert log.broken
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    # fsync works again, but the log stays broken: what reached the disk is unknown
    with pytest.raises(DecisionNotLogged):
        log.log_commit(gtrid(3), ["pg1"])
    log.close()
    log = open_log(opened, logdir)
    assert not log.broken
    assert gtrid(1) in log.pending()
    assert gtrid(3) not in log.pending()


def test_broken_log_refuses_to_report_decisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the in-memory decisions may not match the disk: recovery must not
    act on them in this process."""
    import xatm.log.file as fl

    log = fl.FileLog(tmp_path, "n1")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)

    monkeypatch.setattr(os, "fdatasync", failing_fsync)  # the forced writes
    with pytest.raises(LogError):
        log.log_commit(new_gtrid("n1"), ["a", "b"])
    with pytest.raises(LogError, match="restart"):
        log.pending()
    monkeypatch.undo()
    log.close()


def test_group_commit_hands_flushes_to_one_flusher_that_stops_at_close(
    logdir: Path, opened: list[FileLog]
) -> None:
    """Concurrent committers share fsyncs; every COMMIT is durable when log_commit returns,
    the END records queued without the lock reach the disk, and close() stops the flusher
    thread that led the flushes records waited for."""
    log = open_log(opened, logdir)
    hammer(log, commits=40, end_unless_multiple_of=4, check_durable=True)
    assert log.forces < 8 * 40  # fsyncs were shared
    expected = {gtrid(t * 1000 + i) for t in range(8) for i in range(0, 40, 4)}
    assert set(log.pending()) == expected
    log.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("xatm-log-")]
    assert set(read_log(log.node_dir).pending) == expected  # the ENDs were written
