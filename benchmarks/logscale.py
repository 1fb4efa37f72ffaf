"""Does a forced decision cost more CPU as more threads wait? ``python -m benchmarks.logscale``.

No servers: N threads each force a COMMIT decision, then sleep ``--gap`` ms (standing for a
transaction's round trips, off CPU), in a loop, on xatm's file log (``log_commit`` +
``log_end``, as a strict commit does) and on the durable floor's decision file
(``benchmarks.floor``, what ``raw-durable`` writes). For each thread count it prints decisions
per second, process CPU per decision (every thread, the log's flusher included), fsyncs per
second and the latency percentiles of the forced write. A design whose waiters all wake per
batch, or contend for one lock on waking, shows CPU per decision growing with the threads;
group commit alone makes it shrink (fewer fsyncs per decision).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from xatm.log.file import FileLog

from .floor import DecisionFile


def run(kind: str, threads: int, seconds: float, gap: float, workdir: Path) -> str:
    """One window of ``threads`` threads on ``kind`` ("file log" or "floor"); a table row."""
    d = Path(tempfile.mkdtemp(dir=workdir))
    flog = FileLog(d, "scale") if kind == "file log" else None
    floor = DecisionFile(d / "floor.log") if flog is None else None
    latencies: list[float] = []
    stop = threading.Event()

    def syncs() -> int:
        return flog.forces if flog is not None else floor.syncs if floor is not None else 0

    def loop(i: int) -> None:
        k = 0
        perf = time.perf_counter
        while not stop.is_set():
            k += 1
            gid = f"scale_{i}_{k}"
            t0 = perf()
            if flog is not None:
                flog.log_commit(gid, ("pg", "maria"))
                flog.log_end(gid)
            elif floor is not None:
                floor.commit(gid)
            latencies.append(perf() - t0)
            time.sleep(gap)

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    time.sleep(min(0.5, seconds / 4))  # warm-up
    latencies.clear()
    cpu0, s0 = time.process_time(), syncs()
    time.sleep(seconds)
    cpu1, s1, done = time.process_time(), syncs(), len(latencies)
    stop.set()
    for t in workers:
        t.join()
    if flog is not None:
        flog.close()
    if floor is not None:
        floor.close()
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [0.0] * 19
    per = 1e6 * (cpu1 - cpu0) / done if done else float("nan")
    return (
        f"| {kind} | {threads} | {done / seconds:.0f} | {per:.1f} | {(s1 - s0) / seconds:.0f}"
        f" | {1e3 * q[9]:.2f} | {1e3 * q[18]:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logscale", description=__doc__)
    p.add_argument("--threads", default="1,8,32,48", help="thread counts (default 1,8,32,48)")
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run")
    p.add_argument("--gap", type=float, default=1.0, help="ms each thread sleeps between two")
    p.add_argument("--dir", type=Path, help="where the logs go (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--threads: expected numbers like 8,48, got {args.threads!r}")
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.gap < 0:
        p.error("--threads must be positive, --seconds > 0 and --gap >= 0")
    with tempfile.TemporaryDirectory(prefix="xatm-logscale-", dir=args.dir) as tmp:
        print(
            "| log | threads | decisions/s | process CPU µs/decision | fsyncs/s"
            " | p50 ms | p95 ms |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        for threads in counts:
            for kind in ("file log", "floor"):
                print(run(kind, threads, args.seconds, args.gap / 1000, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
