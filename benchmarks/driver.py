"""Run one commit mode with N client threads and measure a timed window.

Each client thread loops transfers of 1 between two accounts of its own partition of the
account ids (client ``i`` of ``n`` uses ids ``i+1, i+1+n, ...``), so clients never wait for
each other's row locks: what is measured is the commit protocol, not lock contention. The
clients first run for ``warmup`` seconds (connections, caches, JIT-free Python warm paths),
then a window of ``seconds`` is measured: transactions that *finished* inside it count for
throughput and latency, and the process CPU time used during it is divided by their number.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from .modes import Client, Mode, ModeFactory, RunContext
from .results import MAX_ERRORS_PER_CLIENT, RunResult, _ThreadLog, window_result
from .servermeter import ServerMeter


def _client_loop(
    client: Client,
    index: int,
    clients: int,
    accounts: int,
    seed: int,
    start: threading.Barrier,
    stop: threading.Event,
    out: _ThreadLog,
) -> None:
    rng = random.Random(seed * 1000 + index)
    ids = range(index + 1, accounts + 1, clients)
    perf = time.perf_counter
    try:
        start.wait()
    except threading.BrokenBarrierError:
        return
    while not stop.is_set():
        debit, credit = rng.choice(ids), rng.choice(ids)
        t0 = perf()
        try:
            client.transfer(debit, credit, 1)
        except Exception as e:
            out.errors.append((perf(), f"{type(e).__name__}: {e}"))
            if len(out.errors) >= MAX_ERRORS_PER_CLIENT:
                return
            continue
        t1 = perf()
        out.done.append((t1, t1 - t0))


def run_clients(
    name: str,
    mode: Mode,
    *,
    clients: int,
    accounts: int,
    seconds: float,
    warmup: float,
    round_no: int = 0,
    during_window: Callable[[float], None] | None = None,
    before_window: Callable[[], None] | None = None,
    first_index: int = 0,
    total_clients: int | None = None,
) -> RunResult:
    """Run ``clients`` threads on ``mode`` (already set up) and measure one window.

    ``during_window(seconds)``, if given, is called at the start of the window in place of
    sleeping through it (a profiler uses it) and must return after about ``seconds``.
    ``before_window()``, if given, is called once the clients run, in place of the warm-up
    sleep. A process running some of a run's clients (``benchmarks.mp_child``) gives its
    threads' ``first_index`` among ``total_clients`` (the account partitions are over all).
    """
    total = clients if total_clients is None else total_clients
    if accounts < 2 * total:
        raise ValueError(f"{accounts} accounts are too few for {total} clients")
    if hasattr(mode, "measure"):  # a multi-process mode: its children run the clients
        return mode.measure(  # type: ignore[no-any-return]
            name,
            accounts=accounts,
            seconds=seconds,
            warmup=warmup,
            round_no=round_no,
            during_window=during_window,
        )
    if hasattr(mode, "async_client"):  # an asyncio mode: tasks on one loop, not threads
        from .aio_driver import run_tasks

        return run_tasks(name, mode, clients, accounts, seconds, warmup, round_no, during_window)
    made: list[Client] = []
    threads: list[threading.Thread] = []
    logs = [_ThreadLog() for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = threading.Event()
    try:
        made.extend(mode.client() for _ in range(clients))
        for i, client in enumerate(made):
            t = threading.Thread(
                target=_client_loop,
                args=(client, first_index + i, total, accounts, round_no, start, stop, logs[i]),
                name=f"bench-client-{i}",
                daemon=True,
            )
            t.start()
            threads.append(t)
        start.wait()
        if before_window is None:
            time.sleep(warmup)
        else:
            before_window()
        log0 = mode.log_counters()
        cpu0, w0 = time.process_time(), time.perf_counter()
        if during_window is None:
            time.sleep(seconds)
        else:
            during_window(seconds)
        cpu1, w1 = time.process_time(), time.perf_counter()
        log1 = mode.log_counters()
    finally:
        stop.set()
        start.abort()
        for t in threads:
            t.join()
        for client in made:
            client.close()
    return window_result(
        name, clients, round_no, logs, (w0, w1), (cpu0, cpu1), (log0, log1), mode.mysql_kind
    )


def run_once(
    name: str,
    factory: ModeFactory,
    ctx: RunContext,
    *,
    accounts: int,
    seconds: float,
    warmup: float,
    round_no: int = 0,
    meter: ServerMeter | None = None,
) -> RunResult:
    """Set ``name``'s mode up for ``ctx.clients`` clients, measure one window, tear down.
    With a ``meter``, the servers' CPU time and fsyncs during the window are added."""
    mode = factory(ctx)
    try:
        result = run_clients(
            name,
            mode,
            clients=ctx.clients,
            accounts=accounts,
            seconds=seconds,
            warmup=warmup,
            round_no=round_no,
            during_window=None if meter is None else meter.window,
        )
    finally:
        mode.close()
    usage = None if meter is None else meter.last
    if usage is None:
        return result
    return replace(
        result,
        pg_cpu=usage.pg_cpu,
        maria_cpu=usage.maria_cpu,
        pg_fsyncs=usage.pg_fsyncs,
        maria_fsyncs=usage.maria_fsyncs,
    )
