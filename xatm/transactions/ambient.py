"""The transaction a thread or task is in: a second one of the same manager inside it is refused.

``with tm.transaction() as tx:`` (and ``async with``) makes ``tx`` the *ambient* transaction
of the thread or asyncio task running the block, until the block ends. Opening another
transaction of the same manager inside that block, in the same thread or task, raises
:class:`~xatm.TransactionError` at once: xatm does not nest transactions. An inner
transaction would be independent of the outer one (its own branches, its own commit), and
would wait on the outer's own row locks, which the outer cannot release until the inner is
over. The work belongs in the outer transaction (pass ``tx`` down); an independent
transaction runs in another thread or task. Managers that share a context (an
``AsyncTransactionManager`` and its ``sync``) count as one.

The ambient transaction is a context variable holding the transaction and its owner (the
task, else the thread): a task or thread started inside the block inherits the variable, but
is not its owner, so its transactions are not refused.
"""

from __future__ import annotations

import asyncio
import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from xatm.errors import TransactionError

if TYPE_CHECKING:
    from xatm.node.context import Context


class Ambient(Protocol):
    """A transaction as this module sees it."""

    gtrid: str

    @property
    def context(self) -> Context: ...

    @property
    def open(self) -> bool:
        """True until its end (commit or rollback) has begun."""


_current: ContextVar[tuple[Ambient, object, object] | None] = ContextVar(
    "xatm_ambient_transaction", default=None
)


def _owner() -> object:
    """The running asyncio task, else the thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        task = None
    return task if task is not None else threading.current_thread()


def current(ctx: Context) -> Ambient | None:
    """The open transaction of ``ctx``'s manager that this thread or task is in, if any."""
    found = _current.get()
    if found is None:
        return None
    tx, owner, _ = found
    if owner is not _owner() or tx.context is not ctx or not tx.open:
        return None
    return tx


def refuse_nested(ctx: Context, tx: Ambient | None = None) -> None:
    """Raise TransactionError if this thread or task is in an open transaction of ``ctx``'s
    manager (other than ``tx``)."""
    outer = current(ctx)
    if outer is None or outer is tx:
        return
    where = "task" if isinstance(_owner(), asyncio.Task) else "thread"
    raise TransactionError(
        f"this {where} is already in transaction {outer.gtrid} of this manager: xatm does not"
        " nest transactions (an inner one would commit on its own and could wait on the"
        " outer one's locks). Do the work in the outer transaction (pass its tx down), or run"
        f" an independent transaction in another {where}",
        gtrid=outer.gtrid,
    )


def enter(tx: Ambient) -> None:
    """``tx``'s block begins: it is the ambient transaction of this thread or task."""
    refuse_nested(tx.context, tx)
    _current.set((tx, _owner(), _current.get()))


def leave(tx: Ambient) -> None:
    """``tx``'s block ends: the ambient transaction is what it was before (a block left in
    another context than it was entered in, as a threadpool may do, changes nothing)."""
    found = _current.get()
    if found is not None and found[0] is tx:
        previous = found[2]
        _current.set(previous if isinstance(previous, tuple) else None)
