"""A full disk under the coordinator log, against the real servers and a real small file
system (a 4 MiB tmpfs mounted for the test; it needs root, as CI has, and skips otherwise).

What a user must be able to rely on: while the disk is full, a transfer either commits on
every branch or on none; a transfer acknowledged before (or while the preallocated segment
still had room) is never lost; a transfer whose decision could not be forced is in doubt and
settled by what the disk holds; nothing is left prepared once the disk has room again and the
coordinator restarts; and the log works again after that.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, journaled_transfer
from xatm.errors import LogError, TransactionInDoubt, TransactionRolledBack


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the log needs root (CI runs as root)")
    where = tmp_path / "small"
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Write a file until the file system refuses (ENOSPC); returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"x" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_under_the_log_splits_nothing_and_loses_nothing(
    bank: Bank, make_tm: MakeTM, small_disk: Path
) -> None:
    log = small_disk / "log"
    options = {
        "node_id": "full",
        "log": log,
        "segment_bytes": 32 * 1024,
        "sweeper": False,
        "timeout": 3.0,  # an in-doubt transfer holds row 1: later ones wait at most this
    }
    tm = make_tm(**options)
    outcome: dict[str, str] = {}

    def attempt(tid: str) -> None:
        try:
            journaled_transfer(tm, bank, tid)
        except TransactionInDoubt:
            outcome[tid] = "in doubt"
        except TransactionRolledBack:
            outcome[tid] = "rolled back"
        except Exception:  # a statement failed (row 1 is held by one in doubt): rolled back
            outcome[tid] = "rolled back"
        else:
            outcome[tid] = "acked"

    for i in range(5):
        attempt(f"before-{i}")
    filler = fill(small_disk)
    # the segment was preallocated: its room is still there; a new segment is not
    for i in range(400):
        attempt(f"full-{i}")
        if outcome[f"full-{i}"] != "acked":
            break
    for i in range(2):  # the log is broken now: refused (or waiting on row 1, held in doubt)
        attempt(f"broken-{i}")
        assert outcome[f"broken-{i}"] == "rolled back"
    kinds = set(outcome.values())
    assert "acked" in kinds  # the preallocated segment kept the log going for a while
    assert kinds & {"in doubt", "rolled back"}, outcome  # then the full disk showed
    with pytest.raises(LogError):
        tm.recover()  # a broken log is not acted on: its in-memory view may not be on disk
    tm.close()

    # room again, the coordinator restarts: it reads what the disk holds and settles the rest
    filler.unlink()
    tm = make_tm(**options)
    tm.recover()
    on = bank.journal_ids()
    for tid, what in outcome.items():
        both, none = tid in on["pg1"] and tid in on["maria"], not (on["pg1"] | on["maria"]) & {tid}
        assert both or none, f"{tid} ({what}) is on one side only: split"
        if what == "acked":
            assert both, f"{tid} was acknowledged and is lost"
        if what == "rolled back":
            assert none, f"{tid} was reported rolled back and is there"
    assert not any(bank.xatm_prepared().values()), bank.xatm_prepared()
    assert bank.total() == bank.initial_total
    attempt("after")
    assert outcome["after"] == "acked"  # the log works again
