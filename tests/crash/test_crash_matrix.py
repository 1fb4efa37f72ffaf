"""SIGKILL the coordinator at every protocol step, then recover: all-or-nothing, by the log."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers, run
from tests.support.crash import crash_and_recover, run_worker
from tests.support.field import roll_back_leftovers
from xatm.admin import FAILPOINTS


@pytest.mark.parametrize("mode", ["strict", "marker"])
@pytest.mark.parametrize("recover_as", ["restarted", "peer"])
@pytest.mark.parametrize(
    "resources", [("pg1", "maria"), ("pg1", "pg2", "maria")], ids=["2-branches", "3-branches"]
)
@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_crash_at_failpoint_then_recover(
    failpoint: str,
    resources: tuple[str, ...],
    recover_as: str,
    mode: str,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    foreign: object,
) -> None:
    # marker mode: pg1 carries the decision (committed in one phase, never prepared)
    markers = ["pg1"] if mode == "marker" else []
    crash_and_recover(failpoint, resources, recover_as, markers, bank, make_tm, tmp_path)


def maria_marker_cases() -> list[object]:
    cases = []
    for failpoint in FAILPOINTS:
        for ident, resources in (
            ("2-branches", ("pg1", "maria")),
            ("3-branches", ("pg1", "pg2", "maria")),
        ):
            for recover_as in ("restarted", "peer"):
                cases.append(
                    pytest.param(
                        failpoint, resources, recover_as, id=f"{failpoint}-{ident}-{recover_as}"
                    )
                )
    return cases


@pytest.fixture
def maria_markers(bank: Bank) -> Iterator[None]:
    """The MariaDB decision table exists only for these tests (recovery reads every
    resource that has one); what a failing case left prepared is rolled back."""
    yield
    roll_back_leftovers(bank, {"crashy"})
    run(bank.conns["maria"], "DROP TABLE IF EXISTS xatm_decisions")


@pytest.mark.parametrize(("failpoint", "resources", "recover_as"), maria_marker_cases())
def test_crash_with_the_commit_marker_on_mariadb(
    failpoint: str,
    resources: tuple[str, ...],
    recover_as: str,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    foreign: object,
    maria_markers: None,
) -> None:
    """The crash matrix's marker mode with the decision row on MariaDB: maria's branch is
    committed in one phase with the row, the PostgreSQL branches are prepared."""
    crash_and_recover(failpoint, resources, recover_as, ["maria"], bank, make_tm, tmp_path)


def test_restarted_coordinator_with_live_log_owner_is_left_alone(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A peer whose log lock is held (alive) is never touched by another node's recovery."""
    log = tmp_path / "log"
    cfg = {
        "urls": bank.urls,
        "log": str(log),
        "node_id": "crashy",
        "table": bank.table,
        "journal": bank.journal,
        "resources": ["pg1", "maria"],
        "tid": "alive-1",
    }
    proc = run_worker("transfer", cfg, tmp_path, "after_decision")
    assert proc.returncode == -signal.SIGKILL
    holder = make_tm(node_id="crashy", log=log)  # the owner is back (holds the lock) ...
    other = make_tm(node_id="other", log=log)
    report = other.recover()  # ... so another node leaves its branches alone
    assert report.committed == report.rolled_back == 0
    assert report.in_doubt == 2
    assert all(a.action == "skip" and "alive" in a.reason for a in report.actions)
    own = holder.recover()  # and the owner resolves them by its log
    assert own.committed == 2
    assert bank.journal_ids()["maria"] == {"alive-1"}
    assert bank.total() == bank.initial_total


def test_presumed_abort_waits_for_an_unread_marker_resource(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A recoverer that does not know pg1 carries decision rows, and cannot reach pg1, must
    not presume abort: the decision may be a row there."""
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    log = tmp_path / "log"
    cfg = {
        "urls": bank.urls,
        "log": str(log),
        "node_id": "crashy",
        "table": bank.table,
        "journal": bank.journal,
        "resources": ["pg1", "maria"],
        "tid": "unread-1",
        "commit_markers": ["pg1"],
    }
    proc = run_worker("transfer", cfg, tmp_path, "after_decision")
    assert proc.returncode == -signal.SIGKILL
    servers.set.pg1.stop()
    try:
        tm = make_tm(node_id="other", log=log, sweeper=False)  # no commit_markers configured
        report = tm.recover()
        assert report.rolled_back == 0
        assert report.in_doubt == 1
        assert len(bank.xatm_prepared_on("maria")) == 1
    finally:
        servers.set.pg1.start()
    bank.reconnect("pg1")
    report = tm.recover()
    assert report.committed == 1 and report.rolled_back == 0
    assert bank.journal_ids()["maria"] == bank.journal_ids()["pg1"] == {"unread-1"}
    assert bank.total() == bank.initial_total
