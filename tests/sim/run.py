"""Run the simulator: ``python -m tests.sim.run`` (``make sim``; ``make sim SEED=n`` replays).

Seeds run in worker processes (``--jobs``); each seed is one world (``tests.sim.world``). A
failing seed prints its violation, the steps it took and a short trace, then is shrunk (fewer
faults) unless ``--no-shrink``. The summary line gives seeds, simulated transactions, faults
injected, violations and seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from typing import Any

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"  # set iteration order is part of a replay
    os.execv(sys.executable, [sys.executable, "-m", "tests.sim.run", *sys.argv[1:]])

from tests.sim import patches

if False:  # typing only: the world is imported once the patches are in (``_world``)
    from tests.sim.world import Config, Result  # noqa: F401


#: the options of this run (a failure's replay line repeats them)
OPTS: dict[str, Any] = {}


def _world() -> Any:
    """Install the patches (this process becomes a simulator worker), then the world."""
    patches.install()  # before xatm is imported
    import logging

    from tests.sim import world

    logging.disable(logging.CRITICAL)  # xatm's own logging: the trace says what matters
    return world


def _one(args: tuple[int, dict[str, Any]]) -> Any:
    seed, opts = args
    w = _world()
    return w.run_seed(w.Config(seed=seed, **opts))


def shrink(seed: int, opts: dict[str, Any], first: Any) -> tuple[Any, Any]:
    """Delta debugging over the seed's fault schedule: drop faults while it still fails."""
    w = _world()
    World, Config, run_seed = w.World, w.Config, w.run_seed

    probe = World(Config(seed=seed, **opts))
    schedule = probe.plan_faults()
    probe.close()
    best, best_result = schedule, first
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and best:
        i = 0
        changed = False
        while i < len(best):
            trial = best[:i] + best[i + chunk :]
            result = run_seed(Config(seed=seed, schedule=trial, **opts))
            if not result.ok:
                best, best_result, changed = trial, result, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    cfg = Config(seed=seed, schedule=best, **opts)
    return cfg, best_result


def main(argv: list[str] | None = None) -> int:
    # every world's temporary directory goes under one of this run's, removed at the end: a
    # worker terminated mid-seed (``--find``, the end of ``--hours``) cannot remove its own
    run_dir = tempfile.mkdtemp(prefix="xatm-sim-run-")
    tempfile.tempdir = run_dir  # the workers are forked: they inherit it
    try:
        return _main(argv)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(run_dir, ignore_errors=True)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim.run")
    ap.add_argument("--seeds", type=int, default=720, help="how many seeds (from --first)")
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--seed", type=int, help="replay one seed (with its trace)")
    ap.add_argument("--hours", type=float, help="run new seeds for this long")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--duration", type=float, default=100.0, help="virtual seconds of load and faults"
    )
    ap.add_argument(
        "--bug", action="append", default=[], help="re-introduce a bug (xatm.core.bugs)"
    )
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument(
        "--find", action="store_true", help="seeds in order; stop at the first violation"
    )
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    opts: dict[str, Any] = {"duration": a.duration, "bugs": frozenset(a.bug)}
    OPTS.update(opts)
    started = patches._real_monotonic()
    if a.seed is not None:
        w = _world()
        result = w.run_seed(w.Config(seed=a.seed, trace=True, **opts))
        _print_result(result, full=True)
        if not result.ok and not a.no_shrink:
            _print_shrunk(a.seed, opts, result)
        _summary([result], patches._real_monotonic() - started, a.json)
        return 0 if result.ok else 1
    results: list[Any] = []
    deadline = None if a.hours is None else started + a.hours * 3600
    ctx = multiprocessing.get_context("fork")
    first = a.first
    # workers live to the end (terminated): a patched worker's own exit is not simulated
    with ctx.Pool(a.jobs) as pool:
        while True:
            batch = a.seeds if deadline is None else 50 * a.jobs
            seeds = range(first, first + batch)
            first += batch
            run = pool.imap if a.find else pool.imap_unordered
            stop = False
            for result in run(_one, ((s, opts) for s in seeds), chunksize=1):
                results.append(result)
                if a.find and not result.ok:
                    print(f"found at seed {result.seed} after {result.violation_steps} steps")
                    _print_result(result, full=True)
                    stop = True
                    break
                if not a.quiet or not result.ok:
                    _print_result(result, full=not result.ok)
                if deadline is not None and patches._real_monotonic() > deadline:
                    stop = True
                    break
            if stop or deadline is None or patches._real_monotonic() > deadline:
                pool.terminate()
                break
    failed = [r for r in results if not r.ok]
    for r in failed[:1]:
        if not a.no_shrink:
            _print_shrunk(r.seed, opts, r)
    _summary(results, patches._real_monotonic() - started, a.json)
    return 1 if failed else 0


def _print_result(r: Any, full: bool) -> None:
    status = "ok" if r.ok else f"VIOLATION after {r.violation_steps} steps: {r.violation}"
    print(
        f"seed {r.seed}: {r.tx} tx ({r.committed} committed), {r.faults} faults,"
        f" {r.steps} steps, {r.vtime:.0f} virtual s: {status}",
        flush=True,
    )
    if full and not r.ok:
        extra = " ".join(
            [
                *(f"--bug {b}" for b in sorted(OPTS.get("bugs", ()))),
                *([f"--duration {OPTS['duration']:g}"] if OPTS.get("duration") != 100.0 else []),
            ]
        )
        args = f' SIM_ARGS="{extra}"' if extra else ""
        print(f"  replay: make sim SEED={r.seed}{args}")
        for line in r.trace:
            print("  " + line)


def _print_shrunk(seed: int, opts: dict[str, Any], r: Any) -> None:
    cfg, small = shrink(seed, opts, r)
    faults = cfg.schedule or []
    print(f"shrunk seed {seed} to {len(faults)} faults ({small.violation}):")
    for t, kind, _ in faults:
        print(f"  {t:8.3f}s {kind}")


def _summary(results: list[Any], seconds: float, path: str | None) -> None:
    summary = {
        "seeds": len(results),
        "transactions": sum(r.tx for r in results),
        "committed": sum(r.committed for r in results),
        "sagas": sum(r.sagas for r in results),
        "faults": sum(r.faults for r in results),
        "steps": sum(r.steps for r in results),
        "violations": sum(1 for r in results if not r.ok),
        "seconds": round(seconds, 1),
    }
    print(
        f"sim: {summary['seeds']} seeds, {summary['transactions']} simulated transactions"
        f" ({summary['sagas']} sagas),"
        f" {summary['faults']} faults, {summary['violations']} violations"
        f" in {summary['seconds']} s",
        flush=True,
    )
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
