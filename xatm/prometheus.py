"""Prometheus metrics of every TransactionManager in this process (extra ``xatm[prometheus]``).

One collector per process (:func:`collector`) listens to ``xatm.core.events`` and keeps the
metrics of every node (a TransactionManager's ``node_id``) seen in the process, labelled by
``node``; several managers of one node_id add up. When ``prometheus_client`` is installed the
first TransactionManager registers it in prometheus_client's default registry
(:func:`autoinstall`), unless ``XATM_PROMETHEUS=0`` is set or :func:`install` /
:func:`uninstall` was called first. An application with its own registry::

    import xatm.prometheus
    xatm.prometheus.install(my_registry)    # before the first TransactionManager: then the
                                            # default registry is left alone

The metrics (docs/operations.md has the list with what to alert on) are declared in
:class:`XatmCollector`: a new one is one attribute there and one line in the handler of the
event it comes from.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from xatm.core import events as _events
from xatm.recovery import backlog as _backlog

OUTCOMES = ("committed", "rolled_back", "in_doubt", "heuristic")
PHASES = ("prepare", "decide", "commit", "rollback")
OPERATIONS = ("begin", "prepare", "commit", "commit_one_phase", "rollback")
PASS_RESULTS = ("ok", "failed")
RECOVERY_ACTIONS = (
    "commit", "rollback", "skip", "error", "heuristic", "verify", "end", "possibly-lost"
)  # fmt: skip
#: transaction and phase latencies: 0.5 ms to 30 s
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class XatmCollector(Collector):
    """xatm's metrics, fed by events; ``collect`` adds the gauges computed at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.transactions = Counter(
            "xatm_transactions",
            "Global transactions ended, by outcome (committed, rolled_back, in_doubt, heuristic)",
            ["node", "outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "xatm_transaction_duration_seconds",
            "Seconds from tm.transaction() to the end of the transaction",
            ["node"],
            buckets=BUCKETS,
            registry=None,
        )
        self.phases = Histogram(
            "xatm_transaction_phase_duration_seconds",
            "Seconds in each phase of a transaction's end (prepare, decide, commit, rollback)",
            ["node", "phase"],
            buckets=BUCKETS,
            registry=None,
        )
        self.branch_ops = Histogram(
            "xatm_branch_operation_duration_seconds",
            "Seconds of each branch operation (begin, prepare, commit, commit_one_phase,"
            " rollback), by resource name",
            ["node", "resource", "operation"],
            buckets=BUCKETS,
            registry=None,
        )
        self.branch_errors = Counter(
            "xatm_branch_operation_errors",
            "Branch operations that raised, by resource name",
            ["node", "resource", "operation"],
            registry=None,
        )
        self.heuristics = Counter(
            "xatm_heuristic_outcomes",
            "Branches of committed transactions found rolled back outside xatm (at commit or"
            " by recovery)",
            ["node"],
            registry=None,
        )
        self.recovery_actions = Counter(
            "xatm_recovery_actions",
            "Actions of recovery and sweeper passes (commit, rollback, skip, error, heuristic,"
            " verify, end), one per branch (end: per decision record)",
            ["node", "action"],
            registry=None,
        )
        self.recovery_passes = Counter(
            "xatm_recovery_passes",
            "Recovery and sweeper passes (dry runs excluded), by result (ok, failed)",
            ["node", "result"],
            registry=None,
        )
        self.recovery_duration = Histogram(
            "xatm_recovery_pass_duration_seconds",
            "Seconds per recovery or sweeper pass",
            ["node"],
            buckets=BUCKETS,
            registry=None,
        )
        self.fsyncs = Counter(
            "xatm_log_fsyncs",
            "Forced writes of the coordinator log (fsyncs of the file log, committed batches"
            " of the shared log)",
            ["node"],
            registry=None,
        )
        self.failovers = Counter(
            "xatm_failovers",
            "PostgreSQL resources found on a new timeline (a promoted standby, a restore)",
            ["node", "resource"],
            registry=None,
        )
        self.failover_losses = Counter(
            "xatm_failover_lost_transactions",
            "Transactions committed on a resource before it failed over that the new primary"
            " lacks (certainty=lost) or cannot vouch for (certainty=unknown): see xatm indoubt",
            ["node", "resource", "certainty"],
            registry=None,
        )
        self.metrics: tuple[Any, ...] = (
            self.transactions,
            self.duration,
            self.phases,
            self.branch_ops,
            self.branch_errors,
            self.heuristics,
            self.recovery_actions,
            self.recovery_passes,
            self.recovery_duration,
            self.fsyncs,
            self.failovers,
            self.failover_losses,
        )
        #: node -> its in-doubt backlog (xatm.recovery.backlog), measured at each scrape while a
        #: manager of the node lives, else as last measured
        self._backlog: dict[str, _backlog.Backlog] = {}
        #: node -> resource -> the gtrids the last pass that reached it left prepared there
        self._listings: dict[str, dict[str, frozenset[str]]] = {}
        #: node -> resource -> 1 if its last pass (or probe) reached it, 0 if not
        self._up: dict[str, dict[str, int]] = {}
        #: node -> 1 if its coordinator log can be read (0: failed, or unreachable)
        self._log_up: dict[str, int] = {}
        self._unreachable: dict[str, int] = {}
        self._strangers: dict[str, int] = {}
        self._last_pass: dict[str, float] = {}
        self._managers: dict[str, weakref.WeakSet[Any]] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._handlers: dict[type[_events.Event], Callable[[Any], None]] = {
            _events.ManagerOpened: self._opened,
            _events.ManagerClosed: self._closed,
            _events.TransactionFinished: self._transaction,
            _events.RecoveryPassFinished: self._recovery,
            _events.LogForced: lambda e: self._child(self.fsyncs, e.node).inc(),
            _events.FailoverDetected: self._failover,
            _events.FailoverChecked: self._failover_checked,
        }

    # -- events ----------------------------------------------------------------------------
    def __call__(self, event: _events.Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _node(self, node: str) -> None:
        """Create a node's labelled series at 0, so that they exist before the first event."""
        for outcome in OUTCOMES:
            self.transactions.labels(node, outcome)
        for action in RECOVERY_ACTIONS:
            self.recovery_actions.labels(node, action)
        for result in PASS_RESULTS:
            self.recovery_passes.labels(node, result)
        for phase in PHASES:
            self.phases.labels(node, phase)
        self.heuristics.labels(node)
        self.fsyncs.labels(node)
        self.duration.labels(node)
        self.recovery_duration.labels(node)
        with self._lock:
            self._backlog.setdefault(node, _backlog.Backlog())

    def _resources(self, node: str, names: Iterable[str]) -> None:
        """Create a node's per-resource series at 0."""
        for resource in names:
            for op in OPERATIONS:
                self.branch_ops.labels(node, resource, op)
                self.branch_errors.labels(node, resource, op)
            self.failovers.labels(node, resource)
            for certainty in ("lost", "unknown"):
                self.failover_losses.labels(node, resource, certainty)

    def _opened(self, e: _events.ManagerOpened) -> None:
        self._node(e.node)
        self._resources(e.node, _resource_names(e.manager))
        with self._lock:
            self._managers.setdefault(e.node, weakref.WeakSet()).add(e.manager)

    def _closed(self, e: _events.ManagerClosed) -> None:
        with self._lock:
            self._managers.get(e.node, weakref.WeakSet()).discard(e.manager)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (prometheus_client's lookup is the slow part)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _transaction(self, e: _events.TransactionFinished) -> None:
        child, node = self._child, e.node
        child(self.transactions, node, e.outcome).inc()
        child(self.duration, node).observe(e.duration)
        for phase in e.phases:
            child(self.phases, node, phase.name).observe(phase.end - phase.start)
        for op in e.ops:
            child(self.branch_ops, node, op.resource, op.op).observe(op.end - op.start)
            if op.error is not None:
                child(self.branch_errors, node, op.resource, op.op).inc()
        if e.heuristics:
            child(self.heuristics, node).inc(e.heuristics)

    def _recovery(self, e: _events.RecoveryPassFinished) -> None:
        if e.dry_run:
            return
        self._node(e.node)
        if e.report is None:
            self.recovery_passes.labels(e.node, "failed").inc()
            return
        self.recovery_passes.labels(e.node, "ok").inc()
        self.recovery_duration.labels(e.node).observe(e.duration)
        for action in e.report.actions:
            self.recovery_actions.labels(e.node, action.action).inc()
        if e.report.heuristics:
            self.heuristics.labels(e.node).inc(e.report.heuristics)
        listings = _backlog.left_by_resource(e.report)
        with self._lock:
            known = self._listings.setdefault(e.node, {})
            known.update(listings)  # an unreachable resource keeps its last listing
            up = self._up.setdefault(e.node, {})
            up.update({r: 1 for r in e.report.reached})
            up.update({r: 0 for r in e.report.unreachable})
            self._unreachable[e.node] = len(e.report.unreachable)
            self._strangers[e.node] = e.report.strangers
            self._last_pass[e.node] = e.wall_start + e.duration

    def _failover(self, e: _events.FailoverDetected) -> None:
        self.failovers.labels(e.node, e.resource).inc()
        for certainty in ("lost", "unknown"):
            self.failover_losses.labels(e.node, e.resource, certainty)

    def _failover_checked(self, e: _events.FailoverChecked) -> None:
        self.failover_losses.labels(e.node, e.resource, "lost").inc(e.lost)
        self.failover_losses.labels(e.node, e.resource, "unknown").inc(e.possibly_lost)

    # -- scrape ----------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        for metric in self.metrics:
            yield from metric.collect()
        yield from self._gauges()

    def _measure(self, node: str, manager: Any, now: float) -> None:
        """The node's backlog from its logs now (``xatm.recovery.backlog``), kept for the scrape."""
        try:
            ctx = manager.context
        except Exception:
            return
        pending, failed = _backlog.read_pending(ctx)
        with self._lock:
            listings = dict(self._listings.get(node, {}))
            unreachable = {r for r, ok in self._up.get(node, {}).items() if not ok}
            previous = self._backlog.get(node)
        measured = _backlog.measure(
            pending=pending,
            own_node=node,
            listings=listings,
            unreachable=unreachable,
            running=lambda g: ctx.running(g) is not None,
            now=now,
            grace=ctx.timeout,
        )
        with self._lock:
            # this node's log cannot be read: what it said last stands, unless more is seen
            if failed is None or previous is None or measured.total >= previous.total:
                self._backlog[node] = measured
            self._log_up[node] = 0 if failed is not None else 1

    def _gauges(self) -> Iterator[Metric]:
        now = time.time()
        with self._lock:
            live = {node: next(iter(ms), None) for node, ms in self._managers.items()}
        for node, manager in live.items():
            if manager is not None:
                self._measure(node, manager, now)
        in_doubt = GaugeMetricFamily(
            "xatm_in_doubt_transactions",
            "xatm transactions in doubt: a COMMIT decision pending in a coordinator log, or a"
            " branch left prepared with no decision (as last listed); not this process's running"
            " ones, nor another node's or undecided ones younger than the timeout",
            labels=["node"],
        )
        oldest = GaugeMetricFamily(
            "xatm_oldest_in_doubt_age_seconds",
            "Age of the oldest transaction counted in xatm_in_doubt_transactions (0 if none)",
            labels=["node"],
        )
        undecided = GaugeMetricFamily(
            "xatm_in_doubt_undecided_transactions",
            "Of xatm_in_doubt_transactions, those with no decision logged (branches left"
            " prepared, as the last pass that reached their resource listed them)",
            labels=["node"],
        )
        decisions = GaugeMetricFamily(
            "xatm_pending_decisions",
            "COMMIT decisions pending (no END) in the coordinator log of node `log` (counted"
            " in xatm_in_doubt_transactions): in doubt until every branch is committed",
            labels=["node", "log"],
        )
        per_resource = GaugeMetricFamily(
            "xatm_resource_in_doubt_transactions",
            "In-doubt transactions with a branch on the resource that is prepared or unknown"
            " (the resource unreachable, or not listed yet)",
            labels=["node", "resource"],
        )
        up = GaugeMetricFamily(
            "xatm_resource_up",
            "1 if the last pass or probe of the resource reached it, else 0 (0 until a"
            " connection succeeds)",
            labels=["node", "resource"],
        )
        log_up = GaugeMetricFamily(
            "xatm_log_up",
            "1 if this node's coordinator log can be read and written, 0 if it failed (a full"
            " disk: commits are refused until a restart) or cannot be reached (shared log)",
            labels=["node"],
        )
        unreachable = GaugeMetricFamily(
            "xatm_recovery_unreachable_resources",
            "Resources the last recovery or sweeper pass could not reach (the sweeper probes"
            " those it backs off from at every pass)",
            labels=["node"],
        )
        last = GaugeMetricFamily(
            "xatm_recovery_last_pass_timestamp_seconds",
            "When the last recovery or sweeper pass ended (seconds since the epoch)",
            labels=["node"],
        )
        running = GaugeMetricFamily(
            "xatm_sweeper_running",
            "1 if a live TransactionManager of this node runs its sweeper thread, else 0",
            labels=["node"],
        )
        identity = GaugeMetricFamily(
            "xatm_identity_held",
            "1 if this process holds its node's identity lease on the resource now, else 0"
            " (0: another process with the same node_id holds it, or its session is lost or"
            " silent: nothing is enlisted, prepared or decided there)",
            labels=["node", "resource"],
        )
        waiting = GaugeMetricFamily(
            "xatm_transactions_waiting_turn",
            "Transactions waiting at the start of their block for their turn under max_active"
            " now (0 without a limit)",
            labels=["node"],
        )
        strangers = GaugeMetricFamily(
            "xatm_stranger_transactions",
            "Branches the last recovery pass found prepared for this node_id by a process"
            " that its log does not list (a second process with the same node_id): left alone",
            labels=["node"],
        )
        with self._lock:
            for node, b in sorted(self._backlog.items()):
                in_doubt.add_metric([node], b.total)
                undecided.add_metric([node], b.undecided)
                created = b.oldest_created
                age = max(0.0, now - created) if b.total and created is not None else 0.0
                oldest.add_metric([node], age)
                for log, n in sorted(b.by_log.items()):
                    decisions.add_metric([node, log], n)
                for resource, n in sorted(b.by_resource.items()):
                    per_resource.add_metric([node, resource], n)
            ups = {node: dict(rs) for node, rs in self._up.items()}
            for node, ok in sorted(self._log_up.items()):
                log_up.add_metric([node], ok)
            for node, n in sorted(self._unreachable.items()):
                unreachable.add_metric([node], n)
            for node, at in sorted(self._last_pass.items()):
                last.add_metric([node], at)
            managers = {node: list(ms) for node, ms in self._managers.items()}
            for node, n in sorted(self._strangers.items()):
                strangers.add_metric([node], n)
        for node, ms in sorted(managers.items()):
            sweeping = any(_sweeping(m) for m in ms)
            if sweeping:  # its resources are probed: 0 until one answers
                for m in ms:
                    for resource in _resource_names(m):
                        ups.setdefault(node, {}).setdefault(resource, 0)
            running.add_metric([node], 1 if sweeping else 0)
            waiting.add_metric([node], sum(_waiting(m) for m in ms))
            held: dict[str, bool] = {}
            for m in ms:
                for status in _identity(m):
                    held[status.resource] = held.get(status.resource, False) or status.held
            for resource, ok in sorted(held.items()):
                identity.add_metric([node, resource], 1 if ok else 0)
        for node, rs in sorted(ups.items()):
            for resource, ok in sorted(rs.items()):
                up.add_metric([node, resource], ok)
        yield from (in_doubt, oldest, undecided, decisions, per_resource, up, log_up)
        yield from (unreachable, last, running, waiting, identity, strangers)


def _resource_names(manager: Any) -> list[str]:
    try:
        return list(manager.context.resources.names)
    except Exception:
        return []


def _identity(manager: Any) -> list[Any]:
    try:
        return list(manager.context.identity.status())
    except Exception:
        return []


def _waiting(manager: Any) -> int:
    try:
        return int(manager.context.admission.waiting)
    except Exception:
        return 0


def _sweeping(manager: Any) -> bool:
    try:
        return bool(manager.sweeper.running)
    except Exception:
        return False


_lock = threading.Lock()
_collector: XatmCollector | None = None
_installed: set[int] = set()  # id() of the registries the collector is registered in
_configured = False  # install() or uninstall() was called: autoinstall leaves it alone
_unsubscribe: Callable[[], None] | None = None


def collector() -> XatmCollector:
    """The process's collector (created and subscribed to xatm's events on first use)."""
    global _collector, _unsubscribe
    with _lock:
        if _collector is None:
            _collector = XatmCollector()
        if _unsubscribe is None:
            _unsubscribe = _events.subscribe(_collector)
        return _collector


def install(registry: CollectorRegistry | None = None) -> XatmCollector:
    """Register the collector in ``registry`` (default: prometheus_client's ``REGISTRY``).
    Idempotent; called before the first TransactionManager, it stops the automatic
    registration in the default registry."""
    global _configured
    target = REGISTRY if registry is None else registry
    c = collector()
    with _lock:
        _configured = True
        if id(target) not in _installed:
            target.register(c)
            _installed.add(id(target))
    return c


def installed(registry: CollectorRegistry | None = None) -> bool:
    """True if the collector is registered in ``registry`` (default ``REGISTRY``)."""
    with _lock:
        return id(REGISTRY if registry is None else registry) in _installed


def uninstall(registry: CollectorRegistry | None = None) -> None:
    """Remove the collector from ``registry`` (default ``REGISTRY``); once it is in no
    registry, it stops listening (its counts are kept for a later :func:`install`)."""
    global _configured, _unsubscribe
    target = REGISTRY if registry is None else registry
    with _lock:
        _configured = True
        if _collector is not None and id(target) in _installed:
            target.unregister(_collector)
            _installed.discard(id(target))
        if not _installed and _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None


def autoinstall() -> None:
    """What the first TransactionManager calls: :func:`install` into the default registry,
    unless the application already chose (``install``/``uninstall``)."""
    with _lock:
        if _configured:
            return
    install()
