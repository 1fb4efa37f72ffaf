"""Saga chaos: transfer sagas while their processes are SIGKILLed at random.

Several saga worker processes (each with threads and its own sweeper, each its own node_id,
one shared log) run transfer sagas (debit on pg1, credit on maria, a last step that aborts
a fraction of them on purpose); a fraction of the keys are submitted again, by the same
worker or by a later one (also keys of killed workers), and 40 % of the sagas run without a
key (their records in their process's journal, adopted by recovery after a kill).
Meanwhile the test SIGKILLs a random worker every ~1.5 s and starts a replacement (every
other one with a random saga failpoint), and its own manager runs a recovery pass every
second.

Afterwards (recovery until every saga is final) it checks: every saga completed or
compensated; per key, either no effect at all or all of them (completed: debit, credit and
finish; compensated: each action undone by its compensation); every acknowledged result is
the saga's final state; money conserved; nothing left prepared.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT, Bank, MakeTM, Servers, saga_defs
from tests.support.field import lock_timeouts
from xatm.core.failpoint import SAGA_NAMES

SECONDS = float(os.environ.get("XATM_CHAOS_SECONDS", "30"))
WORKERS = 3
THREADS = 3
ACCOUNTS = 6


@pytest.mark.chaos
@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_sagas_under_chaos(
    log_kind: str, servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path, log_url: str
) -> None:
    rng = random.Random(int(os.environ.get("XATM_CHAOS_SEED", "20261130")))
    bank.create(accounts=ACCOUNTS, balance=10_000)
    log = str(tmp_path / "log") if log_kind == "file" else log_url
    intents, acks = tmp_path / "intents", tmp_path / "acks"
    urls = lock_timeouts(bank.urls)
    run_tag = f"{os.getpid()}{rng.randrange(1000)}"  # node ids unique in a shared log
    base_cfg = {
        "urls": urls,
        "log": log,
        "table": bank.table,
        "journal": bank.journal,
        "threads": THREADS,
        "seconds": SECONDS + 30,
        "accounts": ACCOUNTS,
        "intents": str(intents),
        "acks": str(acks),
        "abort_rate": 0.2,
        "repeat_rate": 0.15,
        "keyless_rate": 0.4,
    }
    stats = {"kills": 0, "failpoint_runs": 0, "failpoint_crashes": 0, "sweeps": 0}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    serial = iter(range(10**6))
    with_failpoint: set[str] = set()  # workers that may die at a failpoint

    def earlier_keys() -> list[tuple[str, object]]:
        if not intents.exists():
            return []
        lines = intents.read_text().splitlines()[-200:]
        picked = rng.sample(lines, min(10, len(lines)))
        out = []
        for line in picked:
            try:
                body = json.loads(line)
            except ValueError:
                continue
            if not body.get("keyless"):
                out.append((body["key"], body["data"]))
        return out

    def spawn(failpoint: str | None = None) -> None:
        node = f"s{run_tag}x{next(serial)}"[:30]
        cfg = dict(base_cfg, node_id=node, seed=rng.randrange(1 << 30), again=earlier_keys())
        path = tmp_path / f"{node}.json"
        path.write_text(json.dumps(cfg))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        if failpoint:
            env["XATM_FAILPOINT"] = failpoint
            stats["failpoint_runs"] += 1
            with_failpoint.add(node)
        procs[node] = subprocess.Popen(
            [sys.executable, "-m", "tests.workers.saga_worker", "chaos", str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    sweeper = make_tm(
        node_id=f"s{run_tag}sw"[:30],
        resources=urls,
        log=log,
        sweeper=False,
        sagas=[saga_defs.transfer, saga_defs.both],
    )
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(1.0):
            try:
                sweeper.recover()
                stats["sweeps"] += 1
            except Exception:  # the next pass retries
                pass

    sweep_thread = threading.Thread(target=sweep, daemon=True)
    for _ in range(WORKERS):
        spawn()
    sweep_thread.start()
    deadline = time.monotonic() + SECONDS

    def running() -> bool:
        """Until the deadline; on a slow machine, a while longer until a worker has died at
        its failpoint (the run is meant to have at least one such crash)."""
        now = time.monotonic()
        return now < deadline or (stats["failpoint_crashes"] == 0 and now < deadline + SECONDS)

    try:
        while running():
            time.sleep(rng.uniform(0.8, 2.0))
            for node, p in list(procs.items()):
                if p.poll() is not None:
                    if p.returncode == -signal.SIGKILL:
                        stats["failpoint_crashes"] += 1
                    del procs[node]
                    spawn(rng.choice(SAGA_NAMES) if rng.random() < 0.5 else None)
            # kill one that is not to die at its failpoint (let those reach it)
            node = rng.choice(sorted(set(procs) - with_failpoint) or sorted(procs))
            procs.pop(node).kill()
            stats["kills"] += 1
            spawn(rng.choice(SAGA_NAMES) if rng.random() < 0.5 else None)
    finally:
        for p in procs.values():
            p.kill()
        for p in procs.values():
            p.wait()
        stop.set()
        sweep_thread.join()

    # settle: every saga of a dead owner is finished by recovery (stuck ones retried now)
    store = sweeper.sagas.store
    settle_deadline = time.monotonic() + 120
    while True:
        sweeper.recover()
        open_sagas = store.records()
        for record in open_sagas:
            if record.stuck:
                with contextlib.suppress(Exception):
                    sweeper.saga_action(record.saga_id, "retry")
        if not store.records() or time.monotonic() > settle_deadline:
            break
        time.sleep(0.2)

    # by the key's name in the payload (a saga without a key has it there too)
    records = {
        str(r.data["tid"]): r
        for r in store.records(include_final=True)
        if isinstance(r.data, dict) and "tid" in r.data
    }
    intended: dict[str, dict[str, object]] = {}
    keyless = 0
    for line in intents.read_text().splitlines():
        try:
            body = json.loads(line)
        except ValueError:
            continue
        intended[body["key"]] = body["data"]
        keyless += bool(body.get("keyless"))
    acked: dict[str, set[str]] = {}
    for line in acks.read_text().splitlines():
        key, state = line.split()
        acked.setdefault(key, set()).add(state)
    journal = bank.journal_ids()
    effects: dict[str, list[str]] = {}
    for resource in ("pg1", "maria"):
        for tid in journal[resource]:
            key, _, what = tid.rpartition("-")
            effects.setdefault(key, []).append(what)

    violations: dict[str, list[object]] = {
        "not_final": [],
        "partial": [],
        "no_record_but_effects": [],
        "ack_mismatch": [],
    }
    states = {"completed": 0, "compensated": 0}
    for key in intended:
        record = records.get(key)
        got = sorted(effects.get(key, []))
        if record is None:
            if got:
                violations["no_record_but_effects"].append((key, got))
            continue
        if record.state not in states:
            violations["not_final"].append((key, record.state, record.error))
            continue
        states[record.state] += 1
        if record.state == "completed":
            ok = got == ["credit", "debit", "finish"]
        else:  # nothing at all, or each action undone by its compensation
            ok = got in (
                [],
                ["debit", "refund"],
                ["credit", "debit", "refund", "uncredit"],
            )
        if not ok:
            violations["partial"].append((key, record.state, got))
        for state in acked.get(key, set()):
            # "failed": a compensation was stuck when that call returned; recovery went on
            if state != record.state and (state, record.state) != ("failed", "compensated"):
                violations["ack_mismatch"].append((key, state, record.state))
    stray = {r: len(v) for r, v in bank.xatm_prepared().items() if v}
    total = bank.total()
    summary = {
        "log": log_kind,
        **stats,
        "seconds": SECONDS,
        "keys": len(intended),
        "keyless": keyless,
        "sagas": len(records),
        "acked": len(acked),
        **states,
        "violations": {
            **{k: len(v) for k, v in violations.items()},
            "balance_delta": total - bank.initial_total,
            "xatm_prepared_left": stray,
        },
    }
    out = os.environ.get("XATM_CHAOS_REPORT")
    if out:
        Path(f"{out}.sagas-{log_kind}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nsaga chaos summary: " + json.dumps(summary), file=sys.stderr)
    for name, found in violations.items():
        assert found == [], (name, found[:5])
    assert total == bank.initial_total
    assert stray == {}
    assert states["completed"] > 0 and states["compensated"] > 0
    assert stats["failpoint_crashes"] > 0 and stats["kills"] > 0
