"""Bounded waits: in-doubt branches holding row locks must not exhaust PostgreSQL, and
recovery must get in even when the server is full (issue 8, item 10).

A private cluster with a small ``max_connections``: a coordinator dies with its branches
prepared (row 1 locked on both databases), then coordinator processes whose threads all
wait on that row fill every connection the role may have, and are SIGKILLed. Their
backends keep waiting for a lock that only recovery can release, on behalf of clients that
are gone; xatm's ``lock_timeout`` (derived from the transaction timeout) ends those waits,
and a recovery connection kept by a running manager gets in while the server is full.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import ROOT, Servers
from xatm import TransactionManager
from xatm.core.urls import pg_settings_in
from xatm.recovery.run import run_pass
from xatm.testing import servers as devservers

MAX_CONNECTIONS = 20  # superuser_reserved_connections (3) of them are not for role xatm
TABLE, JOURNAL = "acc", "acc_j"


@pytest.fixture(scope="module")
def small_pg(servers: Servers) -> Iterator[devservers.PostgresServer]:
    if servers.set is None:
        pytest.skip("external servers: no private cluster with a small max_connections")
    base = devservers.make_basedir("xatm-test-small-")
    server = devservers.start_postgres(base, "pgsmall", max_connections=MAX_CONNECTIONS)
    try:
        server.create_database("xatm2")
        for db in ("xatm", "xatm2"):
            with psycopg.connect(server.url(db), autocommit=True) as conn:
                conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, bal int NOT NULL)")
                conn.execute(f"INSERT INTO {TABLE} SELECT g, 1000 FROM generate_series(1, 4) g")
                conn.execute(f"CREATE TABLE {JOURNAL} (tid text NOT NULL)")
        yield server
    finally:
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


def _spawn(
    module: str, args: list[str], cfg: dict[str, Any], path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", module, *args, str(path)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until(what: str, cond: Callable[[], bool], bound: float = 120.0) -> None:
    """Wait for ``cond`` (a liveness bound, not a measurement)."""
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.1)


def _count(admin: psycopg.Connection[Any], where: str) -> int:
    row = admin.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = 'xatm' AND {where}"
    ).fetchone()
    return int(row[0]) if row else 0


def _full(url: str) -> bool:
    """True if role xatm cannot open one more connection."""
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as e:
        if "too many clients" in str(e) or "remaining connection slots" in str(e):
            return True  # 53300, as a non-superuser sees it on PostgreSQL 15 and older
        raise
    return False


def test_a_crash_under_row_contention_does_not_lock_recovery_out(
    small_pg: devservers.PostgresServer, tmp_path: Path
) -> None:
    urls = {"a": small_pg.url("xatm"), "b": small_pg.url("xatm2")}
    log = str(tmp_path / "log")
    # an operator's superuser session (superuser_reserved_connections): only to watch
    admin = psycopg.connect(small_pg.admin_dsn("xatm"), autocommit=True)
    survivor = TransactionManager(urls, log, "survivor", timeout=30, sweeper=False)
    procs: list[subprocess.Popen[str]] = []
    try:
        # a running manager keeps one recovery connection per resource
        _until("the survivor's recovery connections", lambda: _count(admin, "true") >= 2)

        # a coordinator dies with both branches prepared: row 1 locked on a and on b
        base = {"urls": urls, "log": log, "table": TABLE, "journal": JOURNAL}
        crashed = _spawn(
            "tests.workers.worker",
            ["transfer"],
            {**base, "node_id": "crashed", "resources": ["a", "b"], "tid": "t-0"},
            tmp_path / "crashed.json",
            {"XATM_FAILPOINT": "after_prepare"},
        )
        crashed.wait(timeout=120)
        assert crashed.returncode == -signal.SIGKILL, crashed.communicate()

        # coordinators whose threads all wait on row 1 take every connection left
        for i in range(3):
            cfg = {**base, "node_id": f"busy-{i}", "threads": 6, "timeout": 3, "account": 1}
            procs.append(
                _spawn("tests.workers.contend_worker", [], cfg, tmp_path / f"busy-{i}.json")
            )
        _until("the server to be full", lambda: _full(urls["a"]))
        # their waits end at their lock_timeout and start again: watched, not sampled once
        _until("a backend waiting on row 1", lambda: _count(admin, "wait_event_type = 'Lock'") > 0)

        # while it is full, the survivor's recovery still gets in (here: b only, so that
        # row 1 on a stays locked for what follows)
        report = run_pass(survivor._ctx, resources=lambda: ["b"])
        assert report.unreachable == () and report.rolled_back == 1, report.problems

        for proc in procs:
            proc.kill()
            proc.wait()
        # their backends were waiting on row 1 of a, which is still locked by the in-doubt
        # branch: only lock_timeout can end those waits (the clients are gone)
        _until(
            "the dead coordinators' waiting backends to go",
            lambda: _count(admin, "wait_event_type = 'Lock'") == 0,
        )
        assert len(admin.execute("SELECT gid FROM pg_prepared_xacts").fetchall()) == 1

        # a new process (as `xatm recover` is) connects and settles the rest: no restart
        with TransactionManager(urls, log, "operator", sweeper=False) as fresh:
            final = fresh.recover()
        assert final.unreachable == () and final.rolled_back == 1, final.problems
        assert admin.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        survivor.close()
        admin.close()


def test_each_branch_bounds_its_lock_waits_unless_the_url_says_otherwise(
    servers: Servers, make_tm: Callable[..., TransactionManager]
) -> None:
    ms = "SELECT setting::int FROM pg_settings WHERE name = %s"
    tm = make_tm(node_id="bounds", timeout=7, sweeper=False)
    with tm.transaction() as tx:
        lock = tx.execute("pg1", ms, ("lock_timeout",)).fetchone()[0]
        statement = tx.execute("pg1", ms, ("statement_timeout",)).fetchone()[0]
    # the time the transaction had left when the branch began: at most its timeout
    assert 0 < lock <= 7000 and statement == 2 * lock
    with tm.transaction(timeout=90) as tx:  # a longer transaction waits longer
        assert tx.execute("pg1", ms, ("lock_timeout",)).fetchone()[0] > 7000
    off = servers.urls["pg1"] + "?options=-c%20lock_timeout%3D0"
    tm = make_tm(node_id="unbounded", resources={"pg1": off, "pg2": servers.urls["pg2"]})
    with tm.transaction() as tx:
        assert tx.execute("pg1", "SHOW lock_timeout").fetchone()[0] == "0"
        assert tx.execute("pg1", "SHOW statement_timeout").fetchone()[0] != "0"


def test_pg_settings_given_in_the_url_are_kept() -> None:
    assert pg_settings_in("-c lock_timeout=5s --statement_timeout=1min -cWork_Mem=4MB") == {
        "lock_timeout",
        "statement_timeout",
        "work_mem",
    }
    assert pg_settings_in("") == set()


def test_doctor_advises_on_waits_and_recovery_headroom(
    servers: Servers, make_tm: Callable[..., TransactionManager]
) -> None:
    report = make_tm(node_id="doc", timeout=30, sweeper=False).doctor()
    assert report.ok  # advice is never a failure
    by = {(c.subject, c.name): c for c in report.checks}
    assert by[("pg1", "lock-timeout")].ok and not by[("pg1", "lock-timeout")].advice
    # the test clusters are PostgreSQL 15 with the defaults: both are advice there
    assert by[("pg1", "dead-clients")].advice
    assert "client_connection_check_interval" in by[("pg1", "dead-clients")].detail
    assert by[("pg1", "recovery-headroom")].advice
    assert "superuser_reserved_connections" in by[("pg1", "recovery-headroom")].detail
    # MariaDB's default innodb_lock_wait_timeout (50 s) is above the timeout (30 s)
    assert by[("maria", "lock-timeout")].advice
    assert "innodb_lock_wait_timeout" in by[("maria", "lock-timeout")].detail
    report = make_tm(node_id="doc2", timeout=60, sweeper=False).doctor()
    assert not any(c.advice for c in report.checks if c.subject == "maria")


def test_a_tiny_transaction_timeout_does_not_starve_phase_two_and_recovery() -> None:
    """Outside a branch (COMMIT PREPARED, recovery, inspection) a session's bounds never drop
    below SESSION_WAIT_FLOOR: a manager with timeout=0.001 once gave recovery's statements a
    2 ms statement_timeout, and they failed under load."""
    from xatm.core.urls import parse_url
    from xatm.participants.postgres.participant import SESSION_WAIT_FLOOR, PostgresParticipant

    spec = parse_url("postgresql://u@127.0.0.1:5/db")
    floor_ms = int(SESSION_WAIT_FLOOR * 1000)
    for timeout, lock_ms in ((0.001, floor_ms), (1.0, floor_ms), (60.0, 60_000)):
        setup = PostgresParticipant("pg", spec, timeout=timeout).session_setup
        assert f"SET lock_timeout = '{lock_ms}ms'" in setup, (timeout, setup)
        assert f"SET statement_timeout = '{2 * lock_ms}ms'" in setup, (timeout, setup)
    # no bounds without a timeout (the set-up then only reads the server's timeline)
    assert "SET" not in PostgresParticipant("pg", spec, timeout=None).session_setup
