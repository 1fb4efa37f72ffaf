"""What is known about one of xatm's prepared branches, gathered for
:func:`xatm.core.decide.decide`: its owner, its logged decision, its decision row (probed
when needed), a failover that may have lost its commit."""

from __future__ import annotations

import time

from xatm.core import bugs as _bugs
from xatm.core.decide import (
    Facts,
    Logged,
    Marker,
    NodeLogState,
    Owner,
    log_failed_over_since,
    owner_of,
    past_timeout,
    tenure,
)
from xatm.core.participant import Connection
from xatm.core.urls import describe_error
from xatm.core.xid import Xid, incarnation_of, may_use_marker, parse_gtrid
from xatm.node import failover as _failover
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.state import PassState


def facts_of(p: PassState, resource: str, xid: Xid, conn: Connection) -> tuple[Facts, str]:
    """What is known about one of xatm's prepared branches (and a detail for the
    reason), gathered for :func:`xatm.core.decide.decide`."""
    gtrid, node = xid.gtrid, xid.node_id
    ctx = p.ctx
    fleet = p.fleet
    flagged = may_use_marker(gtrid) and not _bugs.on("presume_before_probe")
    marker = Marker.UNPROBED if flagged else Marker.NOT_FLAGGED
    if gtrid in p.markers.rows:
        marker = Marker.ROW
    known = xid.bqual in ctx.resources
    expired = False
    detail = ""
    logged = Logged.NONE
    own = node == p.own_node
    if own:
        running = ctx.running(gtrid)
        if running is not None:
            if p.dry_run:
                expired_now = time.monotonic() > running.deadline
            elif running.abort_if_expired():
                expired_now = True
                ctx.note_expired(gtrid, resource, p.actor)
            else:
                expired_now = False
            return Facts(Owner.EXPIRED if expired_now else Owner.RUNNING, known_resource=known), ""
    made_by = tenure(
        incarnation_of(gtrid),
        ctx.incarnation if own else None,
        fleet.incarnations(node),
    )
    if own and made_by == "stranger" and _bugs.on("lock_is_proof"):
        made_by = "previous" if ctx.identity.holds(resource) else made_by
    log: NodeLogState
    if fleet.shared:
        log = "alive" if not own and fleet.peer(node) == "alive" else "shared"
    elif own:
        log = "held"
    else:
        state = fleet.peer(node)
        log = "held" if state == "dead" else state
        if state == "unexamined":
            detail = "not examined in this pass (the next one will)"
        elif state == "corrupt":
            detail = f"the log of coordinator {node!r} is corrupt (see `xatm log`)"
    legacy_lock = False
    if made_by == "legacy" and log == "held":
        if own:  # this node's, made by xatm 0.2: fenced by the identity lock only
            legacy_lock = ctx.identity.held(resource)
        else:  # its log lock is free, but a process may run as it
            participant, _ = ctx.resources.get(resource)
            legacy_lock = participant.identity_holder(conn, node) is not None
            if legacy_lock:
                detail = f"node {node!r} holds its identity lock on {resource!r}"
    owner = owner_of(own_node=own, made_by=made_by, log=log, legacy_lock=legacy_lock)
    if owner is Owner.STRANGER:
        detail = f"incarnation {incarnation_of(gtrid)} of node {node!r}"
        p.ledger.strangers.add(gtrid)
        if not p.dry_run:
            ctx.note_stranger(gtrid, resource)
    if known and owner in (
        Owner.FINISHED,
        Owner.PREVIOUS,
        Owner.STRANGER,
        Owner.UNFENCED,
        Owner.DEAD_PEER,
        Owner.LIVE_PEER,
    ):
        # read now: a decision taken since the pass began is in the log already
        logged = fleet.decision(gtrid, node)
    failover = False
    if known and logged is Logged.NONE and owner is not Owner.UNKNOWN:
        logged, failover, note = after_failover(p, resource, xid)
        detail = note or detail
    if fleet.shared:
        expired = past_timeout(gtrid, xid.created_at, time.time(), ctx.timeout)
    facts = Facts(
        owner,
        logged=logged,
        marker=marker,
        expired=expired,
        shared_log=fleet.shared,
        known_resource=known,
        failover=failover,
        log_failover=log_failed_over_since(xid.created_at, fleet.log_switches()),
    )
    return facts, detail


def after_failover(p: PassState, resource: str, xid: Xid) -> tuple[Logged, bool, str]:
    """For a branch with no decision found: (the decision, the ``failover`` fact, a
    detail), by :func:`xatm.node.failover.after_failover`."""
    watch = p.ctx.failover
    if watch is None:
        return Logged.NONE, False, ""
    node, gtrid = xid.node_id, xid.gtrid
    records = [watch.records().get(resource)]
    if node != p.own_node:
        records.append(p.fleet.timelines(node).get(resource))
    found = _failover.after_failover(
        records,
        xid.created_at,
        watch.current(resource),
        lambda: p.fleet.retained(gtrid, node),
        lambda: p.fleet.horizon(node),
    )
    if found == "commit":
        return (
            Logged.COMMIT,
            False,
            f"its COMMIT was ended before a failover of {resource!r} brought the branch back",
        )
    return Logged.NONE, found == "unknown", ""


def probe_markers(p: PassState, gtrid: str) -> tuple[Marker, str]:
    """Is a decision row of ``gtrid`` committed on a resource that may hold it? Waits
    out a marker commit in flight and fences an absent row (not in a dry run)."""
    node = parse_gtrid(gtrid)[0]
    candidates = p.fleet.marker_resources(node)
    if not candidates:
        return Marker.UNREAD, f"the commit-marker resources of node {node!r} are not recorded"
    configured = set(p.ctx.resources.names)
    missing = sorted(candidates - configured)
    if missing:
        return Marker.UNREAD, f"{', '.join(missing)} (not configured here)"
    unread = sorted(n for n in candidates if n in p.reach.problems or n in p.reach.skipped)
    if unread:
        return Marker.UNREAD, f"{', '.join(unread)} (not reached in this pass)"
    for name in sorted(candidates):
        participant, _ = p.ctx.resources.get(name)
        try:
            answer = _marker_recovery.probe_row(participant, gtrid, fence=not p.dry_run)
        except Exception as e:
            p.markers.problems.setdefault(name, describe_error(e))
            return Marker.UNREAD, f"{name} ({describe_error(e)})"
        if answer == "row":
            return Marker.ROW, ""
    return Marker.NO_ROW, ""
