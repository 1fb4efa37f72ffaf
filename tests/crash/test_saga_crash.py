"""The saga crash matrix: SIGKILL a saga's process at every saga failpoint, then recover it
as the same node (restarted) and as a peer, on the file log and on the shared log. Every saga
must end completed or compensated, no step applied twice, money conserved."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Bank, MakeTM, saga_defs
from tests.support.crash import run_saga_worker
from xatm import TransactionManager, XatmError
from xatm.core.failpoint import SAGA_NAMES
from xatm.log.saga_journal import journal_id

SAGAS = [saga_defs.transfer, saga_defs.both, saga_defs.single]


def build(make_tm: MakeTM, node: str, log: str, tries: float = 15.0) -> TransactionManager:
    """A manager of ``node`` (the killed one's session may linger a moment in the shared log)."""
    deadline = time.monotonic() + tries
    while True:
        try:
            return make_tm(node_id=node, log=log, sweeper=False, sagas=SAGAS)
        except XatmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def recover_until_final(tm: TransactionManager, saga_id: str) -> Any:
    """Recovery passes until the saga is final: a dead owner's session (shared log) or
    MariaDB session may take a moment to go; a pass leaves it meanwhile."""
    deadline = time.monotonic() + 30
    while True:
        tm.recover()
        record = tm.saga(saga_id)
        assert record is not None
        if record.final or time.monotonic() > deadline:
            return record
        time.sleep(0.1)


def saga_ids(tm: TransactionManager) -> list[str]:
    return [r.saga_id for r in tm.sagas.store.records(include_final=True)]


@pytest.mark.parametrize("log_kind", ["file", "file-keyless", "shared"])
@pytest.mark.parametrize("recover_as", ["restarted", "peer"])
@pytest.mark.parametrize(
    ("failpoint", "saga"),
    [(f, s) for f in SAGA_NAMES for s in ("transfer", "both")]
    # inside the two-phase commit of the step over two databases
    + [(f"2pc:{f}", "both") for f in ("after_prepare", "after_decision", "after_first_commit")],
)
def test_saga_crash_then_recover(
    failpoint: str,
    saga: str,
    recover_as: str,
    log_kind: str,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    log_url: str,
    request: pytest.FixtureRequest,
) -> None:
    """``file-keyless``: the saga has no key, so its record is in its process's journal
    (``xatm.log.saga_journal``), which recovery adopts after the SIGKILL."""
    failpoint = failpoint.removeprefix("2pc:")
    keyless = log_kind == "file-keyless"
    if log_kind != "shared":
        log = str(tmp_path / "log")
        node = "crashy"
    else:  # a node name of its own per test: the shared log outlives the test
        log = log_url
        node = f"c{abs(hash(request.node.name)) % 10**8}"
    abort = failpoint == "saga_after_compensation"
    tid = "cr-x"
    data = {
        "table": bank.table,
        "journal": bank.journal,
        "tid": tid,
        "src": 1,
        "dst": 2,
        "amt": 5,
        "abort": abort,
    }
    key = None if keyless else f"{node}-{failpoint}-{saga}"
    cfg = {"urls": bank.urls, "log": log, "node_id": node, "saga": saga, "data": data, "key": key}
    proc = run_saga_worker(cfg, tmp_path, failpoint)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    bank.wait_for_dead_sessions()

    tm = build(make_tm, node if recover_as == "restarted" else f"{node}p", log)
    if key is None:  # the dead process's journal, read before recovery adopts it
        [found] = tm.sagas.store.records()
        assert journal_id(found.saga_id) is not None
    else:
        found = tm.sagas.store.find_key(saga, key)
    assert found is not None and not found.final
    record = recover_until_final(tm, found.saga_id)
    expected = "compensated" if abort else "completed"
    assert record.state == expected, record

    # every step's effect exactly once (the journal's keys would refuse a second one)
    journal = bank.journal_ids()
    mine = {
        n: {t.split("-", 2)[2] for t in ids if t.startswith(tid + "-")}
        for n, ids in journal.items()
    }
    if abort:
        assert mine == {"pg1": {"debit", "refund"}, "pg2": set(), "maria": {"credit", "uncredit"}}
        assert (bank.balance("pg1", 1), bank.balance("maria", 2)) == (1000, 1000)
    else:
        assert mine == {"pg1": {"debit", "finish"}, "pg2": set(), "maria": {"credit"}}
        assert (bank.balance("pg1", 1), bank.balance("maria", 2)) == (995, 1005)
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}

    # the key still answers with that run's result, and nothing runs again
    if key is not None:
        again = tm.run_saga(saga, data=data, key=key)
        assert (again.saga_id, again.state) == (record.saga_id, expected)
    assert tm.recover_sagas().finished == ()
    assert tm.sagas.store.records() == []
    actions = [e.action for e in tm.sagas.history(record.saga_id)]
    assert "saga-takeover" in actions or recover_as == "restarted"
    assert actions[-1] == "saga-end"


@pytest.mark.parametrize("log_kind", ["file", "shared"])
@pytest.mark.parametrize("recover_as", ["restarted", "peer"])
def test_a_crash_between_the_last_step_and_the_end(
    recover_as: str,
    log_kind: str,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    log_url: str,
    request: pytest.FixtureRequest,
) -> None:
    """The last step's note and the saga's end are one write, not forced. SIGKILL after the
    last step committed, before that write: the record says running with no step done;
    recovery runs the step again, its barrier skips it (a duplicate) and the saga ends
    completed, the step applied once; the key answers with that result."""
    if log_kind == "file":
        log, node = str(tmp_path / "log"), "lastcrash"
    else:  # a node name of its own per test: the shared log outlives the test
        log, node = log_url, f"l{abs(hash(request.node.name)) % 10**8}"
    tid = "cr-last"
    data = {"table": bank.table, "journal": bank.journal, "tid": tid, "src": 1, "dst": 2, "amt": 5}
    key = f"{node}-last"
    cfg = {"urls": bank.urls, "log": log, "node_id": node, "saga": "single", "data": data}
    proc = run_saga_worker({**cfg, "key": key}, tmp_path, "saga_after_step")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    bank.wait_for_dead_sessions()
    assert (bank.balance("pg1", 1), bank.balance("maria", 2)) == (995, 1005)  # committed

    tm = build(make_tm, node if recover_as == "restarted" else f"{node}p", log)
    found = tm.sagas.store.find_key("single", key)
    assert found is not None and (found.state, found.done) == ("running", ())
    record = recover_until_final(tm, found.saga_id)
    assert (record.state, record.done) == ("completed", ("move",)), record
    journal = bank.journal_ids()
    mine = {
        n: {t.split("-", 2)[2] for t in ids if t.startswith(tid + "-")}
        for n, ids in journal.items()
    }
    assert mine == {"pg1": {"debit"}, "pg2": set(), "maria": {"credit"}}
    assert (bank.balance("pg1", 1), bank.balance("maria", 2)) == (995, 1005)
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    again = tm.run_saga("single", data=data, key=key)
    assert (again.saga_id, again.state, again.done) == (record.saga_id, "completed", ("move",))
    history = tm.sagas.history(record.saga_id)
    assert any(e.action == "saga-action" and "duplicate" in e.reason for e in history)
    assert history[-1].action == "saga-end"


def test_a_new_run_of_the_key_finishes_a_dead_run(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """No recovery pass: the caller retries with the same key, from another process, and
    that call finishes the dead run (once) and returns its result."""
    log = str(tmp_path / "log")
    data = {"table": bank.table, "journal": bank.journal, "tid": "rk", "src": 1, "dst": 2, "amt": 5}
    cfg = {
        "urls": bank.urls,
        "log": log,
        "node_id": "dead",
        "saga": "transfer",
        "data": data,
        "key": "rk",
    }
    proc = run_saga_worker(cfg, tmp_path, "saga_after_step")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    bank.wait_for_dead_sessions()
    tm = make_tm(node_id="retry", log=log, sweeper=False, sagas=SAGAS)
    result = tm.run_saga("transfer", data=data, key="rk")
    assert result.state == "completed"
    assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005


def test_a_live_owners_saga_is_left_to_it(bank: Bank, make_tm: MakeTM, tmp_path: Path) -> None:
    """A saga paused in a live process (SIGSTOP at a failpoint) is not touched by another
    node's recovery, and a second run of its key waits, then says it is still running."""
    log = str(tmp_path / "log")
    data = {"table": bank.table, "journal": bank.journal, "tid": "lv", "src": 1, "dst": 2, "amt": 5}
    cfg = {
        "urls": bank.urls,
        "log": log,
        "node_id": "live",
        "saga": "transfer",
        "data": data,
        "key": "lv",
    }
    path = tmp_path / "live.json"
    path.write_text(json.dumps(cfg))
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "XATM_FAILPOINT": "saga_after_step:stop",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.saga_worker", "one", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tm = make_tm(node_id="other", log=log, sweeper=False, sagas=SAGAS)
        deadline = time.monotonic() + 60
        while tm.sagas.store.find_key("transfer", "lv") is None or (bank.balance("pg1", 1) != 995):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        report = tm.recover_sagas()
        assert report.finished == () and "alive" in report.left[0][1]
        from xatm import SagaInProgress

        with pytest.raises(SagaInProgress):
            tm.run_saga("transfer", data=data, key="lv", wait=0.2)
        from xatm.admin import SagaRefused

        with pytest.raises(SagaRefused, match="live process"):
            tm.saga_action(report.left[0][0], "retry")
    finally:
        # it stops again after each step (the failpoint fires at every hit): resume it
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["state"] == "completed"
    assert bank.balance("maria", 2) == 1005
