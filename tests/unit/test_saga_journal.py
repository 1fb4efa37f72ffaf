"""The file saga store's journal (``xatm.log.saga_journal``): sagas without a key, one
append-only file per process; moved out to files of their own when they leave their runner
unfinished or their process dies (a real process, SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import ROOT
from xatm.errors import LogError
from xatm.log import saga_journal
from xatm.log.saga_journal import JournalClaim, journal_id
from xatm.log.saga_record import SagaRecord
from xatm.log.saga_state import FileSagaStore


def new(store: FileSagaStore, name: str = "pay", **data: object) -> SagaRecord:
    return SagaRecord(store.new_id(name, None), name, None, "n1", "running", dict(data))


def journals(store: FileSagaStore, done: bool = False) -> list[Path]:
    return sorted((store.done_directory if done else store.directory).glob("*.journal"))


def test_sagas_without_a_key_share_one_journal_and_with_a_key_get_a_file(tmp_path: Path) -> None:
    store = FileSagaStore(tmp_path)
    a, b = new(store, n=1), new(store, n=2)
    assert journal_id(a.saga_id) == journal_id(b.saga_id) is not None
    ca, cb = store.create(a), store.create(b)
    assert isinstance(ca, JournalClaim) and isinstance(cb, JournalClaim)
    assert len(journals(store)) == 1 and list(store.directory.glob("*.saga")) == []
    store.save(ca, a.with_(done=("debit",)), force=False)
    got = store.get(a.saga_id)
    assert got is not None and got.done == ("debit",)
    assert {r.saga_id for r in store.records()} == {a.saga_id, b.saga_id}
    store.save(ca, a.with_(state="completed"), force=False)
    store.release(ca)
    assert [r.saga_id for r in store.records()] == [b.saga_id]
    keyed = SagaRecord(store.new_id("pay", "k1"), "pay", "k1", "n1", "running", {})
    assert store.create(keyed) is not None
    assert len(list(store.directory.glob("*.saga"))) == 1  # the key's claim is its file
    # another store (another process's) reads the live journal, without owning it
    other = FileSagaStore(tmp_path)
    assert {r.saga_id for r in other.records()} == {b.saga_id, keyed.saga_id}
    assert other.owner_alive(b) and other.adopt() == 0
    assert other.claim(b.saga_id) is None
    final = other.get(a.saga_id)
    assert final is not None and final.state == "completed"


def test_a_saga_left_unfinished_moves_out_to_a_file_of_its_own(tmp_path: Path) -> None:
    """As a stuck saga: its runner lets it go; anyone (an operator's CLI) can claim it."""
    store = FileSagaStore(tmp_path)
    record = new(store)
    claim = store.create(record)
    assert claim is not None
    stuck = record.with_(state="compensating", stuck=True)
    store.save(claim, stuck, force=True)
    store.release(claim)
    [path] = store.directory.glob("*.saga")
    got = store.get(record.saga_id)
    assert got is not None and got.stuck and not got.moved
    other = FileSagaStore(tmp_path)
    assert not other.owner_alive(got)
    taken = other.claim(record.saga_id)
    assert taken is not None and path.exists()
    assert [r.saga_id for r in other.records()] == [record.saga_id]  # listed once
    other.save(taken, got.with_(state="compensated", stuck=False), force=False)
    other.release(taken)
    assert store.records() == [] and other.records() == []


_CHILD = """
import json, os, signal, sys
from xatm.log.saga_state import FileSagaStore
from xatm.log.saga_record import SagaRecord
store = FileSagaStore(sys.argv[1])
ids = []
for n in range(3):
    record = SagaRecord(store.new_id("pay", None), "pay", None, "dead", "running", {"n": n})
    claim = store.create(record)
    if n == 0:
        store.save(claim, record.with_(state="completed"), force=False)
    if n == 1:  # a torn tail: half a frame, as a kill in the middle of a write leaves
        os.write(claim.journal.fd, b"\\x40\\x00\\x00\\x00garbage")
    ids.append(record.saga_id)
print(json.dumps(ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_dead_process_journal_is_adopted(tmp_path: Path) -> None:
    """SIGKILLed with three sagas (one completed; a torn frame at the end): recovery moves
    the unfinished ones to files of their own, where they are claimed, and retires the
    journal; a second adopter finds nothing left to do."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done, first, second = json.loads(proc.stdout)
    store = FileSagaStore(tmp_path)
    listed = store.records()  # read only: nothing moved yet
    assert {r.saga_id for r in listed} == {first} and len(journals(store)) == 1
    assert not store.owner_alive(listed[0])
    assert store.adopt() == 1  # the third saga is behind the torn frame: never durable
    assert journals(store) == [] and len(journals(store, done=True)) == 1
    assert [r.saga_id for r in store.records()] == [first]
    assert store.get(second) is None
    claim = store.claim(first)
    assert claim is not None
    record = store.read(claim)
    assert record is not None and record.data == {"n": 1}
    completed = store.get(done)
    assert completed is not None and completed.state == "completed"
    assert FileSagaStore(tmp_path).adopt() == 0


def test_a_journal_is_retired_once_closed_and_drained_and_pruned_later(tmp_path: Path) -> None:
    store = FileSagaStore(tmp_path)
    record = new(store)
    claim = store.create(record)
    assert claim is not None
    store.close()  # sealed; still held: its saga runs on
    assert len(journals(store)) == 1
    store.save(claim, record.with_(state="completed"), force=False)
    store.release(claim)
    assert journals(store) == [] and len(journals(store, done=True)) == 1
    got = FileSagaStore(tmp_path).get(record.saga_id)
    assert got is not None and got.final
    [path] = journals(store, done=True)
    os.utime(path, (1, 1))
    assert store.prune(60) == 1 and FileSagaStore(tmp_path).get(record.saga_id) is None


def test_an_outgrown_journal_gives_way_to_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saga_journal, "MAX_BYTES", 1)
    store = FileSagaStore(tmp_path)
    first = new(store)
    claim = store.create(first)
    second = new(store)
    assert journal_id(second.saga_id) != journal_id(first.saga_id)
    assert store.create(second) is not None
    assert len(journals(store)) == 2  # the first still runs a saga
    assert claim is not None
    store.save(claim, first.with_(state="compensated"), force=False)
    store.release(claim)
    assert len(journals(store)) == 1 and len(journals(store, done=True)) == 1


def test_concurrent_creations_share_fsyncs_and_all_land(tmp_path: Path) -> None:
    store = FileSagaStore(tmp_path)
    made: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(50):
            record = new(store)
            claim = store.create(record)
            assert claim is not None
            store.save(claim, record.with_(state="completed"), force=False)
            store.release(claim)
            with lock:
                made.append(record.saga_id)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 400
    everything = {r.saga_id: r for r in FileSagaStore(tmp_path).records(include_final=True)}
    assert set(everything) == set(made) and all(r.final for r in everything.values())


def test_a_failed_write_is_cut_off_and_reported(tmp_path: Path) -> None:
    store = FileSagaStore(tmp_path)
    record = new(store)
    claim = store.create(record)
    assert isinstance(claim, JournalClaim)
    size = os.fstat(claim.journal.fd).st_size
    os.close(claim.journal.fd)
    claim.journal.fd = os.open(os.devnull, os.O_RDONLY)  # every write fails now
    with pytest.raises(LogError, match="cannot write the saga record"):
        store.save(claim, record.with_(step="x"), force=False)
    assert claim.journal.broken  # its length is no longer known: nothing more goes there
    assert (journals(store)[0]).stat().st_size == size
    with pytest.raises(LogError, match="failed earlier"):
        store.save(claim, record.with_(step="y"), force=False)


def test_a_new_journal_is_named_only_once_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recoverer that finds a journal the moment it has its name cannot take it for a dead
    process's (the chaos run that found this: an empty journal adopted and retired between
    its creation and its writer's flock, its sagas then written to the retired file)."""
    store, recoverer = FileSagaStore(tmp_path), FileSagaStore(tmp_path)
    real_link = os.link
    adopted: list[int] = []

    def link_then_adopt(src: object, dst: object) -> None:
        real_link(src, dst)  # type: ignore[arg-type]
        if str(dst).endswith(".journal"):
            adopted.append(recoverer.adopt())

    monkeypatch.setattr(os, "link", link_then_adopt)
    record = new(store)
    assert store.create(record) is not None
    assert adopted == [0] and len(journals(store)) == 1 and journals(store, done=True) == []
    assert [r.saga_id for r in recoverer.records()] == [record.saga_id]
