"""FastAPI and Starlette: a lifespan, a transaction that commits *before* the response is sent,
and exception handlers. ``pip install 'xatm[fastapi]'``; imported only when used.

::

    from fastapi import FastAPI
    from xatm.fastapi import TransactionDep, add_exception_handlers, lifespan

    app = FastAPI(lifespan=lifespan("xatm.toml"))   # or lifespan(AsyncTransactionManager(...))
    add_exception_handlers(app)

    @app.post("/transfer")
    async def transfer(t: Transfer, tx: TransactionDep) -> dict[str, str]:
        await tx.execute("ledger", "UPDATE acc SET bal = bal - %s WHERE id = %s", (t.amt, t.src))
        await tx.execute("wallet", "UPDATE acc SET bal = bal + %s WHERE id = %s", (t.amt, t.dst))
        return {"status": "done"}   # sent only after both branches committed

**Why a dependency of its own.** FastAPI ends a ``yield`` dependency *after* the response is
sent by default, so ``async with tm.transaction() as tx: yield tx`` answers 200 before the
transaction commits (and a rollback at commit is only in the server's log).
:data:`TransactionDep` is ``Depends(transaction, scope="function")``: the transaction ends
when the endpoint returns, before the response goes out, and its outcome is the response: a
commit gives the endpoint's response, a rollback at commit goes to the exception handlers
(``TransactionRolledBack`` -> 409). An endpoint that raises (``HTTPException`` included)
rolls the transaction back. :data:`SyncTransactionDep` is the same for ``def`` endpoints
(the threaded ``tx``: ``tx.session()`` for SQLAlchemy).

**Exception handlers** (:func:`add_exception_handlers`, or :data:`exception_handlers` for
``FastAPI(exception_handlers=...)`` / ``Starlette(exception_handlers=...)``):
``TransactionRolledBack`` (its ``TransactionTimeout`` too) -> 409 (nothing was committed:
safe to retry), ``ResourceUnavailable`` -> 503 with ``Retry-After``, ``TransactionInDoubt``
-> 500 with the gtrid (the outcome is not known here: do not retry blindly). The body is
``{"detail": ..., "gtrid": ...}``; the full error is logged (``xatm.fastapi``), not sent.

**A client that disconnects** does not stop the endpoint: Starlette does not cancel a plain
endpoint, so its transaction commits (or rolls back) as if the client were still there. A
client that retries after a timeout must therefore send an idempotency key (a saga's ``key``,
or a unique request id the endpoint records in the same transaction).

Starlette without FastAPI: :func:`lifespan` and the handlers work as they are; in an endpoint,
``async with request.app.state.xatm.transaction() as tx:`` ends before the endpoint returns.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import JSONResponse, Response

from xatm.aio import AsyncTransaction, AsyncTransactionManager
from xatm.errors import (
    ConfigurationError,
    ResourceUnavailable,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
)
from xatm.transactions.transaction import Transaction

__all__ = [
    "ManagerDep",
    "SyncTransactionDep",
    "TransactionDep",
    "add_exception_handlers",
    "exception_handlers",
    "get_manager",
    "lifespan",
    "sync_transaction",
    "transaction",
]

logger = logging.getLogger("xatm.fastapi")

if "scope" not in inspect.signature(Depends).parameters:  # pragma: no cover - old FastAPI
    raise ImportError(
        "xatm.fastapi needs FastAPI >= 0.121 (Depends(..., scope='function')), which ends a"
        " transaction before the response is sent: pip install 'xatm[fastapi]'"
    )

#: where :func:`lifespan` keeps the manager: ``app.state.xatm``
STATE_KEY = "xatm"


def lifespan(
    manager: AsyncTransactionManager | str | os.PathLike[str],
    *,
    drain: float | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` or ``Starlette(lifespan=...)``: opens the
    manager (built from a config file path at startup, or the one given) and keeps it in
    ``app.state.xatm``; at shutdown closes it, letting the transactions in flight finish
    (up to ``drain`` seconds: the manager's timeout by default). To combine it with a
    lifespan of your own, enter it there: ``async with lifespan("xatm.toml")(app): yield``."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        tm = (
            manager
            if isinstance(manager, AsyncTransactionManager)
            else AsyncTransactionManager.from_config(manager)
        )
        await tm.open()
        setattr(app.state, STATE_KEY, tm)
        try:
            yield
        finally:
            await tm.close(drain)

    return run


def get_manager(request: Request) -> AsyncTransactionManager:
    """The application's manager (``app.state.xatm``, set by :func:`lifespan`)."""
    tm = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(tm, AsyncTransactionManager):
        raise ConfigurationError(
            "no xatm manager in app.state.xatm: give the app lifespan=xatm.fastapi.lifespan(...)"
        )
    return tm


async def transaction(request: Request) -> AsyncIterator[AsyncTransaction]:
    """A global transaction for the endpoint; use it through :data:`TransactionDep` (it must
    have ``scope="function"``: see the module docstring)."""
    async with get_manager(request).transaction() as tx:
        yield tx


def sync_transaction(request: Request) -> Iterator[Transaction]:
    """A threaded global transaction for a ``def`` endpoint (:data:`SyncTransactionDep`)."""
    with get_manager(request).sync.transaction() as tx:
        yield tx


#: the application's :class:`~xatm.aio.AsyncTransactionManager`
ManagerDep = Annotated[AsyncTransactionManager, Depends(get_manager)]
#: an endpoint's transaction, committed before its response is sent
TransactionDep = Annotated[AsyncTransaction, Depends(transaction, scope="function")]
#: the same for a ``def`` endpoint: a threaded :class:`~xatm.Transaction`
SyncTransactionDep = Annotated[Transaction, Depends(sync_transaction, scope="function")]


def _body(detail: str, e: TransactionError | None) -> dict[str, Any]:
    return {"detail": detail, "gtrid": None if e is None else e.gtrid}


async def _rolled_back(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TransactionRolledBack)
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    detail = "the transaction was rolled back: nothing was committed (safe to retry)"
    return JSONResponse(_body(detail, exc), status_code=409)


async def _unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ResourceUnavailable)
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "a database is unavailable: nothing was committed", "gtrid": None},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _in_doubt(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TransactionInDoubt)
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    detail = (
        "the outcome of the transaction is not known yet (recovery settles it): check before"
        " retrying"
    )
    return JSONResponse(_body(detail, exc), status_code=500)


#: exception class -> handler, for ``FastAPI(exception_handlers=...)`` (a copy: ``dict(...)``)
exception_handlers: dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
] = {
    TransactionRolledBack: _rolled_back,
    ResourceUnavailable: _unavailable,
    TransactionInDoubt: _in_doubt,
}


def add_exception_handlers(app: Any) -> None:
    """Add :data:`exception_handlers` to a FastAPI or Starlette app."""
    for cls, handler in exception_handlers.items():
        app.add_exception_handler(cls, handler)
