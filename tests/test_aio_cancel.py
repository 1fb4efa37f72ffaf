"""Cancellation safety of the asyncio API, under load: many concurrent transfers, tasks
cancelled at random points (inside the block, at its end, in the middle of commit), then a
recovery pass; the books must show every transfer on all its branches or on none, balances
conserved, nothing prepared, and no connection left out of the pools."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from tests.support import Bank, Servers, run
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
