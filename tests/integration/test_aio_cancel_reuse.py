"""Cheap cancellation in the asyncio API: transfers cancelled at random moments under
``asyncio.timeout`` leave the books straight, and a PostgreSQL connection whose statement was
cancelled is rolled back and reused (its state is known once psycopg's cancel completed), so
the connections opened stay near the pool's size instead of growing with the cancellations."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from tests.support import Bank, Servers, run
from xatm.aio import AsyncTransactionManager

TRANSFERS = 240
CONCURRENCY = 8


async def _transfer(tm: AsyncTransactionManager, bank: Bank, account: int) -> None:
    async with tm.transaction() as tx:
        sql = f"UPDATE {bank.table} SET bal = bal + %s WHERE id = %s"
        await tx.execute("pg1", sql, (-10, account))
        await tx.execute("pg1", "SELECT pg_sleep(0.003)")  # a statement worth cancelling
        await tx.execute("maria", sql, (10, account))


def test_cancelled_transfers_reuse_their_postgresql_connections(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    rng = random.Random(22)
    urls = {name: servers.urls[name] for name in ("pg1", "maria")}
    outcomes: Counter[str] = Counter()

    async def one(tm: AsyncTransactionManager, gate: asyncio.Semaphore, span: float) -> None:
        async with gate:
            try:
                async with asyncio.timeout(rng.uniform(0.0, span)):
                    await _transfer(tm, bank, rng.randint(1, 4))
                outcomes["committed"] += 1
            except TimeoutError:
                outcomes["cancelled"] += 1

    async def main() -> tuple[dict[str, int], dict[str, int], int]:
        async with AsyncTransactionManager(
            urls, tmp_path / "log", "aioreuse", timeout=10, sweeper=False, pool_size=CONCURRENCY
        ) as tm:
            # warm up (the resources' checks, the pools), and time a transfer under load
            await asyncio.gather(*(_transfer(tm, bank, 1 + i % 4) for i in range(CONCURRENCY)))
            times = []
            for _ in range(3):
                t0 = asyncio.get_running_loop().time()
                await asyncio.gather(*(_transfer(tm, bank, 1 + i % 4) for i in range(CONCURRENCY)))
                times.append(asyncio.get_running_loop().time() - t0)
            opened_before = dict(tm.connections_opened)
            gate = asyncio.Semaphore(CONCURRENCY)
            # timeouts from 0 to about 3 transfers: cancelled anywhere, or not at all
            span = 3 * sorted(times)[1]
            await asyncio.gather(*(one(tm, gate, span) for _ in range(TRANSFERS)))
            await asyncio.sleep(0.2)  # the resets still running end
            in_use = tm.in_use
            opened = {n: k - opened_before[n] for n, k in tm.connections_opened.items()}
            idle_in_tx = run(
                bank.conns["pg1"],
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'xatm'"
                " AND state LIKE 'idle in transaction%%'",
            )[0][0]
            await tm.recover()
        return in_use, opened, int(idle_in_tx)

    in_use, opened, idle_in_tx = asyncio.run(main())
    print(f"outcomes {dict(outcomes)} connections opened {opened}")
    assert outcomes["cancelled"] >= 30 and outcomes["committed"] >= 30, outcomes
    assert all(n == 0 for n in in_use.values()), in_use
    assert idle_in_tx == 0  # every reused session was rolled back
    assert bank.total() == bank.initial_total
    balances = bank.balances()
    assert sum(balances["pg1"].values()) + sum(balances["maria"].values()) == 8 * 1000
    assert bank.xatm_prepared() == {name: [] for name in servers.urls}
    # without reuse every cancel inside a PostgreSQL statement opened a connection more
    assert opened["pg1"] <= 2, opened
