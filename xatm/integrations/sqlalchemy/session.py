"""SQLAlchemy sessions and connections inside one xatm transaction (``tx.session()``,
``tx.sa_connection()``).

The objects of one transaction are kept together, with the transaction itself (an
annotation of it, ``tx.annotation(Enlisted)``): its sessions are flushed when commit starts
(a before-prepare hook of the transaction) and closed when it ends (an after-end hook),
through the transaction's public hooks. ``tx.session()`` reaches this module through the
manager's ``xatm.integrations.sqlalchemy.join.SqlAlchemyJoin``, so SQLAlchemy is imported
only when it is used.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any

from xatm.errors import ConfigurationError, TransactionError
from xatm.integrations.sqlalchemy.branch import (
    BranchConnection,
    BranchSession,
    EngineOf,
    ResourceBind,
    open_connection,
)
from xatm.transactions.transaction import Transaction, TransactionState


class Enlisted:
    """The SQLAlchemy objects of one transaction: flushed before prepare, closed at the end."""

    def __init__(self, tx: Transaction) -> None:
        self.sessions: list[BranchSession] = []
        self.connections: dict[str, BranchConnection] = {}
        self._tx = weakref.ref(tx)
        tx.add_before_prepare_hook(self.flush)
        tx.add_after_end_hook(self.close)

    def flush(self) -> None:
        for sess in self.sessions:
            sess.flush()  # nothing to do: no round trip

    def close(self) -> None:
        tx = self._tx()
        if tx is not None:  # the ended transaction no longer holds its sessions
            tx.annotate(Enlisted, None)
        sessions, self.sessions = self.sessions, []
        connections, self.connections = self.connections, {}
        for sess in sessions:
            with contextlib.suppress(Exception):
                sess.xatm_end()
        for conn in connections.values():
            with contextlib.suppress(Exception):
                conn.close()


def _enlisted_for(tx: Transaction) -> Enlisted:
    if tx.state is not TransactionState.ACTIVE:
        raise TransactionError(
            f"transaction {tx.gtrid} is {tx.state.value}; no more work can be done in it",
            gtrid=tx.gtrid,
        )
    found: Enlisted | None = tx.annotation(Enlisted)
    if found is None:
        found = Enlisted(tx)
        tx.annotate(Enlisted, found)
    return found


def _check_resource(tx: Transaction, resource: object, what: str) -> str:
    if not isinstance(resource, str):
        raise ConfigurationError(
            f"{what} must name a resource (a string), got {type(resource).__name__}"
        )
    tx.context.resources.get(resource)  # raises ConfigurationError naming the known ones
    return resource


def session(tx: Transaction, engine_of: EngineOf, binds: Any = None, **kwargs: Any) -> Any:
    """An ORM Session whose work joins ``tx``: ``binds`` maps models (or tables, or a
    declarative base) to resource names; ``bind="name"`` sets a default resource."""
    for key in ("twophase", "join_transaction_mode"):
        if key in kwargs:
            raise ConfigurationError(f"tx.session() does not take {key}=: xatm ends the work")
    if binds is not None and not isinstance(binds, Mapping):
        raise ConfigurationError(
            "binds must map models or tables to resource names, e.g. {Account: 'ledger'}"
        )
    bind = kwargs.pop("bind", None)
    if not binds and bind is None:
        raise ConfigurationError(
            "tx.session() needs binds={Model: 'resource', ...} or bind='resource'"
        )
    session_binds = {
        key: ResourceBind(_check_resource(tx, name, f"the bind of {key!r}"))
        for key, name in (binds or {}).items()
    }
    if bind is not None:
        kwargs["bind"] = ResourceBind(_check_resource(tx, bind, "bind"))
    enlisted = _enlisted_for(tx)
    sess = BranchSession(tx, engine_of, binds=session_binds, **kwargs)
    enlisted.sessions.append(sess)
    return sess


def sa_connection(tx: Transaction, engine_of: EngineOf, resource: str) -> Any:
    """A SQLAlchemy Connection on ``tx``'s branch on ``resource`` (the same one each time,
    while it is open)."""
    _check_resource(tx, resource, "the resource")
    enlisted = _enlisted_for(tx)
    conn = enlisted.connections.get(resource)
    if conn is None or conn.closed:
        conn = open_connection(tx, resource, engine_of)
        enlisted.connections[resource] = conn
    return conn
