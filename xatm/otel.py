"""OpenTelemetry spans of xatm's transactions and recovery passes (extra ``xatm[otel]``).

Needs only ``opentelemetry-api``; the application installs and configures the SDK (a
TracerProvider with its exporters), then calls :func:`instrument` once::

    import xatm.otel
    xatm.otel.instrument()          # or instrument(tracer_provider=provider)

Spans (built when the transaction or pass has ended, with their real start and end times, as
children of the span that is current at that moment, usually the application's own span
around the ``with tm.transaction()`` block):

* ``xatm.transaction``: ``xatm.gtrid``, ``xatm.outcome``, ``xatm.node``, ``xatm.resources``;
  its children ``xatm.prepare``, ``xatm.decide``, ``xatm.commit`` (and ``xatm.rollback``),
  one per phase, and ``xatm.branch.<operation>`` (``begin``, ``prepare``, ``commit``,
  ``commit_one_phase``, ``rollback``), one per branch operation, under the phase it ran in,
  with ``db.system.name`` (``postgresql``, ``mysql``, ``mariadb``), ``server.address``,
  ``server.port``, ``db.namespace``, ``db.operation.name`` and ``xatm.resource``.
  psycopg's instrumentation does not see the tpc/XA statements: these spans are xatm's own.
* ``xatm.recovery``: one per recovery or sweeper pass, with its counts as attributes and an
  ``xatm.recovery.action`` event per action taken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from xatm.core import events as _events

_lock = threading.Lock()
_unsubscribe: Callable[[], None] | None = None


def instrument(tracer_provider: TracerProvider | None = None) -> None:
    """Emit spans from now on (through ``tracer_provider``, default the global one).
    Calling it again replaces the provider."""
    global _unsubscribe
    tracer = trace.get_tracer("xatm", tracer_provider=tracer_provider)
    spans = _Spans(tracer)
    with _lock:
        if _unsubscribe is not None:
            _unsubscribe()
        _unsubscribe = _events.subscribe(spans)


def uninstrument() -> None:
    """Stop emitting spans."""
    global _unsubscribe
    with _lock:
        if _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class _Spans:
    """Turns events into spans."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __call__(self, event: _events.Event) -> None:
        if isinstance(event, _events.TransactionFinished):
            self.transaction(event)
        elif isinstance(event, _events.RecoveryPassFinished):
            self.recovery(event)

    def transaction(self, e: _events.TransactionFinished) -> None:
        root = self.tracer.start_span(
            "xatm.transaction",
            kind=SpanKind.INTERNAL,
            start_time=_ns(e.wall(e.start)),
            attributes={
                "xatm.gtrid": e.gtrid,
                "xatm.outcome": e.outcome,
                "xatm.node": e.node,
                "xatm.resources": list(e.resources),
            },
        )
        if e.outcome in ("in_doubt", "heuristic"):
            root.set_status(Status(StatusCode.ERROR, e.outcome))
        under_root = trace.set_span_in_context(root)
        phases: dict[str, tuple[Span, Context]] = {}
        for phase in e.phases:
            span = self.tracer.start_span(
                f"xatm.{phase.name}",
                context=under_root,
                kind=SpanKind.INTERNAL,
                start_time=_ns(e.wall(phase.start)),
            )
            phases[phase.name] = (span, trace.set_span_in_context(span))
            span.end(end_time=_ns(e.wall(phase.end)))
        for op in e.ops:
            parent = phases[op.phase][1] if op.phase in phases else under_root
            attributes: dict[str, Any] = {
                "db.system.name": op.db_system,
                "db.operation.name": op.op,
                "server.address": op.host,
                "server.port": op.port,
                "xatm.resource": op.resource,
            }
            if op.database:
                attributes["db.namespace"] = op.database
            span = self.tracer.start_span(
                f"xatm.branch.{op.op}",
                context=parent,
                kind=SpanKind.CLIENT,
                start_time=_ns(e.wall(op.start)),
                attributes=attributes,
            )
            if op.error is not None:
                span.set_attribute("error.type", op.error)
                span.set_status(Status(StatusCode.ERROR, op.error))
            span.end(end_time=_ns(e.wall(op.end)))
        root.end(end_time=_ns(e.wall(e.end)))

    def recovery(self, e: _events.RecoveryPassFinished) -> None:
        attributes: dict[str, Any] = {
            "xatm.node": e.node,
            "xatm.recovery.actor": e.actor,
            "xatm.recovery.dry_run": e.dry_run,
            "xatm.recovery.in_doubt_transactions": e.in_doubt,
        }
        report = e.report
        if report is not None:
            attributes.update(
                {
                    "xatm.recovery.committed": report.committed,
                    "xatm.recovery.rolled_back": report.rolled_back,
                    "xatm.recovery.in_doubt_branches": report.in_doubt,
                    "xatm.recovery.heuristics": report.heuristics,
                    "xatm.recovery.foreign": report.foreign,
                    "xatm.recovery.ended": report.ended,
                    "xatm.recovery.unreachable": list(report.unreachable),
                }
            )
        span = self.tracer.start_span(
            "xatm.recovery",
            kind=SpanKind.INTERNAL,
            start_time=_ns(e.wall_start),
            attributes=attributes,
        )
        if report is None:
            span.set_attribute("error.type", e.error or "error")
            span.set_status(Status(StatusCode.ERROR, e.error))
        else:
            for a in report.actions:
                span.add_event(
                    "xatm.recovery.action",
                    {
                        "xatm.gtrid": a.gtrid,
                        "xatm.resource": a.resource,
                        "xatm.recovery.action": a.action,
                        "xatm.recovery.outcome": a.outcome,
                    },
                    timestamp=_ns(e.wall_start + e.duration),
                )
            if report.heuristics or report.unreachable:
                span.set_status(Status(StatusCode.ERROR, "heuristic or unreachable"))
        span.end(end_time=_ns(e.wall_start + e.duration))
