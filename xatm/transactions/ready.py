"""Fail-fast start: every resource reachable and fit for two-phase commit, or one error.

``TransactionManager(..., fail_fast=True)`` calls :func:`check_ready` before it takes its
identity locks: each resource is asked at once (in parallel): a connection is made and the
fitness check of the first transaction (``xatm.transactions.transaction.check_fit``) runs on it. Any
resource that fails makes the start fail with one :class:`~xatm.ResourceError` naming every
one of them and why (``.problems``): ``ResourceUnavailable`` if one could not be reached or
refused the login, else ``ResourceNotFit``. Without ``fail_fast`` (the default) a manager
starts whatever state its resources are in (docs/api.md says why).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from xatm.core.urls import describe_error
from xatm.errors import ResourceError, ResourceNotFit, ResourceUnavailable
from xatm.transactions.transaction import check_fit

if TYPE_CHECKING:
    from xatm.node.context import Context


def _problem(ctx: Context, name: str) -> ResourceError | None:
    """Why ``name`` is not ready (None: it is)."""
    participant, pool = ctx.resources.get(name)
    try:
        with ctx.resources.borrow(name) as (participant, conn):
            if not pool.checked:
                check_fit(ctx, participant, conn)
                pool.checked = True
    except ResourceError as e:
        return e
    except Exception as e:  # a driver's error past the connect: the resource is not usable
        return ResourceUnavailable(
            f"resource {name!r} ({participant.spec.redacted()}): {describe_error(e)}",
            resource=name,
        )
    return None


def check_ready(ctx: Context) -> None:
    """Raise one ResourceError listing every resource that is not reachable and fit."""
    names = ctx.resources.names
    with ThreadPoolExecutor(max_workers=max(1, len(names)), thread_name_prefix="xatm-ready") as ex:
        found = dict(zip(names, ex.map(lambda n: _problem(ctx, n), names), strict=True))
    problems = {n: e for n, e in found.items() if e is not None}
    if not problems:
        return
    unreachable = [e for e in problems.values() if not isinstance(e, ResourceNotFit)]
    kind: type[ResourceError] = ResourceUnavailable if unreachable else ResourceNotFit
    raise kind(
        f"{len(problems)} of {len(names)} resource(s) not ready (fail_fast): "
        + "; ".join(str(e) for e in problems.values()),
        resource=next(iter(problems)),
        problems={n: str(e) for n, e in problems.items()},
    )
