"""The deterministic simulator in the normal suite: a fixed seed set, replay, and its bite.

Each run is a subprocess (``python -m tests.sim.run``): a simulator worker replaces
``threading`` and ``time`` before it imports xatm (tests/sim/patches.py), which this pytest
process must not. No database server is used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the CI seed set: seeds 1..CI_SEEDS, DURATION virtual seconds of load and faults each
CI_SEEDS = 24
DURATION = 60

#: each historical split, re-introduced by its switch (xatm.core.bugs), and the first seed (tried
#: in order from seed 1) at which the simulator finds it, with the steps it took
#: (docs/testing.md tables them): the suite replays that seed; XATM_SIM_SEARCH=1 searches
#: again from seed 1 within BUDGET seeds
BUDGET = 96
FOUND = {
    "resolve_ignores_marker": (43, 40758),
    "nota_is_gone": (8, 28165),
    "presume_before_probe": (68, 30036),
    "twin_is_previous": (29, 25980),
    "lock_is_proof": (20, 35468),
}
BUGS = list(FOUND)
SEARCH = os.environ.get("XATM_SIM_SEARCH") == "1"


def _sim(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, "-m", "tests.sim.run", "--duration", str(DURATION), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_ci_seed_set_finds_no_violation(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    run = _sim(
        "--seeds", str(CI_SEEDS), "--jobs", "2", "--quiet", "--no-shrink", "--json", str(out)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(out.read_text())
    assert summary["violations"] == 0
    assert summary["seeds"] == CI_SEEDS
    assert summary["transactions"] > 200 * CI_SEEDS
    assert summary["faults"] > 5 * CI_SEEDS
    print(f"\nsim CI seed set: {summary}")


def test_a_seed_replays_exactly() -> None:
    first = _sim("--seed", "3", "--no-shrink")
    second = _sim("--seed", "3", "--no-shrink")  # a fresh process: the same run
    assert first.returncode == 0, first.stdout + first.stderr
    line = first.stdout.splitlines()[0]
    assert line == second.stdout.splitlines()[0]
    assert re.match(r"seed 3: \d+ tx \(\d+ committed\), \d+ faults, \d+ steps", line)


@pytest.mark.parametrize("bug", BUGS)
def test_the_simulator_finds_the_historical_split(bug: str) -> None:
    seed, steps = FOUND[bug]
    if SEARCH:  # from seed 1, in order, within the budget: the first seed that finds it
        run = _sim(
            "--seeds", str(BUDGET), "--find", "--jobs", "2", "--quiet", "--no-shrink", "--bug", bug
        )
        found = re.search(r"found at seed (\d+) after (\d+) steps", run.stdout)
        assert found is not None, f"{bug} not found in {BUDGET} seeds:\n{run.stdout[-2000:]}"
        print(f"\n{bug}: found at seed {found.group(1)} after {found.group(2)} steps")
        assert (int(found.group(1)), int(found.group(2))) == (seed, steps)
    else:  # the recorded seed finds it, at the recorded step
        run = _sim("--seed", str(seed), "--no-shrink", "--bug", bug)
    assert re.search(
        rf"seed {seed}: .* VIOLATION after {steps} steps: (split|ack-lost|refused-committed)",
        run.stdout,
    ), run.stdout[-3000:]
    assert f"replay: make sim SEED={seed}" in run.stdout
    # the switch is the cause: the same seed passes without it
    clean = _sim("--seed", str(seed), "--no-shrink")
    assert clean.returncode == 0, clean.stdout[-2000:]


def test_the_bug_switches_are_off_outside_the_simulator() -> None:
    from xatm.core import bugs as _bugs

    assert frozenset() == _bugs.ENABLED
    assert set(BUGS) == _bugs.NAMES
    assert not any(_bugs.on(name) for name in _bugs.NAMES)


def test_every_module_that_writes_files_is_patched() -> None:
    """A module split out of another (``xatm.log.file`` into its submodules) keeps its own
    ``os``: one the patches miss writes and fsyncs for real, and a crashed simulated process
    keeps its log's flock (its node never starts again)."""
    from tests.sim import patches

    io = re.compile(r"\bos\.(open|fsync|write|ftruncate|replace)\(|\bwrite_at\(")
    writers = set()
    callers = set()
    for path in sorted((ROOT / "xatm").rglob("*.py")):
        text = path.read_text()
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if io.search(text):
            writers.add(name)
        if re.search(r"\bwrite_at\(", text):
            callers.add(name)
    assert writers - set(patches.FILE_MODULES) - set(patches.REAL_FILES) == set()
    assert callers <= set(patches.WRITE_AT_MODULES)
    check = (
        "from tests.sim import patches; patches.install(); import importlib;"
        "bad = [m for m in patches.FILE_MODULES"
        " if not isinstance(importlib.import_module(m).os, patches._SimOS)];"
        "print(bad); assert not bad"
    )
    run = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
