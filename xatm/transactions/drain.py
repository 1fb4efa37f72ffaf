"""Closing a manager with transactions in flight: let them finish, up to a bound.

``tm.close()`` (and ``await atm.close()``) first marks the manager closing: no transaction
begins any more (``tm.transaction()`` refuses; one made before but with no branch yet is
refused at its first statement). Then :func:`drain` waits for the transactions in flight
(those with a branch) to end, up to ``wait`` seconds (the manager's ``timeout`` by default).
Each one still running then is told to roll back (the decision fence, ``refuse_decision``,
with :data:`CLOSED` as the reason): it rolls back at its next statement or at its end, and
its caller gets :class:`~xatm.TransactionError` or :class:`~xatm.TransactionRolledBack`
saying that the manager was closed. One already past its decision cannot be refused: it is
waited for (its log write and phase 2) up to :data:`GRACE` seconds more. Only then are the
log, the connections and the identity locks closed, so no transaction finds them closed under
it. ``own``: the gtrid of the closing thread's or task's own transaction (closing inside a
transaction's block), which is not waited for but rolled back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xatm.node.context import Context, Running

logger = logging.getLogger("xatm")

CLOSED = "the transaction manager was closed before it ended"
#: seconds to wait, past the bound, for transactions already past their decision
GRACE = 5.0
_POLL = 0.02


def drain(ctx: Context, wait: float, *, own: str | None = None) -> list[str]:
    """Wait for the transactions in flight, then roll back the rest (see the module
    docstring); the gtrids of those told to roll back."""
    ctx.closing = CLOSED
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        live = [tx for tx in ctx.in_flight() if tx.gtrid != own]
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    refused = [tx.gtrid for tx in live if tx.refuse_decision(CLOSED)]
    mine = None if own is None else ctx.running(own)
    if mine is not None:
        mine.refuse_decision(CLOSED)
    deciding: list[Running] = [tx for tx in live if tx.gtrid not in refused]
    until = time.monotonic() + GRACE
    while deciding and time.monotonic() < until:
        time.sleep(_POLL)
        running = {id(tx) for tx in ctx.in_flight()}
        deciding = [tx for tx in deciding if id(tx) in running]
    if refused:
        logger.warning(
            "the transaction manager was closed with %d transaction(s) still running after"
            " %g s: they roll back (%s)",
            len(refused),
            wait,
            ", ".join(refused),
        )
    return refused
