"""Recovery's listings: the prepared branches of a resource, and the decision rows (commit
markers) of every resource; step 1 of a pass (``survey``) lists each resource once."""

from __future__ import annotations

import contextlib

from xatm.core.participant import PreparedBranch
from xatm.core.urls import describe_error
from xatm.errors import ResourceError
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.state import PassState


def survey(p: PassState, names: list[str]) -> tuple[set[str], bool]:
    """List every resource once: (nodes owning an xatm branch, anything to do)."""
    owners: set[str] = set()
    found_any = False
    p.reach.skipped = set(p.ctx.resources.names) - set(names)
    read_markers(p, names)
    if any(p.may_end_marker(g) for g in p.markers.rows):
        found_any = True
    for name in names:
        found = list_branches(p, name)
        if found is None:
            continue
        for branch in found:
            if branch.xid is not None and branch.xid.is_xatm:
                owners.add(branch.xid.node_id)
                found_any = True
            else:
                p.ledger.foreign += 1
    return owners, found_any


def list_branches(p: PassState, name: str) -> list[PreparedBranch] | None:
    if name in p.reach.problems:  # found unreachable already in this pass
        return None
    try:
        with p.ctx.resources.borrow(name, recovery=True) as (participant, conn):
            return participant.recover(conn)
    except ResourceError as e:
        p.unreachable(name, str(e))
    except Exception as e:
        p.unreachable(name, describe_error(e))
    return None


def read_markers(p: PassState, names: list[str]) -> None:
    """(Re-)read the decision rows of every resource that has the table."""
    p.markers.rows.clear()
    p.markers.problems.clear()
    for name in names:
        if name in p.reach.problems:
            continue
        try:
            with p.ctx.resources.borrow(name, recovery=True) as (participant, conn):
                rows = _marker_recovery.read_rows(participant, conn)
                if rows is not None and not p.dry_run:
                    with contextlib.suppress(Exception):
                        _marker_recovery.delete_old_fences(participant, conn)
        except ResourceError as e:
            p.markers.problems[name] = str(e)
            p.unreachable(name, str(e))  # one wait for it per pass, not one per step
            continue
        except Exception as e:
            p.markers.problems[name] = describe_error(e)
            if p.ctx.resources.get(name)[0].is_connection_error(e):
                p.unreachable(name, f"lost during the pass: {describe_error(e)}")
            continue
        for gtrid, record in (rows or {}).items():
            p.markers.rows[gtrid] = (name, record)
