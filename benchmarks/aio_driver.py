"""``benchmarks.driver.run_clients`` for asyncio modes: N client *tasks* on one event loop.

The same measurement as the threaded driver: each task loops transfers within its own
partition of the accounts; after ``warmup`` seconds a window of ``seconds`` is measured
(transactions finished inside it, process CPU time during it, log fsyncs).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from .results import MAX_ERRORS_PER_CLIENT, RunResult, _ThreadLog, window_result


async def _task_loop(
    client: Any,
    index: int,
    clients: int,
    accounts: int,
    seed: int,
    stop: list[bool],
    out: _ThreadLog,
) -> None:
    rng = random.Random(seed * 1000 + index)
    ids = range(index + 1, accounts + 1, clients)
    perf = time.perf_counter
    while not stop[0]:
        debit, credit = rng.choice(ids), rng.choice(ids)
        t0 = perf()
        try:
            await client.transfer(debit, credit, 1)
        except Exception as e:
            out.errors.append((perf(), f"{type(e).__name__}: {e}"))
            if len(out.errors) >= MAX_ERRORS_PER_CLIENT:
                return
            continue
        t1 = perf()
        out.done.append((t1, t1 - t0))


def run_tasks(
    name: str,
    mode: Any,
    clients: int,
    accounts: int,
    seconds: float,
    warmup: float,
    round_no: int,
    during_window: Callable[[float], None] | None,
) -> RunResult:
    logs = [_ThreadLog() for _ in range(clients)]

    async def main() -> tuple[float, float, float, float, Any, Any]:
        await mode.open()
        made = [await mode.async_client() for _ in range(clients)]
        stop = [False]
        try:
            tasks = [
                asyncio.ensure_future(_task_loop(c, i, clients, accounts, round_no, stop, logs[i]))
                for i, c in enumerate(made)
            ]
            await asyncio.sleep(warmup)
            log0 = mode.log_counters()
            cpu0, w0 = time.process_time(), time.perf_counter()
            if during_window is None:
                await asyncio.sleep(seconds)
            else:
                await asyncio.to_thread(during_window, seconds)
            cpu1, w1 = time.process_time(), time.perf_counter()
            log1 = mode.log_counters()
            stop[0] = True
            await asyncio.gather(*tasks)
        finally:
            stop[0] = True
            for c in made:
                await c.close()
            await mode.aclose()
        return cpu0, cpu1, w0, w1, log0, log1

    cpu0, cpu1, w0, w1, log0, log1 = asyncio.run(main())
    return window_result(
        name, clients, round_no, logs, (w0, w1), (cpu0, cpu1), (log0, log1), mode.mysql_kind
    )
