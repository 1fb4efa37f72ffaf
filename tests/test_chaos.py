"""Chaos: concurrent bank transfers while coordinators, connections and servers are killed.

Several coordinator processes (each with threads, each its own node_id, one shared log
directory) move money between accounts on pg1, pg2 and maria. Meanwhile the test:

* SIGKILLs a random coordinator every ~1.5 s and starts a replacement under a new node_id
  (every other replacement with a random XATM_FAILPOINT, so every protocol step is hit);
* cuts random xatm connections on pg1 (pg_terminate_backend);
* kills MariaDB (SIGKILL) once and pg2 once, restarting each a second later;
* runs a recovery pass every second from its own coordinator (taking over dead nodes' logs).

Afterwards (final recovery until clean) it checks the invariants: total balance conserved;
every transfer on all of its branches or on none; every acknowledged transfer present; no xatm
branch left prepared; the foreign prepared transactions on every server untouched.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.support import Bank, add_query, prepare_foreign, resolve_foreign, run
from xatm import FAILPOINTS, TransactionManager

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("XATM_CHAOS_SECONDS", "30"))
WORKERS = 3
THREADS = 3
ACCOUNTS = 6

MakeTM = Callable[..., TransactionManager]


def lock_timeouts(urls: dict[str, str]) -> dict[str, str]:
    """The same URLs with short lock waits, so orphaned locks cost errors, not hangs."""
    out = {}
    for name, url in urls.items():
        if url.startswith("postgresql"):
            out[name] = add_query(url, "options=-c%20lock_timeout%3D2000")
        else:
            out[name] = add_query(url, "init_command=SET%20innodb_lock_wait_timeout%3D2")
    return out


@pytest.mark.chaos
@pytest.mark.parametrize("mode", ["strict", "marker", "marker_maria", "shared"])
def test_bank_transfers_under_chaos(
    mode: str, servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path, log_url: str
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not killed")
    rng = random.Random(int(os.environ.get("XATM_CHAOS_SEED", "20261125")))
    bank.create(accounts=ACCOUNTS, balance=10_000)
    for name, url in bank.urls.items():
        prepare_foreign(url, f"chaos-{name}")
    log: Path | str = tmp_path / "log" if mode != "shared" else log_url
    intents, acks = tmp_path / "intents", tmp_path / "acks"
    urls = lock_timeouts(bank.urls)
    base_cfg = {
        "urls": urls,
        "log": str(log),  # a directory, or the shared PostgreSQL log
        "table": bank.table,
        "journal": bank.journal,
        "threads": THREADS,
        "seconds": SECONDS + 30,
        "accounts": ACCOUNTS,
        "intents": str(intents),
        "acks": str(acks),
        "commit_markers": {"marker": ["pg1"], "marker_maria": ["maria"]}.get(mode, []),
    }
    stats = {
        "kills": 0,
        "failpoint_runs": 0,
        "failpoint_crashes": 0,
        "conn_cuts": 0,
        "server_kills": 0,
        "sweeps": 0,
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    serial = iter(range(10**6))

    def spawn(failpoint: str | None = None) -> None:
        node = f"w{next(serial)}"
        cfg = dict(base_cfg, node_id=node, seed=rng.randrange(1 << 30))
        path = tmp_path / f"{node}.json"
        path.write_text(json.dumps(cfg))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        if failpoint:
            env["XATM_FAILPOINT"] = failpoint
            stats["failpoint_runs"] += 1
        procs[node] = subprocess.Popen(
            [sys.executable, "-m", "tests.worker", "chaos", str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # the recoverer is not told which resource carries commit markers: it finds the tables
    sweeper = make_tm(node_id="sweeper", resources=urls, log=log)
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(1.0):
            try:
                sweeper.recover()
                stats["sweeps"] += 1
            except Exception:  # a server may be down: the next pass retries
                pass

    sweep_thread = threading.Thread(target=sweep, daemon=True)
    for _ in range(WORKERS):
        spawn()
    sweep_thread.start()
    deadline = time.monotonic() + SECONDS
    killed_maria = killed_pg2 = False
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.8, 2.0))
            elapsed = SECONDS - (deadline - time.monotonic())
            # replace workers that died at a failpoint
            for node, p in list(procs.items()):
                if p.poll() is not None:
                    if p.returncode == -signal.SIGKILL:
                        stats["failpoint_crashes"] += 1
                    del procs[node]
                    spawn(rng.choice(FAILPOINTS) if rng.random() < 0.5 else None)
            # SIGKILL a random live coordinator
            node = rng.choice(sorted(procs))
            procs.pop(node).kill()
            stats["kills"] += 1
            spawn(rng.choice(FAILPOINTS) if rng.random() < 0.5 else None)
            # cut some connections
            try:
                rows = run(
                    bank.conns["pg1"],
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'xatm' AND random() < 0.3",
                )
                stats["conn_cuts"] += len(rows)
            except Exception:
                bank.reconnect("pg1")
            if not killed_maria and elapsed > SECONDS * 0.3:
                killed_maria = True
                servers.set.maria.kill()
                stats["server_kills"] += 1
                time.sleep(1.0)
                servers.set.maria.restart()
                bank.reconnect("maria")
            if not killed_pg2 and elapsed > SECONDS * 0.6:
                killed_pg2 = True
                servers.set.pg2.kill()
                stats["server_kills"] += 1
                time.sleep(1.0)
                servers.set.pg2.restart()
                bank.reconnect("pg2")
    finally:
        for p in procs.values():
            p.kill()
        for p in procs.values():
            p.wait()
        stop.set()
        sweep_thread.join()

    # settle: recovery until nothing is left (a dead node's branches are all resolvable)
    for name in bank.conns:
        bank.reconnect(name)
    for _ in range(5):
        report = sweeper.recover()
        if report.clean and report.committed == report.rolled_back == 0:
            break
    intended = {}
    for line in intents.read_text().splitlines():
        tid, resources = line.split()
        intended[tid] = set(resources.split(","))
    acked = set(acks.read_text().split())
    journal = bank.journal_ids()
    split = []
    committed = 0
    for tid, resources in intended.items():
        present = {r for r in resources if tid in journal[r]}
        if present and present != resources:
            split.append((tid, sorted(present), sorted(resources)))
        elif present:
            committed += 1
    lost = sorted(t for t in acked if not all(t in journal[r] for r in intended[t]))
    stray = {r: len(v) for r, v in bank.xatm_prepared().items() if v}
    everything = bank.prepared()
    foreign_kept = all(any(isinstance(x, str) for x in everything[name]) for name in bank.conns)
    total = bank.total()
    summary = {
        **stats,
        "seconds": SECONDS,
        "transfers_attempted": len(intended),
        "transfers_committed": committed,
        "transfers_acked": len(acked),
        "violations": {
            "split": len(split),
            "lost_acks": len(lost),
            "balance_delta": total - bank.initial_total,
            "xatm_prepared_left": stray,
            "foreign_touched": not foreign_kept,
        },
    }
    summary = {"mode": mode, **summary}
    out = os.environ.get("XATM_CHAOS_REPORT")
    if out:
        Path(f"{out}.{mode}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nchaos summary: " + json.dumps(summary), file=sys.stderr)
    for name, url in bank.urls.items():
        resolve_foreign(url, f"chaos-{name}")
    assert split == [], split[:5]
    assert lost == [], lost[:5]
    assert total == bank.initial_total
    assert stray == {}
    assert foreign_kept
    assert committed > 0 and len(acked) > 0
    assert stats["failpoint_crashes"] > 0
