"""Smoke test of the benchmark harness: it runs every mode, checks the books, and reports.

Only that it works is checked here; timings stay out of the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from benchmarks.catalog import MODES
from benchmarks.run import main
from tests.support import Servers


def test_quick_benchmark_runs_and_balances(servers: Servers, tmp_path: Path) -> None:
    out, doc, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--quick", "--pg-url", servers.urls["pg1"], "--mysql-url", servers.urls["maria"]]
    argv += ["--table", f"bench_smoke_{os.getpid()}", "--json", str(out), "--doc", str(doc)]
    argv += ["--plot", str(png)]

    assert main(argv) == 0

    data = json.loads(out.read_text())
    assert data["books_balanced"] is True
    seen = {(s["mode"], s["clients"]) for s in data["summary"]}
    assert seen == {(m, c) for m in MODES for c in (1, 2)}
    assert all(r["transactions"] > 0 and r["errors"] == 0 for r in data["runs"])
    xatm = next(s for s in data["summary"] if s["mode"] == "xatm" and s["clients"] == 1)
    assert set(xatm["ratios"]) == {"raw", "sqlalchemy", "raw-async"}
    text = doc.read_text()
    assert "| clients | mode | tx/s (median)" in text
    assert "balanced after every one" in text
    assert "xatm-secret" not in text and "xatm-secret" not in out.read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
