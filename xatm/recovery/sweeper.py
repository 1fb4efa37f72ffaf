"""The sweeper: recovery passes on a background thread, every ``interval`` seconds.

Every Context runs one unless it is built with ``sweeper=False`` (or the config
file says ``[sweeper] enabled = false``). It is what resolves, without anyone watching, the
branches left prepared by a crash of this process (found when it starts again), by a dead
peer sharing the log directory, or by a phase 2 that could not finish.

* The first pass runs one ``interval`` after the start; call :meth:`Sweeper.wake` (or
  ``tm.recover()``) to run one at once.
* A resource that cannot be reached is skipped with a warning and retried with exponential
  backoff (``interval``, 2x, 4x ... up to ``max_backoff``); the others are swept as usual.
  While it backs off, every pass still *probes* it (one bounded ping,
  ``xatm.recovery.reachability``): the pass reports it unreachable as long as it is, whatever the
  back-off, and once it answers again the back-off ends and the next pass sweeps it.
  An error in one resource or one pass never stops the thread.
* Passes never overlap with each other or with ``tm.recover()`` (they share one lock), and
  are safe next to live coordinators by the rules of ``xatm.recovery.run``.
* :meth:`Sweeper.stop` (called by ``tm.close()``) ends the thread after the pass in flight.
* :meth:`Sweeper.status` tells when the pass in flight began (``xatm sweep``'s liveness
  endpoint notices a pass that takes too long).
* With a file log, every :data:`~xatm.recovery.retention.RETIRE_EVERY` seconds after a pass it
  removes the finished logs of nodes dead for ``log_retention`` seconds
  (``xatm.recovery.retention``).

The ``[sweeper]`` table of a config file::

    [sweeper]
    enabled = true          # default
    interval = 10.0         # seconds between passes (default 10)
    log_retention = 604800  # seconds a dead node's finished log is kept (7 days; 0: for ever)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xatm.core.deadline import step_bound
from xatm.core.logfields import log_fields
from xatm.core.report import RecoveryReport
from xatm.errors import ConfigurationError
from xatm.recovery.retention import DEFAULT_LOG_RETENTION, RETIRE_EVERY, Retirement
from xatm.recovery.run import run_pass

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.sweeper")

DEFAULT_INTERVAL = 10.0
DEFAULT_MAX_BACKOFF = 60.0


def validate_interval(interval: object, what: str = "sweep_interval") -> float:
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise ConfigurationError(f"{what} must be a positive number of seconds, got {interval!r}")
    return float(interval)


@dataclass(frozen=True, slots=True)
class SweeperSettings:
    """The ``[sweeper]`` table of a config file."""

    enabled: bool = True
    interval: float = DEFAULT_INTERVAL
    log_retention: float = DEFAULT_LOG_RETENTION


def sweeper_settings(extra: Mapping[str, Any]) -> SweeperSettings:
    """Validate the ``sweeper`` table carried in ``Settings.extra``."""
    table = extra.get("sweeper", {})
    if not isinstance(table, Mapping):
        raise ConfigurationError("[sweeper] must be a table (enabled = ..., interval = ...)")
    unknown = set(table) - {"enabled", "interval", "log_retention"}
    if unknown:
        raise ConfigurationError(f"unknown setting(s) in [sweeper]: {', '.join(sorted(unknown))}")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError(f"[sweeper] enabled must be true or false, got {enabled!r}")
    interval = validate_interval(table.get("interval", DEFAULT_INTERVAL), "[sweeper] interval")
    retention = table.get("log_retention", DEFAULT_LOG_RETENTION)
    if isinstance(retention, bool) or not isinstance(retention, int | float) or retention < 0:
        raise ConfigurationError(
            f"[sweeper] log_retention must be a number of seconds >= 0, got {retention!r}"
        )
    return SweeperSettings(enabled, interval, float(retention))


@dataclass(frozen=True, slots=True)
class ResourceBackoff:
    """A resource the sweeper is currently backing off from."""

    resource: str
    failures: int  # consecutive passes that could not reach it
    retry_in_s: float
    error: str


@dataclass(frozen=True, slots=True)
class SweeperStatus:
    """A snapshot of the sweeper's state."""

    running: bool
    interval: float
    passes: int
    failed_passes: int
    last_pass_at: float | None  # seconds since the epoch
    last_report: RecoveryReport | None
    backoff: tuple[ResourceBackoff, ...]
    pass_started_at: float | None = None  # seconds since the epoch: the pass in flight


class _Backoff:
    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0
        self.error = ""


class Sweeper:
    """Runs recovery passes of one Context on a daemon thread."""

    def __init__(
        self,
        ctx: Context,
        interval: float = DEFAULT_INTERVAL,
        *,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        actor: str | None = None,
        after_pass: Callable[[str], object] | None = None,
    ) -> None:
        self._ctx = ctx
        #: run after each pass with the sweeper's actor (the manager's saga recovery)
        self._after_pass = after_pass
        self.interval = validate_interval(interval)
        self.max_backoff = max(validate_interval(max_backoff, "max_backoff"), self.interval)
        self.actor = actor or f"sweeper@{ctx.node_id}"
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._backoff: dict[str, _Backoff] = {}
        self._passes = 0
        self._failed = 0
        self._last_at: float | None = None
        self._last: RecoveryReport | None = None
        self._failing = False
        self._pass_started: float | None = None
        #: seconds after which a pass still in flight counts as stuck (``xatm sweep``'s
        #: liveness): two bounded steps on a silent server (``xatm.core.deadline``)
        self.stuck_after = 2 * step_bound(ctx.timeout)
        #: seconds a dead node's finished file log is kept (0: for ever): xatm.recovery.retention
        self.log_retention = DEFAULT_LOG_RETENTION
        #: seconds between two looks at the log directory for logs to retire
        self.retire_every = RETIRE_EVERY
        self._retired_at = float("-inf")  # monotonic time of the last look

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (no-op if it runs)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._wakeup.clear()
            self._thread = threading.Thread(
                target=self._loop, name=f"xatm-sweeper-{self._ctx.node_id}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop the thread after the pass in flight (if any) and wait for it."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wakeup.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "the sweeper thread did not stop within %s s",
                    timeout,
                    extra=log_fields(self._ctx.node_id),
                )

    def wake(self) -> None:
        """Run the next pass now instead of at the end of the interval."""
        self._wakeup.set()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    def status(self) -> SweeperStatus:
        now = time.monotonic()
        with self._lock:
            backoff = tuple(
                ResourceBackoff(name, b.failures, max(0.0, b.next_try - now), b.error)
                for name, b in sorted(self._backoff.items())
                if b.failures
            )
            return SweeperStatus(
                running=self.running,
                interval=self.interval,
                passes=self._passes,
                failed_passes=self._failed,
                last_pass_at=self._last_at,
                last_report=self._last,
                backoff=backoff,
                pass_started_at=self._pass_started,
            )

    # -- passes ----------------------------------------------------------------------------
    def run_once(self) -> RecoveryReport:
        """One pass over the resources that are due (not backing off); updates the backoff."""
        now = time.monotonic()
        with self._lock:
            due = [
                name
                for name in self._ctx.resources.names
                if self._backoff.setdefault(name, _Backoff()).next_try <= now
            ]
        waiting = [name for name in self._ctx.resources.names if name not in due]
        with self._lock:
            self._pass_started = time.time()
        try:
            report = run_pass(
                self._ctx, resources=lambda: due, actor=self.actor, probe=lambda: waiting
            )
            if self._after_pass is not None:
                self._after_pass(self.actor)  # sagas, after 2PC: their in-doubt steps settled
        finally:
            with self._lock:
                self._pass_started = None
        problems = dict(report.problems)
        with self._lock:
            for name in due:
                b = self._backoff[name]
                if name in problems:
                    b.failures += 1
                    b.error = problems[name]
                    delay = min(self.max_backoff, self.interval * 2 ** (b.failures - 1))
                    b.next_try = time.monotonic() + delay
                    logger.warning(
                        "sweeper: resource %r skipped (%s); retrying in %.1f s",
                        name,
                        b.error,
                        delay,
                        extra=log_fields(self._ctx.node_id, resource=name),
                    )
                elif b.failures:
                    logger.info(
                        "sweeper: resource %r is reachable again after %d failed attempt(s)",
                        name,
                        b.failures,
                        extra=log_fields(self._ctx.node_id, resource=name),
                    )
                    b.failures, b.next_try, b.error = 0, 0.0, ""
            for name in waiting:
                b = self._backoff[name]
                if name in problems:
                    b.error = problems[name]
                elif b.failures:  # it answers again: swept by the next pass
                    logger.info(
                        "sweeper: resource %r answers again after %d failed attempt(s)",
                        name,
                        b.failures,
                        extra=log_fields(self._ctx.node_id, resource=name),
                    )
                    b.failures, b.next_try, b.error = 0, 0.0, ""
            self._passes += 1
            self._last_at = time.time()
            self._last = report
        if report.committed or report.rolled_back or report.heuristics or report.ended:
            logger.info(
                "sweeper: %d committed, %d rolled back, %d left in doubt, %d heuristic,"
                " %d decision(s) closed",
                report.committed,
                report.rolled_back,
                report.in_doubt,
                report.heuristics,
                report.ended,
                extra=log_fields(self._ctx.node_id),
            )
        if time.monotonic() - self._retired_at >= self.retire_every:
            self._retired_at = time.monotonic()
            try:
                self.retire_logs()
            except Exception as e:  # never fails the pass: tried again later
                logger.warning(
                    "sweeper: retiring old logs failed: %s", e, extra=log_fields(self._ctx.node_id)
                )
        return report

    def retire_logs(self, *, dry_run: bool = False, now: float | None = None) -> list[Retirement]:
        """Remove the finished file logs of nodes dead for :attr:`log_retention` seconds (at
        least the decision retention); see ``xatm.recovery.retention``."""
        ctx = self._ctx
        if self.log_retention <= 0:
            return []
        return ctx.store.retire_logs(  # a shared log keeps no files: it retires none
            max(self.log_retention, ctx.retain),
            own_node=ctx.node_id,
            prepared_nodes=self._prepared_nodes,
            audit=lambda reason, outcome: ctx.audit.record(
                "", "", "", "retire", reason, outcome, self.actor
            ),
            dry_run=dry_run,
            now=now,
        )

    def _prepared_nodes(self) -> set[str] | None:
        """The nodes with a branch prepared on some resource; None if one cannot be asked."""
        nodes: set[str] = set()
        for name in self._ctx.resources.names:
            try:
                with self._ctx.resources.borrow(
                    name, recovery=True, what="a listing of prepared branches"
                ) as (participant, conn):
                    branches = participant.recover(conn)
            except Exception:
                return None
            nodes |= {b.xid.node_id for b in branches if b.xid is not None and b.xid.is_xatm}
        return nodes

    def _loop(self) -> None:
        while True:
            self._wakeup.wait(self.interval)
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                self.run_once()
                if self._failing:
                    logger.info(
                        "sweeper: passes succeed again", extra=log_fields(self._ctx.node_id)
                    )
                self._failing = False
            except Exception:
                with self._lock:
                    self._failed += 1
                if not self._failing:  # the traceback once per failure streak
                    logger.exception(
                        "sweeper: the pass failed; the next one retries",
                        extra=log_fields(self._ctx.node_id),
                    )
                self._failing = True
