"""SQLAlchemy integration: Engines as resources, and Sessions/Connections joined to a branch.

Three things live here (docs/sqlalchemy.md is the user's guide):

* **Engines as resources.** ``TransactionManager(resources={"ledger": engine})`` takes an
  Engine of the ``postgresql+psycopg``, ``mysql+mysqlconnector``, ``mysql+pymysql`` or
  ``mysql+mysqldb`` dialect (``mariadb+`` the same); ``postgresql+psycopg2`` is refused with
  a ConfigurationError that says what to use instead. Its branches
  draw their connections from the engine's own pool (:class:`EnginePool`), so the engine's
  connection settings, pool size and events apply. xatm's participants drive a connection
  in autocommit mode (explicit ``BEGIN`` / ``XA START``): that is switched on at checkout
  and the engine's own setting put back before the connection returns to the engine's
  pool; a connection that failed is invalidated instead.
* **``tx.sa_connection(name)``**: a SQLAlchemy ``Connection`` over the branch's own driver
  connection. It never ends the branch: its ``commit()`` does nothing (the branch commits
  when the block ends), a rollback through it makes the global transaction rollback-only,
  and closing it leaves the branch alone. Two-phase calls, ``detach()`` and a change of
  isolation level are refused.
* **``tx.session(binds={Model: "name"})``**: an ORM ``Session`` whose binds are resource
  names. A resource is enlisted when the session first needs it. The session is flushed
  before prepare; ``session.commit()`` only flushes (nothing is committed before the block
  ends); ``session.rollback()`` (or a failed flush) makes the global transaction
  rollback-only; ``session.close()`` inside the block flushes first, so added objects are
  not lost. Every session and connection is closed when the transaction ends.

For a resource given as a URL, an Engine is made from the URL once per manager and
resource (``xatm.integrations.sqlalchemy.join``), used for its dialect only (its one
connection, made to learn the server's version, is closed at once); the branch connections
stay xatm's own.

SQLAlchemy is imported lazily, only when one of these functions is used, so it stays an
optional dependency.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from xatm.core import deadline as _deadline
from xatm.core.urls import DEFAULT_CONNECT_TIMEOUT, ResourceSpec, describe_error, parse_url, redact
from xatm.errors import ConfigurationError, ResourceUnavailable
from xatm.participants.pool import Pool

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from xatm.core.participant import Connection, Participant

SUPPORTED_DIALECTS = (
    "postgresql+psycopg",
    "mysql+mysqlconnector",
    "mariadb+mysqlconnector",
    "mysql+pymysql",
    "mariadb+pymysql",
    "mysql+mysqldb",
    "mariadb+mysqldb",
)
#: SQLAlchemy's driver name for each of xatm's MySQL drivers (``ResourceSpec.driver``)
_MYSQL_DIALECTS = {
    None: "mysql+mysqlconnector",
    "pymysql": "mysql+pymysql",
    "mysqldb": "mysql+mysqldb",
}
#: ``proxied.info`` keys: a connection's own autocommit setting, and the isolation level
#: already made the session default on it (PostgreSQL)


def is_engine(value: object) -> bool:
    """True if ``value`` looks like a SQLAlchemy Engine (no import of SQLAlchemy needed)."""
    return hasattr(value, "dialect") and hasattr(value, "raw_connection")


def _driver_name(engine: Any) -> str:
    url = engine.url
    return f"{url.get_backend_name()}+{url.get_driver_name()}"


def spec_from_engine(engine: Any) -> ResourceSpec:
    """The ResourceSpec of an Engine's URL (the dialects of SUPPORTED_DIALECTS)."""
    driver = _driver_name(engine)
    if driver == "postgresql+psycopg2":
        raise ConfigurationError(
            f"engine {redact(str(engine.url))}: psycopg2 engines are not supported; xatm"
            " drives PostgreSQL through psycopg 3 (installed with xatm): give this resource an"
            " Engine made with postgresql+psycopg://, or its URL as postgresql://. The rest of"
            " the application may keep its psycopg2 engine (docs/sqlalchemy.md)"
        )
    if driver not in SUPPORTED_DIALECTS:
        raise ConfigurationError(
            f"engine dialect {driver!r} is not supported: use one of"
            f" {', '.join(SUPPORTED_DIALECTS)}"
        )
    pool_class = type(engine.pool).__name__
    if pool_class in ("StaticPool", "SingletonThreadPool", "AssertionPool"):
        raise ConfigurationError(
            f"engine {redact(str(engine.url))}: its {pool_class} hands one connection out to"
            " several users; xatm needs a connection of its own per branch (use the default"
            " QueuePool, or NullPool)"
        )
    spec = parse_url(engine.url.render_as_string(hide_password=False))
    if spec.kind == "mysql":
        # the engine's driver, even where its URL does not spell it (``mysql://`` is mysqldb
        # to SQLAlchemy, mysql-connector to xatm)
        name = engine.url.get_driver_name()
        spec = dataclasses.replace(spec, driver=None if name == "mysqlconnector" else name)
    return spec


# -- engines as resources ---------------------------------------------------------------------


class _Checkout:
    """One connection xatm took from an engine's pool, and what to put back on return."""

    __slots__ = ("autocommit", "proxied")

    def __init__(self, proxied: Any, autocommit: bool) -> None:
        self.proxied = proxied
        self.autocommit = autocommit  # the connection's own setting, restored on return


class EnginePool(Pool):
    """A Pool drawing connections from an Engine's own pool (``engine.raw_connection()``).

    ``get`` checks a connection out of the engine's pool and switches it to autocommit (xatm
    opens every branch explicitly); ``put`` restores the connection's own autocommit setting
    and gives it back to the engine's pool; ``discard`` invalidates it (the engine's pool
    closes it and makes another when needed). A connection that did not come from the
    engine (a retry connects directly) is simply closed.
    """

    def __init__(self, engine: Engine, participant: Participant) -> None:
        super().__init__(participant, max_idle=0)
        self.engine = engine
        self._out: dict[int, _Checkout] = {}

    def get(self, bound: float = _deadline.GRACE) -> Connection:
        try:
            proxied = self.engine.raw_connection()
        except Exception as e:
            raise ResourceUnavailable(
                f"cannot connect to resource {self.participant.name!r}"
                f" ({self.participant.spec.redacted()}): {describe_error(e)}",
                resource=self.participant.name,
            ) from None
        conn = proxied.driver_connection
        try:
            with _deadline.bounded(self.participant, conn, bound, "taking a connection over"):
                autocommit = self.participant.adopt(conn, proxied.info)
        except Exception as e:
            with contextlib.suppress(Exception):
                proxied.invalidate(e)
            if self.participant.is_connection_error(e) or _is_sa_dbapi_error(e):
                raise ResourceUnavailable(
                    f"resource {self.participant.name!r} ({self.participant.spec.redacted()}):"
                    f" the engine's connection failed: {describe_error(e)}",
                    resource=self.participant.name,
                ) from None
            raise
        with self._lock:
            self._out[id(conn)] = _Checkout(proxied, autocommit)
        return conn

    def put(self, conn: Connection) -> None:
        with self._lock:
            out = self._out.pop(id(conn), None)
        if out is None:
            self.participant.close(conn)  # not the engine's: a direct connection of a retry
            return
        if not self.participant.is_idle(conn):
            self._invalidate(out)
            return
        try:
            if not out.autocommit:
                with _deadline.bounded(self.participant, conn, _deadline.GRACE, "a reset"):
                    self.participant.set_autocommit(conn, False)
        except Exception:
            self._invalidate(out)
            return
        # The connection is known clean (idle, its own autocommit back): skip the pool's
        # reset-on-return rollback, as SQLAlchemy's Connection.close() does after its own end.
        close_special = getattr(out.proxied, "_close_special", None)
        if close_special is not None:
            close_special(transaction_reset=True)
        else:
            out.proxied.close()

    def discard(self, conn: Connection) -> None:
        with self._lock:
            out = self._out.pop(id(conn), None)
        if out is None:
            self.participant.close(conn)
        else:
            self._invalidate(out)

    @staticmethod
    def _invalidate(out: _Checkout) -> None:
        with contextlib.suppress(Exception):
            out.proxied.invalidate()

    def clear(self) -> None:
        """The server probably restarted: close the engine pool's idle connections."""
        with contextlib.suppress(Exception):
            self.engine.pool.dispose()

    def close(self) -> None:
        """The engine is the application's: it is left open (``engine.dispose()`` is theirs)."""
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"EnginePool(resource={self.participant.name!r}, engine={self.engine!r})"


def engine_pool(engine: Any, participant: Participant) -> Pool:
    """A Pool drawing connections from the Engine's own pool (how many it keeps is the
    engine's business: its ``pool_size``; the manager's ``pool_size`` does not apply)."""
    return EnginePool(engine, participant)


def _is_sa_dbapi_error(e: BaseException) -> bool:
    from sqlalchemy import exc

    return isinstance(e, exc.DBAPIError)


# -- an Engine per resource (for its dialect) -------------------------------------------------


def engine_from_spec(resource: str, spec: ResourceSpec) -> Engine:
    """An Engine for ``resource``'s URL, for its dialect only (its pool is never used for
    branches); its first connection learns the server's version and is closed at once."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import URL
    from sqlalchemy.pool import NullPool

    options = dict(spec.options)
    # the dialect's first connect is bounded as xatm's own are (a silent server's greeting)
    timeout_key = "connection_timeout" if spec.kind == "mysql" and spec.driver is None else None
    options.setdefault(timeout_key or "connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))
    if spec.driver == "pymysql":  # its connect_timeout does not bound the server's greeting
        options.setdefault("read_timeout", str(DEFAULT_CONNECT_TIMEOUT))
    # the dialect of the driver whose connections the branches are (xatm's own)
    drivername = "postgresql+psycopg" if spec.kind == "postgresql" else _MYSQL_DIALECTS[spec.driver]
    url = URL.create(
        drivername,
        username=spec.user,
        password=spec.password,
        host=spec.host,
        port=spec.port,
        database=spec.database,
        query=options,
    )
    engine = create_engine(url, poolclass=NullPool)
    if spec.kind == "mysql":
        # xatm's own MySQL connections report affected rows, not matched rows (no
        # CLIENT_FOUND_ROWS flag): an UPDATE that changes nothing counts 0. Tell the ORM not
        # to take that for a concurrent delete (StaleDataError).
        engine.dialect.supports_sane_rowcount = False
        engine.dialect.supports_sane_multi_rowcount = False
    try:
        engine.connect().close()  # learn the server's version and settings (dialect init)
    except Exception as e:
        engine.dispose()
        raise ResourceUnavailable(
            f"cannot connect to resource {resource!r} ({spec.redacted()}) to set up its"
            f" SQLAlchemy dialect: {describe_error(e)}",
            resource=resource,
        ) from None
    return engine
