"""SQLAlchemy objects over one xatm branch: a Connection and an ORM Session joined to it.

Imported only by ``xatm.integrations.sqlalchemy.session`` when ``tx.sa_connection()`` or
``tx.session()`` is first used (it imports SQLAlchemy). What each class does to keep SQLAlchemy from
ending the branch's real transaction:

``BranchProxy``
    stands where SQLAlchemy expects a pooled connection. Cursors come from the branch's
    driver connection (while the transaction is active and the branch still has it);
    ``commit()``, ``rollback()`` and ``close()`` never reach the driver connection.
``BranchRootTransaction``
    SQLAlchemy's transaction on a branch connection. An explicit rollback (the
    application's, the Session's, a failed flush's) makes the global transaction
    rollback-only; a close (of the Connection or the Session) does not.
``BranchConnection``
    the Connection: never reconnects by itself, refuses ``begin_twophase()``, ``detach()``
    and execution options that would change the connection's transaction behaviour.
``BranchSession``
    the ORM Session: its binds stand for resource names and become a BranchConnection (the
    resource enlisted) when first used; ``close()`` inside the block flushes first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine, RootTransaction
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from xatm.core.urls import describe_error
from xatm.errors import TransactionError
from xatm.participants.mysql.drivers import sa_cursor_kwargs
from xatm.transactions.transaction import TransactionState

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import CoreExecuteOptionsParameter

    from xatm.node.context import Context
    from xatm.transactions.transaction import Transaction

#: the Engine of a resource, for its dialect (``SqlAlchemyJoin.engine``)
EngineOf = Callable[["Context", str], Engine]

#: execution options that would change the branch connection's transaction behaviour
REFUSED_OPTIONS = frozenset({"isolation_level", "postgresql_readonly", "postgresql_deferrable"})


class ResourceBind:
    """A Session bind standing for a resource name, turned into a Connection when used."""

    __slots__ = ("resource",)

    def __init__(self, resource: str) -> None:
        self.resource = resource

    def __repr__(self) -> str:
        return f"<xatm resource {self.resource!r}>"


class BranchProxy(PoolProxiedConnection):
    """The branch's driver connection, as SQLAlchemy's Connection sees it."""

    def __init__(self, tx: Transaction, resource: str, conn: Any, kind: str) -> None:
        self._tx = tx
        self._resource = resource
        self._kind = kind
        self._conn = conn
        self.dbapi_connection = conn
        self.driver_connection = conn
        self._info: dict[Any, Any] = {}

    @property
    def _live(self) -> bool:
        return (
            self._tx.state is TransactionState.ACTIVE
            and self._tx.branch_connection(self._resource) is self._conn
        )

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if not self._live:
            raise TransactionError(
                f"transaction {self._tx.gtrid} is {self._tx.state.value}: its SQLAlchemy"
                f" connection to {self._resource!r} can no longer be used",
                gtrid=self._tx.gtrid,
            )
        if self._kind == "mysql" and not args:  # as SQLAlchemy's own connections are
            kwargs = {**sa_cursor_kwargs(self._conn), **kwargs}
        return self._conn.cursor(*args, **kwargs)

    def commit(self) -> None:
        """Nothing: the branch commits when the transaction block ends."""

    def rollback(self) -> None:
        """Nothing: a real rollback would end the branch (see BranchRootTransaction)."""

    def close(self) -> None:
        """Nothing: the driver connection belongs to the branch."""

    def _close_special(self, transaction_reset: bool = False) -> None:
        """Nothing (``Connection.close()`` calls this one)."""

    @property
    def is_valid(self) -> bool:
        return self._live

    @property
    def is_detached(self) -> bool:
        return False

    def detach(self) -> NoReturn:
        raise exc.InvalidRequestError(
            "a connection enlisted in an xatm transaction cannot be detached"
        )

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        """SQLAlchemy saw the connection fail: the transaction cannot commit. xatm itself
        closes the driver connection when the transaction ends."""
        reason = f": {describe_error(e)}" if e is not None else ""
        self._tx.set_rollback_only(
            f"SQLAlchemy invalidated the connection of branch {self._resource!r}{reason}"
        )

    @property
    def info(self) -> dict[Any, Any]:
        return self._info

    @property
    def record_info(self) -> dict[Any, Any] | None:
        return None

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # SQLAlchemy probes pool internals: they are not the driver's
            raise AttributeError(key)
        return getattr(self._conn, key)


class BranchRootTransaction(RootTransaction):
    """SQLAlchemy's transaction on a BranchConnection (see the module docstring)."""

    __slots__ = ()

    def _do_rollback(self) -> None:
        conn = self.connection
        if isinstance(conn, BranchConnection):
            conn.xatm_tx.set_rollback_only(
                f"the SQLAlchemy work on {conn.xatm_resource!r} was rolled back"
            )
        super()._do_rollback()


class BranchConnection(Connection):
    """A SQLAlchemy Connection enlisted in an xatm branch."""

    def __init__(self, engine: Engine, proxy: BranchProxy, tx: Transaction, resource: str) -> None:
        self.xatm_tx = tx
        self.xatm_resource = resource
        super().__init__(engine, proxy, _allow_revalidate=False)

    def begin(self) -> RootTransaction:
        if self._transaction is None:
            self._transaction = BranchRootTransaction(self)
            return self._transaction
        return super().begin()  # raises SQLAlchemy's own "already begun" error

    def begin_twophase(self, xid: Any = None) -> NoReturn:
        raise exc.InvalidRequestError(
            "two-phase commit of an xatm branch is xatm's job: do not call begin_twophase()"
        )

    def detach(self) -> NoReturn:
        raise exc.InvalidRequestError(
            "a connection enlisted in an xatm transaction cannot be detached"
        )

    def execution_options(self, **opt: Any) -> Connection:
        refused = REFUSED_OPTIONS.intersection(opt)
        if refused:
            raise exc.InvalidRequestError(
                f"execution option {sorted(refused)[0]!r} cannot change a connection enlisted"
                " in an xatm transaction: set it on the engine (or on the server)"
            )
        return super().execution_options(**opt)


def open_connection(tx: Transaction, resource: str, engine_of: EngineOf) -> BranchConnection:
    """A BranchConnection on ``tx``'s branch on ``resource`` (enlisting it if needed)."""
    if tx.state is not TransactionState.ACTIVE:
        raise TransactionError(
            f"transaction {tx.gtrid} is {tx.state.value}; no more work can be done in it",
            gtrid=tx.gtrid,
        )
    branch = tx.enlist(resource)
    engine = engine_of(tx.context, resource)
    proxy = BranchProxy(tx, resource, branch.conn, branch.participant.kind)
    return BranchConnection(engine, proxy, tx, resource)


class BranchSession(Session):
    """An ORM Session whose binds are xatm resource names."""

    def __init__(self, tx: Transaction, engine_of: EngineOf, **kwargs: Any) -> None:
        self.xatm_tx = tx
        self._xatm_engine_of = engine_of
        self._xatm_conns: dict[str, BranchConnection] = {}
        self._xatm_ending = False
        super().__init__(**kwargs)

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: Any = None,
        bind: Any = None,
        _sa_skip_events: bool | None = None,
        _sa_skip_for_implicit_returning: bool = False,
        **kw: Any,
    ) -> Engine | Connection:
        if isinstance(bind, str):
            bind = ResourceBind(bind)
        found: Any = super().get_bind(
            mapper,
            clause=clause,
            bind=bind,
            _sa_skip_events=_sa_skip_events,
            _sa_skip_for_implicit_returning=_sa_skip_for_implicit_returning,
            **kw,
        )
        if isinstance(found, ResourceBind):
            return self.xatm_connection(found.resource)
        return found  # type: ignore[no-any-return]

    def connection(
        self,
        bind_arguments: dict[str, Any] | None = None,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> Connection:
        """As ``Session.connection()``; ``bind_arguments={"bind": "name"}`` names a resource."""
        if bind_arguments and isinstance(bind_arguments.get("bind"), str):
            resource = bind_arguments["bind"]
            bind_arguments = {**bind_arguments, "bind": self.xatm_connection(resource)}
        return super().connection(bind_arguments, execution_options)

    def xatm_connection(self, resource: str) -> BranchConnection:
        """The session's Connection on ``resource``'s branch (enlisting it if needed)."""
        conn = self._xatm_conns.get(resource)
        if conn is None or conn.closed:
            conn = open_connection(self.xatm_tx, resource, self._xatm_engine_of)
            self._xatm_conns[resource] = conn
        return conn

    def close(self) -> None:
        """Inside the block: flush first (the work joins the global transaction), then close
        as SQLAlchemy does. A session in a failed state is just closed (it already made the
        transaction rollback-only)."""
        if (
            not self._xatm_ending
            and self.xatm_tx.state is TransactionState.ACTIVE
            and self.is_active
        ):
            self.flush()
        super().close()

    def __exit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if value is not None and self.xatm_tx.state is TransactionState.ACTIVE:
            # like a plain Session closed by an exception, its work is not to be kept: it
            # cannot be taken out of the branch alone, so the whole transaction rolls back
            self.xatm_tx.set_rollback_only(
                f"a SQLAlchemy session block raised {type(value).__name__}"
            )
            self._xatm_ending = True
            try:
                super().close()
            finally:
                self._xatm_ending = False
            return
        self.close()

    def xatm_end(self) -> None:
        """The transaction ended: close without flushing, and close the connections."""
        self._xatm_ending = True
        try:
            super().close()
        finally:
            conns, self._xatm_conns = self._xatm_conns, {}
            for conn in conns.values():
                conn.close()
            self._xatm_ending = False
