"""``xatm sweep`` as a daemon (issue 21): JSON logs, probes, a bounded stop with a server hung,
a standby that takes over, and the retention of dead nodes' settled logs. Real processes,
real servers."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, Servers
from tests.support.omission import frozen
from tests.support.recovery import crash, prepared_gtrids, wait_for, write_config
from xatm.log.file import list_nodes, read_log
from xatm.testing.servers import free_port

XATM = Path(sys.executable).parent / "xatm"  # the console script of the running venv
JSON_KEYS = {"time", "level", "logger", "message", "node", "gtrid", "resource"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z xatm: [A-Z]+: ")
DAY = 86400.0


def _env(config: Path, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config), **extra}


def _json_lines(err: str) -> list[dict[str, Any]]:
    """Every line of ``err`` as a JSON object (fails on a line that is not one)."""
    out = []
    for line in err.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and set(record) >= JSON_KEYS, line
        out.append(record)
    return out


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}  # not listening yet


def _status(port: int, path: str) -> int:
    return _get(port, path)[0]


def _age(node_dir: Path, days: float) -> None:
    """Make every file of a log look last written ``days`` ago."""
    then = time.time() - days * DAY
    for child in [*node_dir.iterdir(), node_dir]:
        os.utime(child, (then, then))


def _sweep(config: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(XATM), "sweep", *args],
        env=_env(config, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_json_logs_of_a_cli_run_parse_line_by_line(bank: Bank, tmp_path: Path) -> None:
    log = tmp_path / "log"
    config = write_config(tmp_path / "xatm.toml", bank.urls, log)
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "j1")
    proc = subprocess.run(
        [str(XATM), "--log-format", "json", "-v", "recover"],
        env=_env(config),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = _json_lines(proc.stderr)
    done = [r for r in records if r["gtrid"] == gtrid]
    assert {r["resource"] for r in done} >= {"pg1", "maria"}, records
    assert all(r["node"] == "app-cli" and r["logger"] == "xatm.recovery" for r in done)
    assert all(r["time"].endswith("Z") and r["level"] == "INFO" for r in done)

    # an error is one JSON line too; the variable sets the format
    bad = subprocess.run(
        [str(XATM), "show", "not-a-gtrid"],
        env=_env(config, XATM_LOG_FORMAT="json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    (error,) = _json_lines(bad.stderr)
    assert error["level"] == "ERROR" and "not-a-gtrid" in error["message"]

    # the text format: a UTC timestamp, one line per record
    gtrid = crash(bank, log, "app", "after_decision", ("pg2", "maria"), "j2", account=2)
    text = subprocess.run(
        [str(XATM), "-v", "recover"], env=_env(config), capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stderr
    mine = [line for line in text.stderr.splitlines() if gtrid in line]
    assert mine and all(TIMESTAMP.match(line) for line in mine), text.stderr


def test_json_logs_of_the_sweeper_and_its_log_retention(bank: Bank, tmp_path: Path) -> None:
    """A real daemon with XATM_LOG_FORMAT=json: every stderr line parses; it settles a
    crashed transaction (lines with its gtrid) and removes an old settled ``app-cli`` log."""
    log = tmp_path / "log"
    config = write_config(
        tmp_path / "xatm.toml", bank.urls, log, extra="[sweeper]\nlog_retention = 3600\n"
    )
    assert subprocess.run([str(XATM), "recover"], env=_env(config), timeout=120).returncode == 0
    _age(log / "app-cli", days=1)  # a settled log of a CLI run a day ago
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "j3")
    daemon = _sweep(config, "--interval", "0.1", XATM_LOG_FORMAT="json")
    try:
        wait_for(lambda: not read_log(log / "app").pending, what="the decision to be closed")
        wait_for(lambda: "app-cli" not in list_nodes(log), what="the old log to be retired")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    records = _json_lines(err)
    assert all(r["node"] == "app-sweep" for r in records), err
    assert {r["resource"] for r in records if r["gtrid"] == gtrid} >= {"pg1", "maria"}
    assert any("log of dead node 'app-cli' removed" in r["message"] for r in records)
    assert any("stopped after" in r["message"] for r in records)
    audit = [json.loads(line) for line in (log / "audit.d" / "app-sweep.jsonl").open()]
    assert [e["outcome"] for e in audit if e["action"] == "retire"] == ["removed"]
    assert "app" in list_nodes(log)  # its own log went back to sleep just now: kept


def test_retention_removes_only_settled_logs_of_dead_nodes(
    bank: Bank, tmp_path: Path, make_tm: Any
) -> None:
    log = tmp_path / "log"
    old = make_tm(node_id="old-cli", log=log, sweeper=False)
    with old.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 3")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 3")
    old.close()
    make_tm(node_id="recent", log=log, sweeper=False).close()
    crash(bank, log, "pending", "after_decision", ("pg1", "maria"), "r1", account=1)
    crash(bank, log, "undecided", "after_prepare", ("pg2", "maria"), "r2", account=2)
    alive = make_tm(node_id="alive", log=log, sweeper=False)
    for node in ("old-cli", "pending", "undecided", "alive"):
        _age(log / node, days=8)
    janitor = make_tm(node_id="janitor", log=log, sweeper=False)

    plan = {r.node: r for r in janitor.sweeper.retire_logs(dry_run=True)}
    assert set(plan) == {"old-cli", "pending", "undecided", "alive"}
    assert plan["old-cli"].reason == "would be removed" and not plan["old-cli"].removed
    assert "old-cli" in list_nodes(log)

    done = {r.node: r for r in janitor.sweeper.retire_logs()}
    assert done["old-cli"].removed
    assert done["pending"].reason == "1 pending decision(s)"
    assert done["undecided"].reason == "a branch of it is still prepared"
    assert done["alive"].reason == "its coordinator is alive"
    assert not any(r.removed for n, r in done.items() if n != "old-cli")
    assert set(list_nodes(log)) == {"recent", "pending", "undecided", "alive", "janitor"}
    assert not list(log.glob(".retired-*"))
    audit = [json.loads(line) for line in (log / "audit.d" / "janitor.jsonl").open()]
    (entry,) = [e for e in audit if e["action"] == "retire"]
    assert "'old-cli'" in entry["reason"] and entry["outcome"] == "removed"
    assert entry["actor"] == "sweeper@janitor"

    # recovery settles the crashed ones; once dead long enough, they go too (never 'alive')
    report = janitor.recover()
    assert report.committed == 2 and report.rolled_back == 2, report
    assert not any(prepared_gtrids(bank).values())
    later = time.time() + 8 * DAY
    done = {r.node: r for r in janitor.sweeper.retire_logs(now=later)}
    assert {n for n, r in done.items() if r.removed} == {"recent", "pending", "undecided"}
    assert set(list_nodes(log)) == {"alive", "janitor"}
    alive.close()


def test_a_second_sweeper_waits_and_takes_over_when_the_first_is_killed(
    bank: Bank, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    config = write_config(tmp_path / "xatm.toml", bank.urls, log)
    first_port, second_port = free_port(), free_port()
    first = _sweep(config, "--interval", "0.2", "--metrics-port", str(first_port))
    second = None
    try:
        wait_for(lambda: _status(first_port, "/readyz") == 200, what="the first sweeper")
        second = _sweep(
            config, "--interval", "0.2", "--metrics-port", str(second_port), "--standby-poll", "0.2"
        )
        wait_for(lambda: _get(second_port, "/livez")[1].get("status") == "standby", what="standby")
        assert _status(second_port, "/livez") == 200
        assert _status(second_port, "/readyz") == 503
        time.sleep(2.0)
        assert second.poll() is None, "the standby exited"
        assert _get(second_port, "/readyz")[1]["phase"] == "standby"

        first.kill()  # SIGKILL: its log lock and identity sessions go with it
        first.wait(30)
        gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "t1")
        wait_for(lambda: _status(second_port, "/readyz") == 200, what="the take-over")
        wait_for(lambda: gtrid not in prepared_gtrids(bank)["maria"], what="the crashed one")
        wait_for(lambda: not read_log(log / "app").pending, what="the decision to be closed")
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)
        if second is not None:
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "standby: node app-sweep is held by another live process" in err
    assert "taken over" in err and "Traceback" not in err
    assert bank.journal_ids()["maria"] == {"t1"}


def test_a_stuck_pass_fails_liveness_and_sigterm_ends_within_the_grace(
    bank: Bank, servers: Servers, tmp_path: Path
) -> None:
    """MariaDB frozen (SIGSTOP, this test's own server): the pass in flight waits on it;
    /livez turns 503 ('stuck') while /readyz stays what it was; SIGTERM ends the process
    within --grace (status 1: the stop did not complete)."""
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log")
    port = free_port()
    grace = 3.0
    daemon = _sweep(
        config,
        "--interval",
        "0.2",
        "--metrics-port",
        str(port),
        "--stuck-after",
        "2",
        "--grace",
        str(grace),
    )
    try:
        wait_for(lambda: _status(port, "/readyz") == 200, what="a first pass")
        assert _status(port, "/livez") == 200
        with frozen(servers.set.maria, 90):
            wait_for(lambda: _status(port, "/livez") == 503, timeout=30, what="liveness")
            body = _get(port, "/livez")[1]
            assert body["status"] == "stuck" and body["pass_in_flight_seconds"] > 2, body
            assert _get(port, "/healthz")[0] == 503
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=60)
            took = time.monotonic() - started
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate(timeout=30)
    assert took < grace + 3.0, took
    assert daemon.returncode == 1, err
    assert f"did not complete within the grace period of {grace:g} s" in err
    assert "Traceback" not in err


def test_an_applications_formatter_finds_the_fields_on_xatms_records(
    bank: Bank, tmp_path: Path, make_tm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """What python-json-logger or structlog would emit: the record's attributes."""
    log = tmp_path / "log"
    gtrid = crash(bank, log, "gone", "after_decision", ("pg1", "maria"), "f1")
    tm = make_tm(node_id="app", log=log, sweeper=False)
    with caplog.at_level(logging.INFO, logger="xatm"):
        assert tm.recover().committed == 2
    mine = [r for r in caplog.records if getattr(r, "gtrid", None) == gtrid]
    assert {r.resource for r in mine} == {"pg1", "maria"}  # type: ignore[attr-defined]
    assert {r.node for r in mine} == {"app"}  # type: ignore[attr-defined]
