"""Where a saga's client CPU goes: ``python -m benchmarks.saga_profile``.

On private servers started as ``benchmarks.run`` starts them (or given by URL), the
``xatm-saga`` mode's saga (``modes.bench_saga``: a debit step on PostgreSQL, a credit step on
MariaDB) and the ``onepc`` loop (the same two updates as two plain local commits) each run a
fixed number of transfers on 1 and on 8 threads. For each it prints:

* **throughput and CPU**: transfers per second and the process's CPU
  (``time.process_time``, every thread, user and system) per transfer, no wrapper in place;
* **CPU per phase** of a saga, in a second run with wrappers (instance attributes and the
  barrier module's functions, benchmark-only) that charge each thread's
  ``time.thread_time`` to the innermost phase running: the record's creation and its other
  writes (``store.create``, ``store.save``), each resource's begin (XA START / BEGIN, with
  the barrier row riding in its round trip) and one-phase commit, the barrier (the rest of
  it: the enlistment), the action (the step's update), the pools, the audit trail, the
  step's xatm transaction around them
  (``SagaRunner._transaction``: gtrid, transaction object, enlistment, deadline) and the state
  machine (``run_saga`` and the runner outside all of these);
* a **cProfile** top 30 (own time) of one thread running sagas alone.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import functools
import io
import pstats
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import xatm.sagas.barrier as barrier_module

from .env import BenchServers, Ledger
from .modes import Client, OnePCClient, RunContext, SagaMode

TABLE = "bench_sagaprof"


class Phases:
    """Exclusive CPU per phase: a thread's CPU goes to the innermost wrapped call running."""

    def __init__(self) -> None:
        self.on = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._threads: list[dict[str, float]] = []

    def _state(self) -> tuple[list[str], list[float], dict[str, float]]:
        st = getattr(self._local, "st", None)
        if st is None:
            st = self._local.st = ([], [0.0], collections.defaultdict(float))
            with self._lock:
                self._threads.append(st[2])
        return st

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.thread_time

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            stack, last, own = self._state()
            now = clock()
            if stack:
                own[stack[-1]] += now - last[0]
            stack.append(label)
            last[0] = now
            try:
                return fn(*args, **kwargs)
            finally:
                now = clock()
                own[stack.pop()] += now - last[0]
                last[0] = now

        return wrapper

    def switch(self, on: bool) -> None:
        """Start (from zero) or stop counting."""
        if on:
            with self._lock:
                for counter in self._threads:
                    counter.clear()
        self.on = on

    def collect(self) -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        with self._lock:
            for counter in self._threads:
                for label, sec in counter.items():
                    out[label] += sec
        return out


def instrument(mode: SagaMode, phases: Phases) -> Callable[[], None]:
    """Wrap the saga mode's manager for ``phases``; returns the call that unwraps the
    barrier module's functions (the rest goes with the manager)."""
    tm: Any = mode.tm
    runner = tm.sagas
    w = phases.wrap
    runner.run = w("state machine (run_saga, runner)", runner.run)
    runner._transaction = w("step transaction (xatm around the calls)", runner._transaction)
    runner.store.create = w("record: create (file, fsync, dir fsync)", runner.store.create)
    runner.store.save = w("record: save (steps done, end)", runner.store.save)
    runner.store.release = w("record: release", runner.store.release)
    runner._audit.record = w("audit trail", runner._audit.record)
    for name, participant in tm.context.resources.participants.items():
        participant.begin = w(f"{name}: begin", participant.begin)
        if hasattr(participant, "begin_with"):  # (absent before the barrier row rode with it)
            participant.begin_with = w(f"{name}: begin + barrier row", participant.begin_with)
        participant.commit_one_phase = w(f"{name}: one-phase commit", participant.commit_one_phase)
    for pool in tm.context.resources.pools.values():
        pool.get = w("pools", pool.get)
        pool.put = w("pools", pool.put)
    saga = runner.sagas["bench"]
    saga.steps[:] = [
        dataclasses.replace(s, action=w(f"{s.resources[0]}: action (update)", s.action))
        for s in saga.steps
    ]
    saved = barrier_module.enter_action, barrier_module.enter_compensation
    barrier_module.enter_action = w("barrier (insert)", barrier_module.enter_action)
    barrier_module.enter_compensation = w("barrier (insert)", barrier_module.enter_compensation)

    def undo() -> None:
        barrier_module.enter_action, barrier_module.enter_compensation = saved

    return undo


def run_loop(
    clients: Sequence[Client],
    per_thread: int,
    warmup: int,
    accounts: int,
    on: Callable[[bool], None],
) -> tuple[float, float, int]:
    """Every client in a thread of its own: ``warmup`` transfers, then ``per_thread`` timed.
    Returns (wall seconds, process CPU seconds, transfers) of the timed part."""
    n = len(clients)
    ready = threading.Barrier(n + 1)
    go = threading.Barrier(n + 1)
    done = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def work(i: int, client: Client) -> None:
        ids = list(range(i + 1, accounts + 1, n))
        k = 0
        try:
            for _ in range(warmup):
                client.transfer(ids[k % len(ids)], ids[(k + 1) % len(ids)], 1)
                k += 1
        except BaseException as e:
            errors.append(e)
        ready.wait()
        go.wait()
        try:
            if not errors:
                for _ in range(per_thread):
                    client.transfer(ids[k % len(ids)], ids[(k + 1) % len(ids)], 1)
                    k += 1
        except BaseException as e:
            errors.append(e)
        done.wait()

    threads = [
        threading.Thread(target=work, args=(i, c), daemon=True) for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    ready.wait()
    on(True)
    c0, w0 = time.process_time(), time.perf_counter()
    go.wait()
    done.wait()
    c1, w1 = time.process_time(), time.perf_counter()
    on(False)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return w1 - w0, c1 - c0, n * per_thread


def _line(what: str, threads: int, wall: float, cpu: float, count: int) -> str:
    return (
        f"  {what:<6} {threads} thread(s): {count / wall:8.1f} /s,"
        f" client CPU {1000 * cpu / count:6.3f} ms per transfer ({count} in {wall:.2f} s)"
    )


def profile_one_thread(mode: SagaMode, count: int, accounts: int, top: int) -> str:
    """cProfile (own time) of ``count`` sagas in this thread alone."""
    client = mode.client()
    for k in range(20):
        client.transfer(1 + k % 2, 2 - k % 2, 1)
    prof = cProfile.Profile()
    prof.enable()
    for k in range(count):
        client.transfer(1 + k % 2, 2 - k % 2, 1)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    out.write(f"\nxatm's own functions only, top {top} by own time:\n")
    stats.print_stats("/xatm/", top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saga_profile", description=__doc__)
    p.add_argument("--threads", default="1,8", help="thread counts (default 1,8)")
    p.add_argument("--sagas", type=int, default=1600, help="timed transfers per run (all threads)")
    p.add_argument("--warmup", type=int, default=30, help="transfers per thread before timing")
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--profile", type=int, default=500, help="sagas under cProfile (0: none)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--workdir", help="where the managers' logs go (default: a temp dir)")
    p.add_argument("--pg-url")
    p.add_argument("--mysql-url")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.threads.split(",")]
    with BenchServers(args.pg_url, args.mysql_url) as servers:
        assert servers.urls is not None
        ledger = Ledger(servers.urls, TABLE, args.accounts)
        ledger.create()
        workdir = Path(tempfile.mkdtemp(prefix="xatm-sagaprof-", dir=args.workdir))
        try:
            print(f"saga profile, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
            for threads in counts:
                per = max(1, args.sagas // threads)
                ctx = RunContext(servers.urls, TABLE, threads, workdir)
                onepc = [OnePCClient(ctx) for _ in range(threads)]
                try:
                    res = run_loop(onepc, per, args.warmup, args.accounts, lambda on: None)
                finally:
                    for c in onepc:
                        c.close()
                print(_line("onepc", threads, *res))
                mode = SagaMode(ctx)
                try:
                    clients = [mode.client() for _ in range(threads)]
                    res = run_loop(clients, per, args.warmup, args.accounts, lambda on: None)
                    print(_line("saga", threads, *res))
                    phases = Phases()
                    undo = instrument(mode, phases)
                    try:
                        wall, cpu, count = run_loop(clients, per, 5, args.accounts, phases.switch)
                    finally:
                        undo()
                    split = phases.collect()
                    total = sum(split.values())
                    print(
                        f"    per phase, ms of thread CPU per saga (wrapped run:"
                        f" {count / wall:.1f} /s, process CPU {1000 * cpu / count:.3f} ms):"
                    )
                    for label, sec in sorted(split.items(), key=lambda kv: -kv[1]):
                        print(f"      {1000 * sec / count:7.3f}  {label}")
                    print(f"      {1000 * total / count:7.3f}  (sum of the client threads)")
                finally:
                    mode.close()
            if args.profile:
                ctx = RunContext(servers.urls, TABLE, 1, workdir)
                mode = SagaMode(ctx)
                try:
                    print(f"\ncProfile of {args.profile} sagas on one thread (own time):")
                    print(profile_one_thread(mode, args.profile, args.accounts, args.top))
                finally:
                    mode.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            ledger.drop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
