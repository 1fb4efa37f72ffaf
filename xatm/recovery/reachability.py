"""Is a resource reachable now? One bounded round trip on recovery's own connection.

The sweeper backs off from a resource that cannot be reached (its recovery work is retried
later and later), but it still asks this on every pass, so that what it reports about the
resource (``xatm_resource_up``, the unreachable count) never depends on where the back-off
stands, and so that a resource that answers again is swept at the next pass.
"""

from __future__ import annotations

from xatm.core import deadline as _deadline
from xatm.core.urls import describe_error
from xatm.node.context import Resources
from xatm.participants.pool import silent

#: seconds a probe's ping may take (a connect is bounded by the driver's connect timeout)
PROBE_BOUND = _deadline.GRACE


def probe(resources: Resources, name: str, bound: float = PROBE_BOUND) -> str | None:
    """None if ``name`` answers a ping within ``bound`` seconds, else why not (redacted)."""
    participant, pool = resources.get(name, recovery=True)
    try:
        conn = pool.get(bound)
    except Exception as e:
        return describe_error(e)
    try:
        with _deadline.bounded(participant, conn, bound, "a probe") as watch:
            alive = participant.ping(conn)
    except Exception as e:
        pool.discard(conn)
        if watch.fired:
            return str(silent(participant, bound, "a probe"))
        return describe_error(e)
    if watch.fired or not alive:
        pool.discard(conn)
        return str(silent(participant, bound, "a probe"))
    pool.put(conn)
    return None
