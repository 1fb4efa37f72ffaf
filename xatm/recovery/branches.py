"""Step 2 of a pass on one resource: list its prepared branches again and settle each of
xatm's, deciding it (:func:`xatm.core.decide.decide` over ``facts``) and carrying the verdict
out (:func:`xatm.recovery.phase2.carry_out`)."""

from __future__ import annotations

import logging
from dataclasses import replace

from xatm.core import deadline as _deadline
from xatm.core.decide import Action as Act
from xatm.core.decide import Logged, decide
from xatm.core.logfields import log_fields
from xatm.core.participant import Connection, PreparedBranch
from xatm.core.report import Action, RecoveryAction
from xatm.core.urls import describe_error
from xatm.errors import LogError, ResourceError
from xatm.recovery.facts import facts_of, probe_markers
from xatm.recovery.phase2 import Carried, carry_out
from xatm.recovery.state import PassState

logger = logging.getLogger("xatm.recovery")


def scan(p: PassState, name: str) -> None:
    """List ``name``'s prepared branches and settle each (the resource is marked unreachable
    if it fails; a LogError ends the pass)."""
    if p.progress is not None:
        p.progress(f"scanning {name}")
    participant, _ = p.ctx.resources.get(name)
    try:
        with p.ctx.resources.borrow(name, recovery=True) as (_, conn):
            for branch in participant.recover(conn):
                _deadline.renew(conn, p.ctx.resources.bound)  # each branch: a step
                settle(p, name, branch, conn)
    except LogError:
        raise  # the log failed, not this resource: the pass cannot go on
    except ResourceError as e:
        p.unreachable(name, str(e))
        return
    except Exception as e:
        if participant.is_connection_error(e):
            p.unreachable(name, f"lost during the pass: {describe_error(e)}")
        else:
            logger.error(
                "recovery: resource %r failed: %s",
                name,
                describe_error(e),
                extra=log_fields(p.own_node, resource=name),
            )
            p.reach.problems.setdefault(name, describe_error(e))
        return
    p.reach.scanned.add(name)


def settle(p: PassState, resource: str, found: PreparedBranch, conn: Connection) -> None:
    """Decide one listed branch and carry the verdict out (or leave it), recording what was
    done."""
    xid = found.xid
    if xid is None or not xid.is_xatm:
        p.ledger.foreign += 1
        return
    gtrid = xid.gtrid
    if p.only is not None and gtrid != p.only:
        return

    def record(action: Action, reason: str, outcome: str) -> None:
        p.record(gtrid, resource, xid.bqual, action, reason, outcome)

    def leave(reason: str) -> None:
        p.ledger.remaining.setdefault(gtrid, set()).add(resource)
        record("skip", reason, "left")

    facts, detail = facts_of(p, resource, xid, conn)
    while True:
        verdict = decide(facts)
        if verdict.action is Act.PROBE:
            marker, detail = probe_markers(p, gtrid)
            facts = replace(facts, marker=marker)
            continue
        if verdict.action is Act.ROLLBACK and verdict.fence and not p.dry_run:
            answer = p.fleet.abort(gtrid, by=p.actor)
            if answer == "C":
                facts = replace(facts, logged=Logged.COMMIT)  # a COMMIT won the race
                continue
            if answer == "busy":  # a COMMIT batch holds the row: never wait for it here
                leave("its COMMIT may be being written (a batch of the shared log is open)")
                return
            p.ctx.audit.record(
                gtrid,
                "",
                "",
                "decide",
                p.prefix + "ABORT decision logged (fenced)",
                "done",
                p.actor,
            )
        break
    reason = f"{verdict.reason}: {detail}" if detail else verdict.reason
    if verdict.action is Act.LEAVE:
        leave(reason)
        return
    commit = verdict.action is Act.COMMIT
    action: Action = "commit" if commit else "rollback"
    if p.dry_run:
        p.ledger.remaining.setdefault(gtrid, set()).add(resource)
        record(action, reason, "planned")
        return
    participant, _ = p.ctx.resources.get(resource)
    try:
        carried = carry_out(participant, conn, xid, commit)
    except Exception as e:
        if participant.is_connection_error(e):
            raise
        p.ledger.remaining.setdefault(gtrid, set()).add(resource)
        logger.error(
            "recovery: %s of %s on %r failed: %s",
            action,
            gtrid,
            resource,
            e,
            extra=log_fields(p.own_node, gtrid, resource),
        )
        record("error", reason, f"failed: {describe_error(e)}")
        return
    if carried is Carried.HELD:
        leave(
            "listed as prepared, but the server answers 'no such branch': a live session"
            " still holds it"
        )
        return
    if carried is Carried.GONE:
        # listed a moment ago, gone now: its coordinator (or another pass) finished it
        # in between. Nothing was done here, so nothing is audited.
        p.ledger.actions.append(
            RecoveryAction(
                gtrid,
                resource,
                xid.bqual,
                "skip",
                "finished by someone else during the pass",
                "not-found",
            )
        )
        return
    if commit:
        p.ledger.committed_here.add((gtrid, resource))
    logger.info(
        "recovery: %s %s branch %s on %r (%s)",
        action,
        gtrid,
        xid.bqual,
        resource,
        reason,
        extra=log_fields(p.own_node, gtrid, resource),
    )
    record(action, reason, "done")
