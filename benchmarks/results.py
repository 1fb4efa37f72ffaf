"""What one benchmark run measured, and the per-client log it is computed from (shared by
the threaded driver and the asyncio one)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: a client that fails this often in one run stops (the servers are probably gone)
MAX_ERRORS_PER_CLIENT = 200


@dataclass(frozen=True)
class RunResult:
    """What one (mode, client count, round) measured."""

    mode: str
    clients: int
    round: int
    window: float  # seconds measured
    transactions: int  # committed inside the window
    errors: int  # failed transfers (whole run)
    latencies_ms: tuple[float, ...]  # of the transactions committed inside the window
    cpu_seconds: float  # process CPU time (user + system) during the window
    log_forces: int | None  # log fsyncs during the window (xatm only)
    log_records: int | None  # records those fsyncs made durable
    committed_total: int  # every committed transfer, warm-up included (for the books)
    first_error: str | None = None
    mysql: str = ""  # mysql-connector's class in this mode: "C extension" or "pure Python"
    processes: int = 1  # coordinator processes (multi-process modes: their children)
    pg_cpu: float | None = None  # PostgreSQL server CPU seconds in the window (private only)
    maria_cpu: float | None = None  # MariaDB server CPU seconds in the window (private only)
    pg_fsyncs: int | None = None  # PostgreSQL WAL fsyncs in the window (pg_stat_wal)
    maria_fsyncs: int | None = None  # MariaDB redo log fsyncs in the window

    @property
    def throughput(self) -> float:
        return self.transactions / self.window if self.window > 0 else 0.0

    @property
    def cpu_ms_per_tx(self) -> float | None:
        return 1000 * self.cpu_seconds / self.transactions if self.transactions else None


@dataclass
class _ThreadLog:
    done: list[tuple[float, float]] = field(default_factory=list)  # (finished at, latency)
    errors: list[tuple[float, str]] = field(default_factory=list)


Counters = tuple[int, int] | None


def window_result(
    name: str,
    clients: int,
    round_no: int,
    logs: list[_ThreadLog],
    window: tuple[float, float],
    cpu: tuple[float, float],
    log_counters: tuple[Counters, Counters],
    mysql: str = "",
) -> RunResult:
    """The RunResult of one measured window, from every client's log, the process CPU time
    and the coordinator log's (forces, records) counters at the window's start and end."""
    (w0, w1), (cpu0, cpu1), (log0, log1) = window, cpu, log_counters
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
        mysql=mysql,
    )
