"""Smoke test of the benchmark harness: it runs every mode, checks the books, and reports.

Every mode includes the multi-process ones (two child coordinator processes, on a shared
file log and on the shared PostgreSQL log) and, where mysql-connector's C extension loads,
the C-extension ones (elsewhere they are reported as not run, with the reason). Only that
it works is checked here; timings stay out of the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import mysql.connector
import pytest

from benchmarks.catalog import MODES
from benchmarks.modes import needs_cext
from benchmarks.mp import is_multiprocess
from benchmarks.run import main
from tests.support import Servers


def test_quick_benchmark_runs_and_balances(servers: Servers, log_url: str, tmp_path: Path) -> None:
    out, doc, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--quick", "--pg-url", servers.urls["pg1"], "--mysql-url", servers.urls["maria"]]
    argv += ["--log-url", log_url, "--table", f"bench_smoke_{os.getpid()}"]
    argv += ["--json", str(out), "--doc", str(doc), "--plot", str(png)]

    assert main(argv) == 0

    data = json.loads(out.read_text())
    assert data["books_balanced"] is True
    seen = {(s["mode"], s["clients"]) for s in data["summary"]}
    cext = bool(mysql.connector.HAVE_CEXT)
    expected = {
        (m, c)
        for m in MODES
        for c in (1, 2)
        if (cext or not needs_cext(m)) and (c >= 2 or not is_multiprocess(m))
    }
    assert seen == expected
    assert all(r["transactions"] > 0 and r["errors"] == 0 for r in data["runs"])
    for s in data["summary"]:
        assert s["mysql"] == "C extension" if needs_cext(s["mode"]) else "pure" in s["mysql"]
        assert s["processes"] == (2 if is_multiprocess(s["mode"]) else 1)
    xatm = next(s for s in data["summary"] if s["mode"] == "xatm" and s["clients"] == 1)
    assert set(xatm["ratios"]) >= {"raw", "raw-durable", "sqlalchemy", "raw-async"}
    floor = next(s for s in data["summary"] if s["mode"] == "raw-durable" and s["clients"] == 2)
    # one sync serves every waiter: at most about one per transaction (the window's edges
    # may count a sync whose transaction falls outside it)
    assert floor["fsyncs_per_tx"] is not None and 0 < floor["fsyncs_per_tx"] <= 1.1
    text = doc.read_text()
    assert "| clients | mode | tx/s (median)" in text
    assert "Against the performance targets" in text
    assert "**Every xatm mode against the floors**" in text
    assert "| 2 | **raw-durable** |" in text
    if not cext:
        assert "`xatm-cext` not run: the C extension" in text
    assert "balanced after every one" in text
    assert "xatm-secret" not in text and "xatm-secret" not in out.read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def test_multiprocess_modes_spread_the_clients_over_their_processes() -> None:
    from benchmarks.mp import split

    assert split(8, 2) == [4, 4]
    assert split(33, 2) == [17, 16]
    assert split(1, 2) == [1]  # never an empty process
    assert sum(split(48, 5)) == 48


def test_profile_times_every_step(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import profile

    argv = ["--clients", "1", "--seconds", "0.5", "--warmup", "0.2", "--rounds", "1"]
    argv += ["--pg-url", servers.urls["pg1"], "--mysql-url", servers.urls["maria"], "--doc", "-"]

    assert profile.main(argv) == 0

    text = capsys.readouterr().out
    head = "| step (1 client) | raw ms/tx | xatm ms/tx | xatm-serial ms/tx | xatm-fast ms/tx |"
    assert head in text
    for row in (
        "PG: PREPARE TRANSACTION (send + answer)",
        "MariaDB: XA COMMIT",
        "**log: COMMIT record forced**",
        "fsyncs per transaction",
        "**PG: decision row + COMMIT (marker: the decision)**",
        "**transaction, client-measured**",
    ):
        line = next(x for x in text.splitlines() if row in x)
        assert line.count("|") == 6 and "nan" not in line
    # the client-thread CPU of every step, which adds up where the wall times overlap
    cpu_head = "| client-thread CPU per step (1 client) | raw CPU µs/tx | xatm CPU µs/tx |"
    assert cpu_head in text
    for row in (
        "| PG: COMMIT PREPARED |",
        "| log: COMMIT record forced",
        "| outside the steps (raw: the harness; xatm: its own Python) |",
        "| **transaction, client thread** |",
        "| one log write+fsync: CPU of the thread leading it, per fsync |",
    ):
        line = next(x for x in text.splitlines() if x.startswith(row))
        assert line.count("|") == 6 and "nan" not in line


def test_saga_profile_splits_a_saga_by_phase(
    servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import saga_profile

    argv = ["--threads", "1,2", "--sagas", "10", "--warmup", "2", "--profile", "5", "--top", "5"]
    argv += ["--pg-url", servers.urls["pg1"], "--mysql-url", servers.urls["maria"]]

    assert saga_profile.main(argv) == 0

    text = capsys.readouterr().out
    for threads in (1, 2):
        assert f"onepc  {threads} thread(s):" in text and f"saga   {threads} thread(s):" in text
    for phase in ("record: create", "barrier (insert)", "pg: begin", "maria: one-phase commit"):
        assert text.count(phase) == 2, phase
    assert "cProfile of 5 sagas on one thread" in text and "xatm's own functions only" in text


def test_micro_benchmark_runs(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks.micro keeps running against the current code (its stub participant once
    fell behind the protocol's signatures)."""
    from benchmarks import micro

    argv = ["-n", "5", "--pg-url", servers.urls["pg1"], "--mysql-url", servers.urls["maria"]]
    assert micro.main(argv) == 0
    text = capsys.readouterr().out
    assert "| call (one thread, idle machine as far as possible) | wall µs | CPU µs |" in text
    assert "event hooks of one 2-branch transaction: nobody listening" in text
    assert "| file log: log_commit + log_end (preallocated segment) |" in text


def test_profile_classifies_pyspy_frames() -> None:
    from benchmarks.profile import classify

    def stack(*inner: str) -> list[str]:
        return ["_client_loop (benchmarks/driver.py:80)", *inner]

    pg_wait = "Connection.wait (psycopg/connection.py:950)"
    maria_wait = "NetworkBrokerPlain._recv_chunk (mysql/connector/network.py:300)"
    fsync = "FileLog._write (xatm/log/file/writer.py:700)"
    waiting = (
        "FileLog._wait_durable (xatm/log/file/writer.py:600)",
        "Event.wait (threading.py:600)",
    )
    idle = (
        "FileLog._flusher_loop (xatm/log/file/writer.py:680)",
        "Condition.wait (threading.py:300)",
    )
    assert classify(stack(pg_wait)) == "PostgreSQL: waiting for the server (socket)"
    assert classify(stack(maria_wait)) == "MariaDB: waiting for the server (socket)"
    assert classify(stack(fsync)) == "log: write + fsync"
    assert classify(stack(*waiting)) == "log: waiting for a flush led by another thread"
    parked = "FileLog._wait_durable (xatm/log/file/writer.py:640)"  # acquiring its parking lock
    assert classify(stack(parked)) == "log: waiting for a flush led by another thread"
    assert classify(stack("write_at (xatm/log/file/segments.py:80)")) == "log: write + fsync"
    assert classify(list(idle)) == "log flusher: idle (no records wait for a flush)"
    assert classify(stack("overlapped (xatm/core/parallel.py:40)")).startswith("xatm Python")


def test_logscale_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """benchmarks.logscale (no servers): the file log and the floor's decision file."""
    from benchmarks import logscale

    argv = ["--threads", "1,2", "--seconds", "0.2", "--gap", "0.5", "--dir", str(tmp_path)]
    assert logscale.main(argv) == 0
    rows = [
        x
        for x in capsys.readouterr().out.splitlines()
        if x.startswith("| file log") or x.startswith("| floor")
    ]
    assert len(rows) == 4 and all("nan" not in r and r.count("|") == 8 for r in rows)
