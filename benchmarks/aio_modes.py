"""The asyncio commit modes: the same transfer, as tasks on one event loop.

* ``xatm-async``  :class:`xatm.aio.AsyncTransactionManager` shared by every task: as ``xatm``,
                  with psycopg's ``AsyncConnection`` and ``mysql.connector.aio``, the
                  branches' prepares and commits concurrent, the log fsync on a worker thread
* ``raw-async``   hand-written asyncio 2PC, the statements of ``raw`` awaited in order on
                  the same two drivers (one pair of connections per task)
* ``xatm-async-cancel`` ``xatm-async`` with about one transfer in ten (``CANCEL_SHARE``)
                  cancelled at a random moment, as a client disconnect or an
                  ``asyncio.timeout`` would: a timeout drawn from 0 to the task's recent
                  transfer time. A cancelled transfer that rolled back is run again, so each
                  transfer counted is one committed (its cancelled attempts' time included)

The driver (``benchmarks.driver``) runs a mode that has ``async_client`` as N tasks on one
event loop instead of N threads (``--clients 48``: 48 concurrent tasks).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import time
from typing import Any

import psycopg

from xatm.admin import parse_url
from xatm.aio import AsyncTransactionManager

from .modes import RunContext, _credit_sql, _debit_sql, _one_row, listen

_ids = itertools.count(1)

#: mysql.connector.aio has no C extension
AIO_KIND = "pure Python (mysql.connector.aio)"


async def _mysql_connect(url: str) -> Any:
    import mysql.connector.aio

    spec = parse_url(url)
    return await mysql.connector.aio.connect(
        host=spec.host,
        port=spec.port,
        user=spec.user or "",
        password=spec.password or "",
        database=spec.database,
        autocommit=True,
        ssl_disabled=True,  # loopback servers without TLS
    )


class RawAsyncClient:
    """``raw``'s statements, awaited."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.debit, self.credit = _debit_sql(ctx.table), _credit_sql(ctx.table)
        self.prefix = f"bencha_{os.getpid()}_{next(_ids)}_"
        self.n = 0

    async def open(self) -> RawAsyncClient:
        self.pg = await psycopg.AsyncConnection.connect(self.ctx.urls.pg, autocommit=True)
        self.my = await _mysql_connect(self.ctx.urls.mysql)
        self.cur = await self.my.cursor()
        return self

    async def transfer(self, debit: int, credit: int, amount: int) -> None:
        self.n += 1
        gid = f"{self.prefix}{self.n}"
        xid = f"X'{gid.encode().hex()}'"
        stage = "active"
        try:
            await self.pg.execute("BEGIN")
            cur = await self.pg.execute(self.debit, (amount, debit))
            _one_row(cur.rowcount, "PostgreSQL")
            await self.cur.execute(f"XA START {xid}")
            await self.cur.execute(self.credit, (amount, credit))
            _one_row(self.cur.rowcount, "MariaDB")
            await self.pg.execute(f"PREPARE TRANSACTION '{gid}'")
            stage = "pg-prepared"
            await self.cur.execute(f"XA END {xid}")
            await self.cur.execute(f"XA PREPARE {xid}")
            stage = "committing"
            await self.pg.execute(f"COMMIT PREPARED '{gid}'")
            await self.cur.execute(f"XA COMMIT {xid}")
        except BaseException:
            await self._abort(stage, gid, xid)
            raise

    async def _abort(self, stage: str, gid: str, xid: str) -> None:
        if stage == "committing":
            return
        stmt = "ROLLBACK" if stage == "active" else f"ROLLBACK PREPARED '{gid}'"
        try:
            await self.pg.execute(stmt)
        except Exception:
            await self.pg.close()
            self.pg = await psycopg.AsyncConnection.connect(self.ctx.urls.pg, autocommit=True)
        for stmt in (f"XA END {xid}", f"XA ROLLBACK {xid}"):
            try:
                await self.cur.execute(stmt)
            except Exception:
                continue

    async def close(self) -> None:
        await self.pg.close()
        await self.my.close()


class RawAsyncMode:
    """``RawAsyncClient`` per task."""

    mysql_kind = AIO_KIND

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def open(self) -> None:
        pass

    async def async_client(self) -> RawAsyncClient:
        return await RawAsyncClient(self.ctx).open()

    def log_counters(self) -> tuple[int, int] | None:
        return None

    async def aclose(self) -> None:
        pass

    def close(self) -> None:
        pass


class XatmAsyncClient:
    def __init__(self, tm: AsyncTransactionManager, table: str) -> None:
        self.tm = tm
        self.debit, self.credit = _debit_sql(table), _credit_sql(table)

    async def transfer(self, debit: int, credit: int, amount: int) -> None:
        async with self.tm.transaction() as tx:
            cur = await tx.execute("pg", self.debit, (amount, debit))
            _one_row(cur.rowcount, "PostgreSQL")
            cur = await tx.execute("maria", self.credit, (amount, credit))
            _one_row(cur.rowcount, "MariaDB")

    async def close(self) -> None:
        pass


class XatmAsyncMode:
    """One AsyncTransactionManager shared by every task; its log in a scratch dir. Nothing
    listens to its events, as in ``xatm`` (``benchmarks.modes.listen``)."""

    mysql_kind = AIO_KIND

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._restore = listen("none")
        self.logdir = ctx.workdir / f"xatm-async-log-{next(_ids)}"
        self.tm = AsyncTransactionManager(
            {"pg": ctx.urls.pg, "maria": ctx.urls.mysql},
            log=self.logdir,
            node_id="bench",
            pool_size=ctx.clients,
        )

    async def open(self) -> None:
        await self.tm.open()

    async def async_client(self) -> XatmAsyncClient:
        return XatmAsyncClient(self.tm, self.ctx.table)

    def log_counters(self) -> tuple[int, int] | None:
        log: Any = self.tm.sync.context.log
        return int(log.forces), int(log.forced_records)

    async def aclose(self) -> None:
        await self.tm.close()

    def close(self) -> None:
        self._restore()
        shutil.rmtree(self.logdir, ignore_errors=True)


#: the share of ``xatm-async-cancel``'s transfer attempts that are cancelled
CANCEL_SHARE = 0.1


class CancellingAsyncClient(XatmAsyncClient):
    """``XatmAsyncClient`` whose attempts are cancelled now and then (``CANCEL_SHARE``)."""

    def __init__(self, tm: AsyncTransactionManager, table: str, seed: int) -> None:
        super().__init__(tm, table)
        self.rng = random.Random(seed)
        self.typical = 0.002  # seconds: a moving average of this task's transfer times
        self.cancelled = 0

    async def transfer(self, debit: int, credit: int, amount: int) -> None:
        while True:
            if self.rng.random() >= CANCEL_SHARE:
                t0 = time.perf_counter()
                await super().transfer(debit, credit, amount)
                self.typical += 0.1 * (time.perf_counter() - t0 - self.typical)
                return
            seen: list[Any] = []
            try:
                async with asyncio.timeout(self.rng.uniform(0.0, self.typical)):
                    await self._watched(debit, credit, amount, seen)
                return
            except TimeoutError:
                self.cancelled += 1
                state = seen[0].state.value if seen else "not begun"
                if state == "committed":  # cancelled once its decision was made
                    return
                if state not in ("rolled-back", "not begun", "active"):
                    raise RuntimeError(f"a cancelled transfer ended {state}") from None

    async def _watched(self, debit: int, credit: int, amount: int, seen: list[Any]) -> None:
        async with self.tm.transaction() as tx:
            seen.append(tx)
            cur = await tx.execute("pg", self.debit, (amount, debit))
            _one_row(cur.rowcount, "PostgreSQL")
            cur = await tx.execute("maria", self.credit, (amount, credit))
            _one_row(cur.rowcount, "MariaDB")


class XatmAsyncCancelMode(XatmAsyncMode):
    """``XatmAsyncMode`` whose tasks cancel about one transfer in ten."""

    async def async_client(self) -> XatmAsyncClient:
        return CancellingAsyncClient(self.tm, self.ctx.table, next(_ids))
