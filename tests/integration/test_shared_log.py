"""A fleet sharing one coordinator log in PostgreSQL: commit, crash matrix, fencing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import xatm.core.decide
from tests.support import ROOT, Bank, MakeTM
from xatm import ConfigurationError, TransactionManager
from xatm.admin import FAILPOINTS
from xatm.core.xid import parse_gtrid


def worker(
    cfg: dict[str, object], tmp_path: Path, failpoint: str | None, wait: bool = True
) -> subprocess.Popen[str]:
    path = tmp_path / f"{cfg['node_id']}.json"
    path.write_text(json.dumps(cfg))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if failpoint:
        env["XATM_FAILPOINT"] = failpoint
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.worker", "transfer", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        proc.wait(timeout=120)
    return proc


def test_commit_and_rollback_with_the_shared_log(bank: Bank, make_tm: MakeTM, log_url: str) -> None:
    tm = make_tm(node_id="shared-a", log=log_url)
    assert tm.shared_log is not None
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 5 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 1")
    assert tm.shared_log.decisions([tx.gtrid])  # the decision is in the shared table
    with pytest.raises(RuntimeError), tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 5 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 1")
        raise RuntimeError("no")
    assert bank.balance("pg1") == 995 and bank.balance("maria") == 1005


def test_shared_log_refuses_commit_markers(log_url: str, bank: Bank) -> None:
    with pytest.raises(ConfigurationError, match="commit_markers"):
        TransactionManager(bank.urls, log_url, "m1", commit_markers=["pg1"])


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_two_coordinators_crash_and_a_third_host_recovers(
    failpoint: str, bank: Bank, make_tm: MakeTM, log_url: str, tmp_path: Path
) -> None:
    base = {"urls": bank.urls, "log": log_url, "table": bank.table, "journal": bank.journal}
    a = worker(
        {
            **base,
            "node_id": f"ca-{failpoint[:12]}",
            "resources": ["pg1", "maria"],
            "tid": f"a-{failpoint}",
        },
        tmp_path,
        failpoint,
    )
    b = worker(
        {
            **base,
            "node_id": f"cb-{failpoint[:12]}",
            "resources": ["pg2", "pg1", "maria"],
            "tid": f"b-{failpoint}",
            "account": 2,
        },
        tmp_path,
        failpoint,
    )
    assert a.returncode == b.returncode == -signal.SIGKILL
    bank.wait_for_dead_sessions()
    sweeper = make_tm(node_id="sweeper-host", log=log_url, sweeper=False)
    report = sweeper.recover()
    assert report.in_doubt == 0, report.actions
    journal = bank.journal_ids()
    for tid, resources in (
        (f"a-{failpoint}", ["pg1", "maria"]),
        (f"b-{failpoint}", ["pg2", "pg1", "maria"]),
    ):
        present = {r for r in resources if tid in journal[r]}
        if failpoint in ("after_decision", "after_first_commit"):
            assert present == set(resources)
        else:
            assert present == set()
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "T"


def start_paused(cfg: dict[str, object], tmp_path: Path) -> subprocess.Popen[str]:
    """A coordinator that stops itself (SIGSTOP) just before it writes its COMMIT."""
    proc = worker(cfg, tmp_path, "before_decision:stop", wait=False)
    wait_stopped(proc)
    return proc


def wait_stopped(proc: subprocess.Popen[str]) -> None:
    """Wait until ``proc`` has stopped itself at its failpoint."""
    deadline = time.monotonic() + 60
    while not _stopped(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_paused_coordinator_obeys_the_sweepers_abort(
    bank: Bank, make_tm: MakeTM, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP the coordinator just before it logs COMMIT, let a sweeper on another node abort
    the transaction once it is past its timeout, then SIGCONT: the late COMMIT loses."""
    base = {"urls": bank.urls, "log": log_url, "table": bank.table, "journal": bank.journal}
    cfg = {
        **base,
        "node_id": "paused",
        "resources": ["pg1", "maria"],
        "tid": "paused-1",
        "timeout": 1.0,
    }
    proc = start_paused(cfg, tmp_path)
    monkeypatch.setattr(xatm.core.decide, "SKEW", 0.0)
    time.sleep(1.2)  # past the transaction's timeout
    sweeper = make_tm(node_id="sweeper-host", log=log_url, timeout=1.0, sweeper=False)
    report = sweeper.recover()
    assert report.committed == 0
    assert report.rolled_back >= 1  # pg1's branch; maria's is held by the paused session
    assert sweeper.shared_log is not None
    assert any(
        isinstance(d, str) and d == "A"
        for d in sweeper.shared_log.decisions([a.gtrid for a in report.actions]).values()
    )
    proc.send_signal(signal.SIGCONT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "TransactionRolledBack" in err and "could not be logged" in err
    final = sweeper.recover()
    assert final.committed == 0 and final.in_doubt == 0
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_recovery_prunes_finished_decisions(bank: Bank, make_tm: MakeTM, log_url: str) -> None:
    """An ended COMMIT is kept for ``decision_retention`` seconds after its decision (a
    failover may bring its branch back), then pruned, the horizon raised past it."""
    keeper = make_tm(node_id="keeper", log=log_url, sweeper=False)  # the default retention
    tm = make_tm(node_id="pruner", log=log_url, sweeper=False, decision_retention=0)
    gtrids = []
    for manager in (keeper, tm):
        with manager.transaction() as tx:
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 3")
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 3")
        assert manager.shared_log is not None
        manager.shared_log.flush()  # the END
        gtrids.append(tx.gtrid)
    assert keeper.shared_log is not None and tm.shared_log is not None
    keeper.recover()  # within its retention: both ended COMMITs stay
    assert set(keeper.shared_log.decisions(gtrids)) == set(gtrids)
    tm.recover()  # retention 0: they go, and the horizon passes them
    assert tm.shared_log.decisions(gtrids) == {}
    assert tm.shared_log.horizon() >= max(parse_gtrid(g)[1] for g in gtrids)


def test_concurrent_sweepers_resolve_once_and_survive_one_dying(
    bank: Bank, make_tm: MakeTM, log_url: str, tmp_path: Path
) -> None:
    """Two hosts sweep the same shared log: one resolves while it holds the fleet-wide
    sweeper lock, the other skips; when the first goes away, the second takes over."""
    base = {"urls": bank.urls, "log": log_url, "table": bank.table, "journal": bank.journal}
    proc = worker(
        {**base, "node_id": "gone-1", "resources": ["pg1", "maria"], "tid": "s-1", "account": 4},
        tmp_path,
        "after_decision",
    )
    assert proc.returncode == -signal.SIGKILL
    bank.wait_for_dead_sessions()
    first = make_tm(node_id="sweep-a", log=log_url, sweeper=False)
    second = make_tm(node_id="sweep-b", log=log_url, sweeper=False)
    assert first.shared_log is not None and second.shared_log is not None
    assert first.shared_log.try_sweep_lock()  # first is in the middle of a pass
    skipped = second.recover()
    assert (skipped.committed, skipped.rolled_back) == (0, 0)
    assert len(bank.xatm_prepared_on("maria")) == 1
    first.close()  # the first sweeper dies: its session, and so its lock, is gone
    report = second.recover()
    assert report.committed == 2
    assert bank.journal_ids()["maria"] == bank.journal_ids()["pg1"] == {"s-1"}
    assert bank.total() == bank.initial_total


def test_a_longer_per_transaction_timeout_is_left_to_its_live_coordinator(
    bank: Bank, make_tm: MakeTM, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction given more time than its manager's default carries that in its gtrid:
    another host's sweeper does not abort it by age while its coordinator lives."""
    base = {"urls": bank.urls, "log": log_url, "table": bank.table, "journal": bank.journal}
    cfg = {
        **base,
        "node_id": "patient",
        "resources": ["pg1", "maria"],
        "tid": "long-1",
        "timeout": 1.0,
        "tx_timeout": 120.0,
        "account": 3,
    }
    proc = start_paused(cfg, tmp_path)
    monkeypatch.setattr(xatm.core.decide, "SKEW", 0.0)
    time.sleep(1.2)  # past the managers' default timeout, well within its own
    sweeper = make_tm(node_id="sweeper-host", log=log_url, timeout=1.0, sweeper=False)
    report = sweeper.recover()
    assert report.rolled_back == 0 and report.committed == 0
    assert all("alive" in a.reason for a in report.actions if a.action == "skip")
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"committed"' in out
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"long-1"}
    assert bank.total() == bank.initial_total


def test_a_frozen_commit_batch_does_not_stall_recovery(
    bank: Bank, make_tm: MakeTM, log_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator SIGSTOPped inside a group-commit batch (its COMMIT row inserted, not
    committed) holds that row's lock. Another host's sweeper must not wait on it while it
    holds the fleet-wide sweeper lock: the conditional ABORT gives up after the log's
    lock_timeout, the gtrid is left for a later pass, and the pass ends. When the coordinator
    resumes, its COMMIT (which nobody fenced) holds."""
    # keep the frozen batch open however long this takes (see idle_in_transaction_... in
    # xatm.log.shared): the point here is a batch that stays open
    frozen_log = log_url + "?options=-c%20idle_in_transaction_session_timeout%3D0"
    cfg = {
        "urls": bank.urls,
        "log": frozen_log,
        "table": bank.table,
        "journal": bank.journal,
        "node_id": "frozen",
        "resources": ["pg1", "maria"],
        "tid": "frozen-1",
        "timeout": 1.0,
        "account": 2,
    }
    proc = worker(cfg, tmp_path, "commit_batch_open:stop", wait=False)
    try:
        wait_stopped(proc)
        monkeypatch.setattr(xatm.core.decide, "SKEW", 0.0)
        time.sleep(1.2)  # past the transaction's timeout: the sweeper tries to abort it
        sweeper = make_tm(node_id="sweeper-host", log=log_url, timeout=1.0, sweeper=False)
        reports: list[xatm.recovery.run.RecoveryReport] = []
        pass_thread = threading.Thread(target=lambda: reports.append(sweeper.recover()))
        pass_thread.start()
        pass_thread.join(timeout=60)  # a liveness bound, not a measurement
        if pass_thread.is_alive():
            proc.send_signal(signal.SIGCONT)
            pass_thread.join()
            pytest.fail("the recovery pass waited on the frozen coordinator's COMMIT batch")
        (report,) = reports
        assert (report.committed, report.rolled_back) == (0, 0), report.actions
        skipped = [a for a in report.actions if a.action == "skip"]
        assert len(skipped) == 2 and report.in_doubt == 2
        assert all("being written" in a.reason for a in skipped), skipped
        assert len(bank.xatm_prepared_on("pg1")) == 1
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"committed"' in out  # nobody fenced it: its COMMIT holds
    final = sweeper.recover()
    assert final.in_doubt == 0 and final.rolled_back == 0, final.actions
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"frozen-1"}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
