"""Cancellation safety of the asyncio API, under load: many concurrent transfers, tasks
cancelled at random points (inside the block, at its end, in the middle of commit), then a
recovery pass; the books must show every transfer on all its branches or on none, balances
conserved, nothing prepared, and no connection left out of the pools. The same after
``asyncio.run()`` cancels the transfers left at its shutdown, in coordinator processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.support import ROOT, Bank, Servers, run
from tests.support.recovery import wait_for
from xatm import TransactionManager
from xatm.aio import AsyncTransaction, AsyncTransactionManager

TASKS = 400
CONCURRENCY = 48


async def _transfer(
    tm: AsyncTransactionManager,
    bank: Bank,
    tid: str,
    legs: list[tuple[str, int, int]],
    seen: dict[str, AsyncTransaction],
) -> None:
    async with tm.transaction() as tx:
        seen[tid] = tx
        for resource, account, delta in legs:
            await tx.execute(
                resource,
                f"UPDATE {bank.table} SET bal = bal + %s WHERE id = %s",
                (delta, account),
            )
        for resource in sorted({leg[0] for leg in legs}):
            await tx.execute(resource, f"INSERT INTO {bank.journal} (tid) VALUES (%s)", (tid,))


def test_random_cancellations_leave_the_books_straight(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    rng = random.Random(11)
    names = sorted(servers.urls)
    seen: dict[str, AsyncTransaction] = {}
    plans: dict[str, list[str]] = {}
    results: Counter[str] = Counter()
    errors: list[BaseException] = []
    cancelled: set[str] = set()

    async def one(tm: AsyncTransactionManager, gate: asyncio.Semaphore, i: int) -> None:
        async with gate:
            tid = f"c{i}"
            chosen = sorted(rng.sample(names, rng.choice([2, 3])))
            plans[tid] = chosen
            account = rng.randint(1, 4)
            legs = [(chosen[0], account, -10 * (len(chosen) - 1))]
            legs += [(r, account, 10) for r in chosen[1:]]
            task = asyncio.ensure_future(_transfer(tm, bank, tid, legs, seen))
            if rng.random() < 0.6:
                delay = rng.uniform(0, 0.02)
                asyncio.get_running_loop().call_later(delay, task.cancel)
            try:
                await task
                results["returned"] += 1
            except asyncio.CancelledError:
                results["cancelled"] += 1
                cancelled.add(tid)
            except Exception as e:
                results[type(e).__name__] += 1
                errors.append(e)

    async def main() -> dict[str, int]:
        async with AsyncTransactionManager(
            servers.urls, tmp_path / "log", "aiochaos", timeout=10, sweeper=False
        ) as tm:
            gate = asyncio.Semaphore(CONCURRENCY)
            await asyncio.gather(*(one(tm, gate, i) for i in range(TASKS)))
            in_use = tm.in_use
            assert all(n == 0 for n in in_use.values()), in_use
            idle_in_tx = run(
                bank.conns["pg1"],
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'xatm'"
                " AND state LIKE 'idle in transaction%%'",
            )[0][0]
            assert idle_in_tx == 0
            open_xa = run(bank.conns["maria"], "SELECT count(*) FROM information_schema.innodb_trx")
            assert int(open_xa[0][0]) == 0
            report = await tm.recover()
            return {
                "recovered_committed": report.committed,
                "recovered_rolled_back": report.rolled_back,
            }

    recovered = asyncio.run(main())
    journal = bank.journal_ids()
    states: Counter[str] = Counter()
    violations = []
    for tid, chosen in plans.items():
        present = [r for r in names if tid in journal[r]]
        if present and present != chosen:
            violations.append((tid, chosen, present))
        tx = seen.get(tid)
        state = tx.state.value if tx is not None else "not-started"
        states[state] += 1
        if state == "committed" and present != chosen:
            violations.append((tid, "acknowledged but not everywhere", present))
        if state == "committed" and tid in cancelled:
            states["cancelled after the decision: committed"] += 1
        if state == "rolled-back" and present:
            violations.append((tid, "rolled back but present", present))
    print(f"outcomes {dict(results)} states {dict(states)} recovery {recovered}")
    assert violations == []
    assert errors == []
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {n: [] for n in names}
    assert results["cancelled"] > 0 and states["committed"] > 0


SHUTDOWN_RUNS = int(os.environ.get("XATM_AIO_SHUTDOWN_RUNS", "16"))


def recover_all(tm: TransactionManager, bank: Bank) -> None:
    """Recovery passes until nothing is left prepared (a session of a dead process may
    still wait for a row lock of a prepared branch: recovery frees it); then close."""
    try:
        wait_for(
            lambda: tm.recover().in_doubt == 0 and not any(bank.xatm_prepared().values()),
            timeout=120,
            what="recovery after the shutdown",
        )
    finally:
        tm.close()


def test_asyncio_run_shutdown_at_random_points_leaves_the_books_straight(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """A coordinator process whose ``main`` returns while its transfers run: ``asyncio.run()``
    cancels them at its shutdown, wherever they are (a statement, a prepare, the COMMIT
    record's fsync, phase 2), sometimes with the manager closed under them first; the process
    exits. A recovery pass of the same node then finds every transfer on all its branches
    or on none, each acknowledged one everywhere, each rolled-back one nowhere."""
    rng = random.Random(17)
    names = sorted(servers.urls)
    reported: dict[str, tuple[list[str], str]] = {}
    for run_no in range(SHUTDOWN_RUNS):
        transfers = [
            {
                "tid": f"s{run_no}-{k}",
                "resources": rng.sample(names, rng.choice([2, 3])),
                "account": rng.randint(1, 4),
            }
            for k in range(6)
        ]
        cfg = {
            "urls": servers.urls,
            "log": str(tmp_path / "log"),
            "node_id": "aioshut",
            "table": bank.table,
            "journal": bank.journal,
            "transfers": transfers,
            "delay": rng.uniform(0.0, 0.4),
            "close": run_no % 3 == 2,
            "timeout": 5,  # a deadlock across the databases ends (and the drain) within it
        }
        path = tmp_path / "shutdown.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.run(
            [sys.executable, "-m", "tests.workers.aio_worker", "shutdown", str(path)],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.splitlines():
            out = json.loads(line)
            reported[out["tid"]] = (out["resources"], out["state"])
        # the node restarts and recovers (a session of the dead process may still wait for
        # a row lock of a prepared branch: recovery frees it)
        tm = TransactionManager(servers.urls, tmp_path / "log", "aioshut", sweeper=False)
        recover_all(tm, bank)
    assert len(reported) == 6 * SHUTDOWN_RUNS  # every transfer ended, however
    journal = bank.journal_ids()
    states: Counter[str] = Counter()
    violations = []
    for tid, (chosen, state) in reported.items():
        states[state] += 1
        present = sorted(r for r in names if tid in journal[r])
        if present and present != sorted(chosen):
            violations.append((tid, "split", chosen, present))
        if state == "committed" and present != sorted(chosen):
            violations.append((tid, "acknowledged but not everywhere", chosen, present))
        if state == "rolled-back" and present:
            violations.append((tid, "rolled back but present", chosen, present))
    print(f"shutdown runs {SHUTDOWN_RUNS}: states {dict(states)}")
    assert violations == []
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {n: [] for n in names}
