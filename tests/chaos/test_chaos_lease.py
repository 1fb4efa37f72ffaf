"""Chaos, identity mode (issue 17): identity sessions cut under load while twins start.

One coordinator process (node ``lease-x``, its own log) moves money between pg1, pg2 and
maria with a sweeper. Every second or two the test cuts the sessions holding its identity
locks on some resources (``pg_terminate_backend``, MariaDB ``KILL``: its process lives on),
and most times a *twin* is waiting for them at that moment: a second process with the same
node_id and a log directory of its own, which races the first one's keeper for the locks. A
twin that wins runs transfers for a few seconds (and is sometimes SIGKILLed midway); one
that loses is refused at start. Afterwards each log settles what it knows, and the books
are checked as the other chaos modes do (nothing split, nothing acknowledged lost, money
conserved, nothing left prepared), plus the wait bound: no transaction call took longer
than the timeout plus the connect timeout.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Bank, Servers, run
from tests.support.field import lock_timeouts, roll_back_leftovers, transfer_books
from xatm import TransactionManager

SECONDS = min(float(os.environ.get("XATM_CHAOS_SECONDS", "30")), 20.0)
ACCOUNTS = 6
NODE = "lease-x"
#: the chaos worker's transaction timeout plus the connect timeout, and slack for a loaded
#: machine: no transaction call may take longer
CALL_BOUND = 5.0 + 5.0 + 5.0


def cut(bank: Bank, resource: str) -> bool:
    """End the session holding NODE's identity lock on ``resource`` (True if one did)."""
    conn = bank.conns[resource]
    try:
        if resource.startswith("pg"):
            import zlib

            rows = run(
                conn,
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s AND objid = %s AND objsubid = 2 AND granted",
                (0x786E, zlib.crc32(NODE.encode())),
            )
            return bool(rows)
        holder = run(conn, "SELECT IS_USED_LOCK(%s)", (f"xatm:node:{NODE}",))[0][0]
        if holder is None:
            return False
        run(conn, f"KILL {int(holder)}")
        return True
    except Exception:
        bank.reconnect(resource)
        return False


@pytest.mark.chaos
def test_identity_sessions_cut_under_load_with_twins_starting(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    if servers.set is None:
        pytest.skip("needs the private servers")
    rng = random.Random(int(os.environ.get("XATM_CHAOS_SEED", "20261207")))
    bank.create(accounts=ACCOUNTS, balance=10_000)
    intents, acks, calls = tmp_path / "intents", tmp_path / "acks", tmp_path / "calls"
    base = {
        "urls": lock_timeouts(bank.urls),
        "node_id": NODE,
        "table": bank.table,
        "journal": bank.journal,
        "accounts": ACCOUNTS,
        "intents": str(intents),
        "acks": str(acks),
        "calls": str(calls),
        "sweep_interval": 0.5,
    }
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

    def start(name: str, **cfg: Any) -> subprocess.Popen[bytes]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, **cfg}))
        with (tmp_path / f"{name}.err").open("wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.workers.worker", "chaos", str(path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    first = start(
        "first", log=str(tmp_path / "log-a"), threads=3, seconds=SECONDS + 8, seed=1, tid_prefix="a"
    )
    stats = {"cuts": 0, "twins_started": 0, "twins_refused": 0, "twins_ran": 0, "twin_kills": 0}
    twins: list[tuple[subprocess.Popen[bytes], float, bool]] = []  # (process, end, kill it)
    deadline = time.monotonic() + SECONDS
    time.sleep(3.0)  # the first one is up and working
    try:
        serial = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 2.5))
            for p, end, kill in list(twins):  # a twin to kill midway
                if kill and p.poll() is None and time.monotonic() > end:
                    p.kill()
                    stats["twin_kills"] += 1
            if any(p.poll() is None for p, _, _ in twins):
                continue  # one twin at a time (they share one log directory)
            twin_now = rng.random() < 0.8
            if twin_now:  # the twin waits for the locks when they are cut: a real race
                serial += 1
                twin = start(
                    f"twin{serial}",
                    log=str(tmp_path / "log-b"),
                    threads=2,
                    seconds=rng.uniform(2.0, 5.0),
                    seed=100 + serial,
                    tid_prefix=f"b{serial}",
                    lock_timeout=2.5,
                )
                stats["twins_started"] += 1
                twins.append((twin, time.monotonic() + rng.uniform(2.0, 5.0), rng.random() < 0.3))
                time.sleep(rng.uniform(0.8, 1.6))
            every = rng.random() < 0.7
            chosen = ["pg1", "pg2", "maria"] if every else rng.sample(["pg1", "pg2", "maria"], 1)
            stats["cuts"] += sum(cut(bank, r) for r in chosen)
        first.wait(timeout=60)
    finally:
        for p in [first, *(t for t, _, _ in twins)]:
            if p.poll() is None:
                p.kill()
            p.wait()
    for i, (p, _, _) in enumerate(twins, 1):
        err = (tmp_path / f"twin{i}.err").read_text()
        if p.returncode not in (0, -9) and "already in use" in err:
            stats["twins_refused"] += 1
        elif p.returncode in (0, -9):
            stats["twins_ran"] += 1
    # each log settles what it knows (its own incarnations); the other's are strangers
    for name in bank.conns:
        bank.reconnect(name)
    bank.wait_for_dead_sessions()
    left: dict[str, int] = {}
    for _ in range(3):
        for log in ("log-a", "log-b"):
            if (tmp_path / log).exists():
                with TransactionManager(bank.urls, tmp_path / log, NODE, sweeper=False) as tm:
                    tm.recover()
        left = {r: len(v) for r, v in bank.xatm_prepared().items() if v}
        if not left:
            break
    books = transfer_books(bank, intents, acks)
    durations = [float(x) for x in calls.read_text().split()] if calls.exists() else [0.0]
    summary = {
        "mode": "identity",
        **stats,
        "seconds": SECONDS,
        "transfers_attempted": books["attempted"],
        "transfers_acked": books["acked"],
        "longest_call_s": max(durations),
        "violations": {
            "split": len(books["split"]),
            "lost_acks": len(books["lost"]),
            "balance_delta": books["balance_delta"],
            "xatm_prepared_left": left,
        },
    }
    out = os.environ.get("XATM_CHAOS_REPORT")
    if out:
        Path(f"{out}.identity.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nchaos summary: " + json.dumps(summary), file=sys.stderr)
    roll_back_leftovers(bank, {NODE})
    assert books["split"] == [], books["split"][:5]
    assert books["lost"] == [], books["lost"][:5]
    assert books["balance_delta"] == 0
    assert left == {}
    assert max(durations) < CALL_BOUND, max(durations)
    assert stats["cuts"] > 0 and stats["twins_started"] > 0 and books["acked"] > 0
