"""`make demo` works: the demo starts its own servers, crashes a coordinator, shows the
in-doubt view, recovers, checks the invariant, and cleans up (exit status 0)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_the_demo_runs_and_the_invariant_holds() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: the invariant holds" in proc.stdout
