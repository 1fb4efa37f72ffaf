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

from .results import MAX_ERRORS_PER_CLIENT, RunResult, _ThreadLog


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
    inside = [lat for log in logs for at, lat in log.done if w0 <= at <= w1]
    errors = [err for log in logs for err in log.errors]
    return RunResult(
        mode=name,
        clients=clients,
        round=round_no,
        window=w1 - w0,
        transactions=len(inside),
        errors=len(errors),
        latencies_ms=tuple(1000 * lat for lat in inside),
        cpu_seconds=cpu1 - cpu0,
        log_forces=None if log0 is None or log1 is None else log1[0] - log0[0],
        log_records=None if log0 is None or log1 is None else log1[1] - log0[1],
        committed_total=sum(len(log.done) for log in logs),
        first_error=min(errors)[1] if errors else None,
    )
