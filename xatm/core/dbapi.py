"""The types a transaction hands out: DB-API cursors and connections, as Protocols.

``tx.execute`` returns the driver's own cursor (psycopg's, mysql-connector's, PyMySQL's or
mysqlclient's), typed as :class:`DBCursor`: what every one of them offers (PEP 249). The
asyncio drivers' cursors (psycopg's ``AsyncCursor``, ``mysql.connector.aio``'s) are
:class:`AsyncDBCursor`. ``tx.connection(resource)`` is typed :class:`DBConnection`
(:class:`AsyncDBConnection`); ``tx.connection(resource, psycopg.Connection)`` returns the
driver's connection as that very type, after checking it is one (``TypeError`` otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

#: a statement's parameters: positional (``%s``) or named (``%(name)s``)
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None
#: a row, as the default cursors of every driver return it
Row: TypeAlias = tuple[Any, ...]

#: the type a typed ``tx.connection(resource, kind)`` returns
C = TypeVar("C")


class DBCursor(Protocol):
    """A DB-API 2.0 cursor (PEP 249), as every driver's default cursor offers it."""

    @property
    def description(self) -> Sequence[Any] | None: ...

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Row | None: ...

    def fetchmany(self, size: int = ...) -> Sequence[Row]: ...

    def fetchall(self) -> Sequence[Row]: ...

    def close(self) -> object: ...

    def __iter__(self) -> Iterator[Row]: ...


class AsyncDBCursor(Protocol):
    """An asyncio driver's cursor: PEP 249's, with the fetches awaited."""

    @property
    def description(self) -> Sequence[Any] | None: ...

    @property
    def rowcount(self) -> int: ...

    async def fetchone(self) -> Row | None: ...

    async def fetchmany(self, size: int = ...) -> Sequence[Row]: ...

    async def fetchall(self) -> Sequence[Row]: ...

    async def close(self) -> object: ...

    def __aiter__(self) -> AsyncIterator[Row]: ...


class DBConnection(Protocol):
    """A DB-API 2.0 connection, as far as a branch's user may use it: cursors (xatm
    commits, rolls back and closes it). ``tx.connection(resource, psycopg.Connection)``
    gives the driver's own type."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any: ...


class AsyncDBConnection(Protocol):
    """An asyncio driver's connection (psycopg's ``cursor()`` is plain, mysql.connector.aio's
    is awaited: ``await tx.connection(resource, psycopg.AsyncConnection)`` gives the real
    type)."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any: ...


def as_kind(resource: str, conn: Any, kind: type[C] | None) -> C:
    """``conn`` as ``kind`` (TypeError if it is not one); itself when ``kind`` is None."""
    if kind is not None and not isinstance(conn, kind):
        raise TypeError(
            f"the connection of resource {resource!r} is a {type(conn).__module__}."
            f"{type(conn).__qualname__}, not a {kind.__module__}.{kind.__qualname__}"
        )
    result: C = conn
    return result
