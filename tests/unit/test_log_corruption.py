"""A damaged file log: a torn tail is ignored, corruption anywhere else refuses to start.

A crash can only tear the end of the newest segment. A bad frame anywhere else (an older
segment, followed by good frames, or a complete frame with a flipped bit) may have held
acknowledged COMMITs: opening raises LogCorrupt naming the file and offset and touches
nothing, unlocked readers report it, and ``salvage_log`` is the operator's audited way out.
No database server is needed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xatm import LogCorrupt
from xatm.admin import salvage_log
from xatm.core.records import HEADER, LogRecord, read_frames
from xatm.errors import LogLocked
from xatm.log.audit import read_audit
from xatm.log.file import MAGIC, FileLog, read_log, read_segments, scan_segment
from xatm.ops.inspect import Inspector

NODE = "node-c"


def gtrid(i: int) -> str:
    return f"xatm.{NODE}.{i:011x}{i:016x}"


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def opened() -> Iterator[list[FileLog]]:
    logs: list[FileLog] = []
    yield logs
    for log in logs:
        log.close()


def five_commits(logdir: Path) -> tuple[Path, list[tuple[int, int]]]:
    """A closed log whose one segment holds COMMITs 1..5: (segment, frame bounds)."""
    log = FileLog(logdir, NODE, retain=0)
    for i in range(1, 6):
        log.log_commit(gtrid(i), ["pg1", "maria"], {"pg1": 100 + i})
    log.close()
    (seg, _), *rest = log.segments()
    assert not rest
    data = seg.read_bytes()
    bounds, start = [], len(MAGIC)
    for end, _ in read_frames(data, start):
        bounds.append((start, end))
        start = end
    assert len(bounds) == 5
    return seg, bounds


def damage(seg: Path, offset: int, mask: int = 0x01) -> bytes:
    data = bytearray(seg.read_bytes())
    data[offset] ^= mask
    seg.write_bytes(bytes(data))
    return bytes(data)


def assert_refused(logdir: Path, seg: Path, offset: int, before: bytes) -> LogCorrupt:
    files = sorted(p.name for p in seg.parent.iterdir())
    with pytest.raises(LogCorrupt) as info:
        FileLog(logdir, NODE, retain=0)
    err = info.value
    assert err.path == str(seg) and err.offset == offset
    assert str(seg) in str(err) and f"offset {offset}" in str(err)
    assert "xatm log salvage" in str(err)
    # untouched: same bytes, no new segment, and the lock was released
    assert seg.read_bytes() == before
    assert sorted(p.name for p in seg.parent.iterdir()) == files
    with pytest.raises(LogCorrupt):  # not LogLocked: the refused open released its lock
        FileLog(logdir, NODE, wait_for_lock=False, retain=0)
    return err


@pytest.mark.parametrize("where", ["payload", "crc", "length"])
def test_bit_flip_in_the_middle_of_the_newest_segment_is_corruption(
    where: str, logdir: Path
) -> None:
    seg, bounds = five_commits(logdir)
    start, _ = bounds[1]
    offset = {"payload": start + HEADER.size + 7, "crc": start + 5, "length": start + 1}[where]
    before = damage(seg, offset, 0x10)
    assert_refused(logdir, seg, start, before)
    # the unlocked reader (inspection, dry runs, manual resolution) refuses too ...
    with pytest.raises(LogCorrupt):
        read_log(logdir / NODE)
    # ... or, asked not to be strict, reports it instead of dropping records silently
    snap = read_log(logdir / NODE, strict=False)
    (info,) = snap.segments
    assert info.corrupt is not None and info.size - info.torn_bytes == start


def test_bit_flip_in_the_last_frame_is_corruption(logdir: Path) -> None:
    """A complete last frame with a wrong CRC is no torn write: a tear leaves it short or
    zero-filled. Dropping it would lose the newest acknowledged COMMIT."""
    seg, bounds = five_commits(logdir)
    start, _ = bounds[-1]
    before = damage(seg, start + HEADER.size + 10, 0x04)
    err = assert_refused(logdir, seg, start, before)
    assert "checksum" in str(err)


def test_corruption_in_an_older_segment_is_refused(logdir: Path) -> None:
    node_dir = logdir / NODE
    node_dir.mkdir(parents=True)
    (node_dir / "lock").touch()
    first = MAGIC + b"".join(LogRecord("COMMIT", gtrid(i), ("pg1",), 1.0).encode() for i in (1, 2))
    # even a short (torn-looking) tail: only the newest segment may be torn
    older = node_dir / "seg-00000001.xlog"
    older.write_bytes(first[:-3])
    (node_dir / "seg-00000002.xlog").write_bytes(MAGIC + LogRecord("END", gtrid(1)).encode())
    bounds_end = len(MAGIC) + len(LogRecord("COMMIT", gtrid(1), ("pg1",), 1.0).encode())
    err = assert_refused(logdir, older, bounds_end, first[:-3])
    assert "not the newest" in str(err)
    with pytest.raises(LogCorrupt):
        read_segments(node_dir)


def test_torn_tails_are_still_ignored_and_cut(logdir: Path, opened: list[FileLog]) -> None:
    seg, bounds = five_commits(logdir)
    start, end = bounds[-1]
    data = seg.read_bytes()
    cases = {
        "short": data[: start + 5],
        "short-payload": data[: end - 4],
        "zero-filled": data + bytes(4096),
        "zeros-inside-the-last-frame": data[: start + HEADER.size + 3] + bytes(end - start - 11),
    }
    for name, content in cases.items():
        for old in seg.parent.glob("seg-*.xlog"):
            old.unlink()
        seg.write_bytes(content)
        log = FileLog(logdir, NODE, retain=0)
        opened.append(log)
        want = {gtrid(i) for i in range(1, 6)} - ({gtrid(5)} if name != "zero-filled" else set())
        assert set(log.pending()) == want, name
        log.close()
        assert not seg.exists()
        (only, _), *rest = log.segments()
        assert not rest
        seg = only


def test_a_segment_torn_while_being_created_holds_nothing(logdir: Path) -> None:
    node_dir = logdir / NODE
    node_dir.mkdir(parents=True)
    (node_dir / "lock").touch()
    (node_dir / "seg-00000001.xlog").write_bytes(
        MAGIC + LogRecord("COMMIT", gtrid(1), ("pg1",), 1.0).encode()
    )
    (node_dir / "seg-00000002.xlog").write_bytes(b"")  # not the newest, but empty
    (node_dir / "seg-00000003.xlog").write_bytes(MAGIC[:4])
    log = FileLog(logdir, NODE, retain=0)
    assert set(log.pending()) == {gtrid(1)}
    log.close()


def test_a_file_without_magic_followed_by_frames_is_corruption(logdir: Path) -> None:
    node_dir = logdir / NODE
    node_dir.mkdir(parents=True)
    (node_dir / "lock").touch()
    seg = node_dir / "seg-00000007.xlog"
    body = b"XATMLOG2\n" + LogRecord("COMMIT", gtrid(1), ("pg1",), 1.0).encode()
    seg.write_bytes(body)
    assert_refused(logdir, seg, 0, body)


def test_a_torn_tail_is_cut_before_the_next_segment_is_started(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If opening crashes after starting the next segment but before deleting the torn one,
    that one is no longer the newest: it must read as clean, so it is cut first."""
    seg, bounds = five_commits(logdir)
    seg.write_bytes(seg.read_bytes()[: bounds[-1][0] + 3])

    def crash(*args: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(FileLog, "_start_segment", crash)
    with pytest.raises(Exception, match="simulated crash"):
        FileLog(logdir, NODE, retain=0)
    monkeypatch.undo()
    assert seg.stat().st_size == bounds[-1][0]
    (seg.parent / "seg-00000099.xlog").write_bytes(MAGIC)  # the next one, started
    log = FileLog(logdir, NODE, retain=0)
    assert set(log.pending()) == {gtrid(i) for i in range(1, 5)}
    log.close()


def test_salvage_keeps_every_readable_record_and_the_old_files(logdir: Path) -> None:
    seg, bounds = five_commits(logdir)
    log = FileLog(logdir, NODE, retain=0)
    log.log_end(gtrid(4))
    log.close()
    seg = log.segments()[0][0]
    data = seg.read_bytes()
    bounds = []
    start = len(MAGIC)
    for end, _ in read_frames(data, start):
        bounds.append((start, end))
        start = end
    before = damage(seg, bounds[1][0] + HEADER.size + 3, 0x08)  # gtrid(2)'s COMMIT
    with pytest.raises(LogCorrupt):
        FileLog(logdir, NODE, retain=0)
    done = salvage_log(logdir, NODE, actor="cli:test", audit_node="ops-cli")
    assert done.kept == 3  # 1, 3 and 5: 2 was damaged, 4 has its END
    assert done.damaged == ((seg.name, bounds[1][0], bounds[1][1]),)
    assert done.moved_to is not None and (done.moved_to / seg.name).read_bytes() == before
    log = FileLog(logdir, NODE, retain=0)
    assert set(log.pending()) == {gtrid(1), gtrid(3), gtrid(5)}
    # a live owner blocks salvage
    with pytest.raises(LogLocked):
        salvage_log(logdir, NODE, actor="cli:test", audit_node="ops-cli")
    log.close()
    (entry,) = [e for e in read_audit(logdir) if e.action == "salvage"]
    assert entry.actor == "cli:test" and entry.node == "ops-cli" and seg.name in entry.reason


def test_inspector_logs_report_corruption(logdir: Path) -> None:
    seg, bounds = five_commits(logdir)
    damage(seg, bounds[2][0] + HEADER.size + 4)
    inspector = Inspector({}, logdir)
    (node,) = inspector.logs()
    assert node.segments[0].corrupt is not None
    assert node.to_json()["segments"][0]["corrupt"]
    (compaction,) = inspector.compact_logs()
    assert not compaction.compacted and "corrupt" in compaction.note


# -- the classification, property-tested --------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None)


def _record(i: int, kind: str, branches: list[str]) -> LogRecord:
    if kind == "END":
        return LogRecord("END", gtrid(i))
    return LogRecord("COMMIT", gtrid(i), tuple(branches), 1.5)


records = st.lists(
    st.builds(
        _record,
        st.integers(1, 10**6),
        st.sampled_from(["COMMIT", "END"]),
        st.lists(st.sampled_from(["pg1", "pg2", "maria"]), min_size=1, max_size=3, unique=True),
    ),
    min_size=2,
    max_size=8,
)


def scan(tmp: Path, data: bytes, newest: bool = True) -> tuple[str | None, list[LogRecord]]:
    path = tmp / "seg-00000001.xlog"
    path.write_bytes(data)
    result = scan_segment(path, newest=newest)
    return result.corrupt, list(result.records)


def _segment(recs: list[LogRecord]) -> tuple[bytes, list[int]]:
    data, starts = bytearray(MAGIC), []
    for r in recs:
        starts.append(len(data))
        data += r.encode()
    return bytes(data), starts


@PROPERTY
@given(records, st.data())
def test_a_tail_torn_anywhere_is_never_corruption(
    recs: list[LogRecord], data: st.DataObject
) -> None:
    segment, _ = _segment(recs)
    cut = data.draw(st.integers(0, len(segment)))
    zeros = data.draw(st.integers(0, 600))
    with tempfile.TemporaryDirectory() as tmp:
        corrupt, read = scan(Path(tmp), segment[:cut] + bytes(zeros))
    assert corrupt is None
    assert read == recs[: len(read)]  # a prefix: nothing after the tear is read


@PROPERTY
@given(records, st.data())
def test_a_flipped_bit_before_the_last_frame_is_always_corruption(
    recs: list[LogRecord], data: st.DataObject
) -> None:
    segment, starts = _segment(recs)
    offset = data.draw(st.integers(0, starts[-1] - 1))  # MAGIC included
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(segment)
    flipped[offset] ^= 1 << bit
    with tempfile.TemporaryDirectory() as tmp:
        corrupt, read = scan(Path(tmp), bytes(flipped))
        assert corrupt is not None, (offset, bit)
        # an older segment is never allowed a torn tail either
        assert scan(Path(tmp), segment[:-1], newest=False)[0] is not None
    assert read == recs[: len(read)]


@PROPERTY
@given(records, st.data())
def test_a_flipped_bit_in_the_last_records_checksum_or_payload_is_corruption(
    recs: list[LogRecord], data: st.DataObject
) -> None:
    segment, starts = _segment(recs)
    offset = data.draw(st.integers(starts[-1] + 4, len(segment) - 1))  # not its length field
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(segment)
    flipped[offset] ^= 1 << bit
    if flipped[offset] == 0:
        return  # a zero byte is what a torn write leaves: indistinguishable, by design
    unused = bytes(data.draw(st.integers(0, 4096)))  # the newest segment's preallocated tail
    with tempfile.TemporaryDirectory() as tmp:
        corrupt, _ = scan(Path(tmp), bytes(flipped) + unused)
    assert corrupt is not None, (offset, bit)


# -- preallocated segments: the newest one ends in zeros never written ----------------------


@PROPERTY
@given(records, st.integers(1, 4096))
def test_a_preallocated_tail_of_the_newest_segment_is_unused_space(
    recs: list[LogRecord], zeros: int
) -> None:
    segment, _ = _segment(recs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seg-00000001.xlog"
        path.write_bytes(segment + bytes(zeros))
        result = scan_segment(path, newest=True)
        # every record, nothing torn, nothing corrupt: the zeros are space never written
        assert (result.corrupt, list(result.records)) == (None, recs)
        assert (result.size, result.torn, result.unused) == (len(segment), 0, zeros)
        # an older segment was cut to its written length before a newer one began: zeros
        # at its end are damage
        assert scan_segment(path, newest=False).corrupt is not None


def test_a_killed_coordinators_preallocated_segment_reads_clean_everywhere(
    logdir: Path,
) -> None:
    """A segment left as a killed process left it (preallocated, never cut) is read with
    every record by the log, by unlocked readers and by salvage, with no torn or damaged
    bytes reported; reopening cuts the unused space off before starting a new segment."""
    log = FileLog(logdir, NODE, segment_bytes=64 * 1024, retain=0)
    for i in range(1, 6):
        log.log_commit(gtrid(i), ["pg1", "maria"])
    log.log_end(gtrid(1))
    log.flush()
    (seg, used), *rest = log.segments()
    assert not rest and seg.stat().st_size == 64 * 1024 > used  # preallocated
    # what a SIGKILL leaves: the file as it is now (close() would cut it)
    left = seg.read_bytes()
    log.close()
    seg.write_bytes(left)
    expected = {gtrid(i) for i in range(2, 6)}
    snap = read_log(logdir / NODE)
    assert set(snap.pending) == expected
    ((info),) = snap.segments
    assert (info.size, info.torn_bytes, info.corrupt) == (used, 0, None)
    reopened = FileLog(logdir, NODE, segment_bytes=64 * 1024, retain=0)
    try:
        assert set(reopened.pending()) == expected
    finally:
        reopened.close()
    seg.write_bytes(left)  # once more, for salvage
    for other in seg.parent.glob("seg-*.xlog"):
        if other != seg:
            other.unlink()
    done = salvage_log(logdir, NODE, actor="cli:test", audit_node="ops-cli")
    assert done.damaged == () and done.kept == 4


def test_rotation_and_close_cut_the_preallocated_space(logdir: Path) -> None:
    """Only the newest segment may end in zeros: the one a rotation leaves behind is cut to
    its written length before the next begins, and close() cuts the last one."""
    log = FileLog(logdir, NODE, segment_bytes=2048, retain=0)
    try:
        first = log.segments()[0][0]
        assert first.stat().st_size == 2048
        i = 0
        while first.exists() and i < 1000:
            i += 1
            log.log_commit(gtrid(i), ["pg1"])
            log.log_end(gtrid(i))
            if first.exists() and len(log.segments()) > 1:  # pragma: no cover - a race
                break
        (seg, used), *rest = log.segments()
        assert not rest and seg != first and seg.stat().st_size == 2048 > used
    finally:
        log.close()
    (seg, used), *rest = log.segments()
    assert not rest and seg.stat().st_size == used  # cut at close
    assert read_segments(logdir / NODE)[1] == [(seg, used, False)]
