"""SIGKILL the coordinator at every protocol step, then recover: all-or-nothing, by the log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.field_support import roll_back_leftovers
from tests.support import Bank, prepare_foreign, resolve_foreign, run
from xatm import TransactionManager
from xatm.admin import FAILPOINTS

ROOT = Path(__file__).resolve().parent.parent
MakeTM = Callable[..., TransactionManager]
COMMITTED_AFTER = {"after_decision", "after_first_commit"}


def run_worker(
    mode: str, cfg: dict[str, object], tmp_path: Path, failpoint: str | None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{mode}-{cfg['node_id']}.json"
    path.write_text(json.dumps(cfg))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if failpoint:
        env["XATM_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "tests.worker", mode, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def foreign(bank: Bank) -> object:
    for name, url in bank.urls.items():
        prepare_foreign(url, f"matrix-{name}")
    yield
    for name, url in bank.urls.items():
        resolve_foreign(url, f"matrix-{name}")


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


def crash_and_recover(
    failpoint: str,
    resources: tuple[str, ...],
    recover_as: str,
    markers: list[str],
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
) -> None:
    """Run one transfer in a worker killed at ``failpoint``, recover, check the books."""
    mode = "marker" if markers else "strict"
    log = tmp_path / "log"
    cfg = {
        "urls": bank.urls,
        "log": str(log),
        "node_id": "crashy",
        "table": bank.table,
        "journal": bank.journal,
        "resources": list(resources),
        "tid": f"crash-{failpoint}",
        "commit_markers": markers,
    }
    proc = run_worker("transfer", cfg, tmp_path, failpoint)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the killed coordinator's MariaDB session may still be running its last XA COMMIT
    # (after_first_commit): count the prepared branches once it is gone
    bank.wait_for_dead_sessions()
    n = len(resources)
    preparable = n if mode == "strict" else n - 1

    prepared = bank.xatm_prepared()
    left = sum(len(v) for v in prepared.values())
    if failpoint == "before_prepare":
        assert left == 0
    elif failpoint in ("after_prepare", "after_decision"):
        assert left == preparable
        assert len({x.gtrid for v in prepared.values() for x in v}) == 1
    else:  # after_first_commit: one branch committed, the others still prepared (some may
        assert left <= preparable - 1  # have been committed by the parallel phase 2 too)
    node = "crashy" if recover_as == "restarted" else "other"
    bank.wait_for_dead_sessions()
    tm = make_tm(node_id=node, log=log)
    report = tm.recover()
    assert report.unreachable == ()
    assert report.in_doubt == 0
    if failpoint in COMMITTED_AFTER:
        assert report.committed == left and report.rolled_back == 0
    else:
        assert report.rolled_back == left and report.committed == 0

    # all or nothing, as the log says
    journal = bank.journal_ids()
    tid = cfg["tid"]
    present = {r for r in resources if tid in journal[r]}
    if failpoint in COMMITTED_AFTER:
        assert present == set(resources)
        b = bank.balances()
        assert b[resources[0]][1] == 1000 - 10 * (n - 1)
        assert all(b[r][1] == 1010 for r in resources[1:])
    else:
        assert present == set()
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    # foreign prepared transactions are still there
    everything = bank.prepared()
    assert "foreign-matrix-pg1" in everything["pg1"]
    assert "foreign-matrix-pg2" in everything["pg2"]
    assert len([x for x in everything["maria"] if isinstance(x, str)]) >= 1
    # a second pass finds nothing to do, and the decision was closed with END
    again = tm.recover()
    assert (again.committed, again.rolled_back, again.in_doubt) == (0, 0, 0)
    if mode == "marker":  # the decision row is deleted once every branch is finished
        rows = run(
            bank.conns[markers[0]],
            "SELECT gtrid FROM xatm_decisions WHERE gtrid LIKE %s AND branches <> %s",
            ("xatm.crashy.%", '{"abort":1}'),  # recovery's abort fences stay a while
        )
        assert rows == []
    if recover_as == "restarted":
        assert tm._ctx.log.pending() == {}  # END appended (lazily)
    else:
        from xatm.log.file import read_segments

        pending, _ = read_segments(log / "crashy")  # the peer log was closed: END on disk
        assert pending == {}


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
