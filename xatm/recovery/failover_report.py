"""The failover report: after a switch of a PostgreSQL resource, which of this node's COMMIT
decisions its new primary lost (``xatm.node.failover`` says how each is classified)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from xatm.core import events as _events
from xatm.core.logfields import log_fields
from xatm.core.records import LogRecord
from xatm.core.text import first_line
from xatm.core.urls import redact
from xatm.log.timelines import Loss, Switch
from xatm.node.failover import classify
from xatm.participants.postgres.participant import PostgresParticipant

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.failover")


#: the decisions of ``node`` made in [start, end), and the horizon of its log
Decisions = Callable[[str, float, float], list[LogRecord]]


def check(
    ctx: Context,
    decided_between: Decisions,
    horizon: float,
    record_action: Callable[[str, str, str, str, str], None],
) -> None:
    """Run the failover check of every switch of this node not checked yet (a recovery
    pass calls this). ``record_action(kind, gtrid, resource, reason, outcome)`` reports
    each loss (``heuristic`` or ``possibly-lost``) to the pass. A resource that cannot be
    reached is checked by a later pass."""
    watch = ctx.failover
    if watch is None:
        return
    for resource, record in watch.records().items():
        previous = None
        for switch in record.switches:
            if switch.checked_at is None and resource in ctx.resources:
                try:
                    done = _check_switch(ctx, resource, switch, previous, decided_between, horizon)
                except Exception as e:
                    logger.warning(
                        "failover check of %r (timeline %d -> %d) not done yet: %s",
                        resource,
                        switch.old,
                        switch.new,
                        redact(first_line(str(e), repr(e))),
                        extra=log_fields(ctx.node_id, resource=resource),
                    )
                    previous = switch
                    continue
                watch.mark_checked(resource, switch, done)
                _report(ctx, resource, done, record_action)
            previous = switch


def _check_switch(
    ctx: Context,
    resource: str,
    switch: Switch,
    previous: Switch | None,
    decided_between: Decisions,
    horizon: float,
) -> Switch:
    start = max(horizon, previous.detected_at if previous is not None else 0.0)
    decisions = [
        r for r in decided_between(ctx.node_id, start, switch.detected_at) if resource in r.branches
    ]
    txids = {r.gtrid: r.txids.get(resource) for r in decisions}
    lost_from = switch.lost_from
    ask = [t for t in txids.values() if t is not None and (lost_from is None or t < lost_from)]
    with ctx.resources.borrow(resource, recovery=True) as (participant, conn):
        if not isinstance(participant, PostgresParticipant):
            raise TypeError(f"resource {resource!r} is not a PostgreSQL resource")
        statuses = participant.xact_statuses(conn, ask) if ask else {}
        prepared = {
            b.xid.gtrid
            for b in participant.recover(conn)
            if b.xid is not None and b.xid.is_xatm and b.xid.bqual == resource
        }
    losses = []
    for r in decisions:
        t = txids[r.gtrid]
        status, detail = classify(
            t, lost_from, statuses.get(t) if t is not None else None, r.gtrid in prepared
        )
        if status is not None:
            losses.append(Loss(r.gtrid, t, r.at, status, detail))
    return replace(
        switch,
        checked_at=time.time(),
        window_start=start,
        checked=len(decisions),
        losses=tuple(losses),
    )


def _report(
    ctx: Context,
    resource: str,
    switch: Switch,
    record_action: Callable[[str, str, str, str, str], None],
) -> None:
    where = f"the failover of {resource!r} (timeline {switch.old} -> {switch.new})"
    lost = [x for x in switch.losses if x.status == "lost"]
    unknown = [x for x in switch.losses if x.status == "unknown"]
    for loss in lost:
        logger.error(
            "HEURISTIC OUTCOME: transaction %s was committed, but its branch on %r is not on"
            " the new primary after %s: %s; see docs/operations.md",
            loss.gtrid,
            resource,
            where,
            loss.detail,
            extra=log_fields(ctx.node_id, loss.gtrid, resource),
        )
        record_action("heuristic", loss.gtrid, resource, f"lost in {where}", loss.detail)
    for loss in unknown:
        logger.warning(
            "POSSIBLY LOST: transaction %s was committed, and the new primary cannot tell"
            " whether its branch on %r survived %s: %s; check it (xatm indoubt)",
            loss.gtrid,
            resource,
            where,
            loss.detail,
            extra=log_fields(ctx.node_id, loss.gtrid, resource),
        )
        record_action("possibly-lost", loss.gtrid, resource, f"after {where}", loss.detail)
    since = switch.window_start or 0.0
    logger.warning(
        "failover check of %r (timeline %d -> %d): %d transaction(s) committed there since %s"
        " checked: %d lost, %d possibly lost",
        resource,
        switch.old,
        switch.new,
        switch.checked,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else "the log's start",
        len(lost),
        len(unknown),
        extra=log_fields(ctx.node_id, resource=resource),
    )
    _events.failover_checked(ctx.node_id, resource, switch.checked, len(lost), len(unknown))
