"""The SQLAlchemy integration of one manager: what ``tx.session()`` and
``tx.sa_connection()`` call, and the dialect Engines of its URL resources.

The manager makes one :class:`SqlAlchemyJoin` and gives it to each transaction it begins
(``Transaction(..., sqlalchemy=...)``); the sessions and connections join the transaction
through its public hooks (``xatm.integrations.sqlalchemy.session``). SQLAlchemy is imported
only when one of them is first used.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from xatm.integrations.sqlalchemy.resources import EnginePool, engine_from_spec

if TYPE_CHECKING:
    from sqlalchemy import Connection as SAConnection
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from xatm.node.context import Context
    from xatm.transactions.transaction import Transaction


class SqlAlchemyJoin:
    """``tx.session()`` and ``tx.sa_connection()`` for one manager's transactions."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def session(self, tx: Transaction, binds: Any, **session_kwargs: Any) -> Session:
        from xatm.integrations.sqlalchemy import session as _session

        made: Session = _session.session(tx, self.engine, binds, **session_kwargs)
        return made

    def sa_connection(self, tx: Transaction, resource: str) -> SAConnection:
        from xatm.integrations.sqlalchemy import session as _session

        made: SAConnection = _session.sa_connection(tx, self.engine, resource)
        return made

    def engine(self, ctx: Context, resource: str) -> Engine:
        """The Engine of ``resource``: the one given as the resource, or (for a URL) one
        made from the URL once, for its dialect (its pool is never used for branches)."""
        _, pool = ctx.resources.get(resource)
        if isinstance(pool, EnginePool):
            return pool.engine
        with self._lock:
            engine = self._engines.get(resource)
            if engine is None:
                engine = engine_from_spec(resource, pool.participant.spec)
                self._engines[resource] = engine
            return engine

    @property
    def made(self) -> list[str]:
        """The resources whose dialect Engine was made from their URL."""
        with self._lock:
            return list(self._engines)
