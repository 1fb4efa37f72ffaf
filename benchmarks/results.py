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
