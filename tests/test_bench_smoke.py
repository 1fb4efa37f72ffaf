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
    assert set(xatm["ratios"]) >= {"raw", "sqlalchemy", "raw-async"}
    text = doc.read_text()
    assert "| clients | mode | tx/s (median)" in text
    assert "Against the issue 11 targets" in text
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
