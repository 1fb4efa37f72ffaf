"""The commit modes the benchmark compares, each doing the same transfer.

A transfer debits one account in PostgreSQL and credits one in MariaDB. Every mode is a
factory ``(RunContext) -> Mode``; a ``Mode`` hands out one ``Client`` per client thread.
``MODES`` maps mode names to factories: a new xatm commit mode is one more line there, e.g.
``"xatm-fast": xatm_mode(commit_markers=("pg",))`` passes its keyword arguments to
``TransactionManager``.

Round trips per transfer, sequential unless noted (``||`` = the two run side by side):

* ``onepc``       PG: BEGIN, UPDATE, COMMIT; MariaDB: UPDATE, COMMIT (not atomic: the ceiling)
* ``raw``         PG: BEGIN, UPDATE, PREPARE TRANSACTION, COMMIT PREPARED;
                  MariaDB: XA START, UPDATE, XA END, XA PREPARE, XA COMMIT
* ``raw-durable`` the durable floor: ``raw`` plus, between the prepares and the commits,
                  the COMMIT decision written in place to a preallocated file and fdatasynced
                  with group commit (``benchmarks.floor``): what any crash-safe coordinator
                  must do at least
* ``sqlalchemy``  as ``raw`` (via ``Connection.begin_twophase()``) plus SQLAlchemy's pool
                  reset on check-in (a ROLLBACK round trip on MariaDB)
* ``xatm``        as ``raw``, with prepare || prepare, a log fsync, commit || commit
* ``xatm-serial`` as ``xatm`` with ``parallel=False`` (branches one after another)
* ``xatm-metrics`` ``xatm`` with the Prometheus collector listening (``xatm`` itself runs
                  with no event subscriber)
* ``xatm-otel``   ``xatm`` with OpenTelemetry spans (SDK TracerProvider, no exporter)
* ``xatm-fast``   commit marker on PostgreSQL: MariaDB: XA START, UPDATE, XA END, XA PREPARE;
                  then PG: BEGIN, UPDATE, INSERT decision row + COMMIT (pipelined: one
                  round trip) is the decision; then MariaDB: XA COMMIT. No log fsync.
* ``xatm-saga``   a saga of two local steps (docs/sagas.md): its record created (a file,
                  fsynced, and its directory), then PG: BEGIN + barrier INSERT (one round
                  trip), UPDATE, COMMIT; the record's note (written, not fsynced); then
                  MariaDB: XA START + barrier INSERT (one round trip), UPDATE, XA END + XA
                  COMMIT ONE PHASE; then the record's end (written, not fsynced). Not
                  atomic at one instant: compared with ``onepc`` (dtm's published figure is
                  0.29x plain MySQL)
* ``xatm-async``, ``raw-async``, ``xatm-async-cancel``: the asyncio API, hand-written asyncio
                  2PC, and the asyncio API with one transfer in ten cancelled, as tasks on
                  one event loop (``benchmarks/aio_modes.py``)
* ``raw-cext``, ``xatm-cext``, ``xatm-fast-cext``: ``raw``, ``xatm``, ``xatm-fast`` on
                  mysql-connector's C extension (``use_pure=false``); every other mode
                  runs it pure (``use_pure=true``), whichever class would be the default
* ``raw-mp``, ``xatm-mp``, ``xatm-mp-shared``: N coordinator processes
                  (``benchmarks/mp.py``)
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from xatm import Saga, TransactionManager
from xatm.sagas.barrier import ensure_table as ensure_barrier_table

from .env import C_EXTENSION, PURE, Urls, mysql_connect, pg_connect, require_kind, with_use_pure
from .floor import DecisionFile

_ids = itertools.count(1)


class Client(Protocol):
    """What one client thread uses; not shared between threads."""

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        """Move ``amount`` from PostgreSQL account ``debit`` to MariaDB account ``credit``."""

    def close(self) -> None: ...


class Mode(Protocol):
    """One commit mode set up for one run (one client count)."""

    #: which mysql-connector class its MySQL connections are (``env.C_EXTENSION``/``PURE``)
    mysql_kind: str

    def client(self) -> Client: ...

    def log_counters(self) -> tuple[int, int] | None:
        """(log fsyncs, records those fsyncs made durable) so far; None if no log."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """What a mode factory gets: the servers, the table, the client count, a scratch dir,
    and how many processes a multi-process mode spreads the clients over."""

    urls: Urls
    table: str
    clients: int
    workdir: Path
    processes: int = 2


ModeFactory = Callable[[RunContext], Mode]


class WrongRowCount(RuntimeError):
    pass


def _one_row(rowcount: int, side: str) -> None:
    if rowcount != 1:
        raise WrongRowCount(f"{side} UPDATE touched {rowcount} rows, expected 1")


def _debit_sql(table: str) -> str:
    return f"UPDATE {table} SET bal = bal - %s WHERE id = %s"


def _credit_sql(table: str) -> str:
    return f"UPDATE {table} SET bal = bal + %s WHERE id = %s"


class _NoLog:
    mysql_kind = PURE

    def log_counters(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- onepc


class OnePCClient:
    """Two independent local transactions, committed one after the other."""

    def __init__(self, ctx: RunContext) -> None:
        self.pg = pg_connect(ctx.urls.pg, autocommit=False)
        self.my = mysql_connect(ctx.urls.mysql, autocommit=False)
        self.cur = self.my.cursor()
        self.debit, self.credit = _debit_sql(ctx.table), _credit_sql(ctx.table)

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        try:
            _one_row(self.pg.execute(self.debit, (amount, debit)).rowcount, "PostgreSQL")
            self.cur.execute(self.credit, (amount, credit))
            _one_row(self.cur.rowcount, "MariaDB")
            self.pg.commit()
            self.my.commit()
        except BaseException:
            self.pg.rollback()
            self.my.rollback()
            raise

    def close(self) -> None:
        self.pg.close()
        self.my.close()


class OnePCMode(_NoLog):
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def client(self) -> Client:
        return OnePCClient(self.ctx)


# --------------------------------------------------------------------------- raw


class RawClient:
    """Hand-written 2PC: the statements a careful programmer would send, in order."""

    def __init__(self, ctx: RunContext, pure: bool = True) -> None:
        self.pg_url = ctx.urls.pg
        self.pg = pg_connect(ctx.urls.pg)
        self.my = mysql_connect(ctx.urls.mysql, pure=pure)
        self.cur = self.my.cursor()
        self.debit, self.credit = _debit_sql(ctx.table), _credit_sql(ctx.table)
        self.prefix = f"bench_{os.getpid()}_{next(_ids)}_"
        self.n = 0
        #: makes the decision durable between the prepares and the commits (``raw``: none)
        self.decide: Callable[[str], None] | None = None

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        self.n += 1
        gid = f"{self.prefix}{self.n}"
        xid = f"X'{gid.encode().hex()}'"
        stage = "active"
        try:
            self.pg.execute("BEGIN")
            _one_row(self.pg.execute(self.debit, (amount, debit)).rowcount, "PostgreSQL")
            self.cur.execute(f"XA START {xid}")
            self.cur.execute(self.credit, (amount, credit))
            _one_row(self.cur.rowcount, "MariaDB")
            self.pg.execute(f"PREPARE TRANSACTION '{gid}'")
            stage = "pg-prepared"
            self.cur.execute(f"XA END {xid}")
            self.cur.execute(f"XA PREPARE {xid}")
            if self.decide is not None:
                self.decide(gid)
            stage = "committing"
            self.pg.execute(f"COMMIT PREPARED '{gid}'")
            self.cur.execute(f"XA COMMIT {xid}")
        except BaseException:
            self._abort(stage, gid, xid)
            raise

    def _abort(self, stage: str, gid: str, xid: str) -> None:
        """Roll back what can be (no recovery in this mode: a phase-2 failure is left)."""
        if stage == "committing":
            return
        attempts = ["ROLLBACK"] if stage == "active" else [f"ROLLBACK PREPARED '{gid}'"]
        for stmt in attempts:
            try:
                self.pg.execute(stmt)
            except Exception:
                self.pg.close()
                self.pg = pg_connect(self.pg_url)
        for stmt in (f"XA END {xid}", f"XA ROLLBACK {xid}"):
            try:
                self.cur.execute(stmt)
            except Exception:
                continue

    def close(self) -> None:
        self.pg.close()
        self.my.close()


class RawMode(_NoLog):
    """``RawClient`` per thread; ``pure=False``: on the C extension (checked on connect)."""

    def __init__(self, ctx: RunContext, pure: bool = True) -> None:
        self.ctx = ctx
        self.pure = pure
        self.mysql_kind = PURE if pure else C_EXTENSION

    def client(self) -> Client:
        return RawClient(self.ctx, self.pure)


def raw_cext(ctx: RunContext) -> Mode:
    return RawMode(ctx, pure=False)


# --------------------------------------------------------------------------- raw-durable


class RawDurableClient(RawClient):
    """``raw`` plus the durable decision between the prepares and the commits: the floor of
    a crash-safe coordinator (``benchmarks.floor``)."""

    def __init__(self, ctx: RunContext, log: DecisionFile) -> None:
        super().__init__(ctx)
        self.decide = log.commit


class RawDurableMode(_NoLog):
    """``RawDurableClient`` per thread, all on one decision file in the scratch dir."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.log = DecisionFile(ctx.workdir / f"floor-{next(_ids)}.log")

    def client(self) -> Client:
        return RawDurableClient(self.ctx, self.log)

    def log_counters(self) -> tuple[int, int] | None:
        return self.log.counters()

    def close(self) -> None:
        self.log.close()
        self.log.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sqlalchemy


class SQLAlchemyClient:
    """``Connection.begin_twophase()`` on both engines; prepare both, commit both."""

    def __init__(self, mode: SQLAlchemyMode) -> None:
        self.mode = mode

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        m = self.mode
        with m.pg.connect() as c1, m.my.connect() as c2:
            t1 = c1.begin_twophase()
            t2 = c2.begin_twophase()
            _one_row(c1.execute(m.debit, {"a": amount, "id": debit}).rowcount, "PostgreSQL")
            _one_row(c2.execute(m.credit, {"a": amount, "id": credit}).rowcount, "MariaDB")
            t1.prepare()
            t2.prepare()
            t1.commit()
            t2.commit()

    def close(self) -> None:
        pass


class SQLAlchemyMode(_NoLog):
    def __init__(self, ctx: RunContext) -> None:
        pool = {"pool_size": ctx.clients, "max_overflow": 0}
        self.pg = sa.create_engine(_sa_url(ctx.urls.pg, "postgresql+psycopg"), **pool)
        self.my = sa.create_engine(
            _sa_url(ctx.urls.mysql, "mysql+mysqlconnector"),
            connect_args={"use_pure": True},
            **pool,
        )
        t = ctx.table
        self.debit = sa.text(f"UPDATE {t} SET bal = bal - :a WHERE id = :id")
        self.credit = sa.text(f"UPDATE {t} SET bal = bal + :a WHERE id = :id")
        for engine in (self.pg, self.my):  # open every pooled connection before timing
            conns = [engine.connect() for _ in range(ctx.clients)]
            for conn in conns:
                conn.close()

    def client(self) -> Client:
        return SQLAlchemyClient(self)

    def close(self) -> None:
        self.pg.dispose()
        self.my.dispose()


def _sa_url(url: str, scheme: str) -> str:
    return scheme + url[url.index("://") :]


# --------------------------------------------------------------------------- xatm


class XatmClient:
    def __init__(self, tm: TransactionManager, table: str) -> None:
        self.tm = tm
        self.debit, self.credit = _debit_sql(table), _credit_sql(table)

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        with self.tm.transaction() as tx:
            _one_row(tx.execute("pg", self.debit, (amount, debit)).rowcount, "PostgreSQL")
            _one_row(tx.execute("maria", self.credit, (amount, credit)).rowcount, "MariaDB")

    def close(self) -> None:
        pass


def listen(exporter: str) -> Callable[[], None]:
    """Make exactly ``exporter`` (``none``, ``prometheus``, ``otel``) listen to xatm's events;
    returns the call that puts back what listened before."""
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    import xatm.otel
    import xatm.prometheus

    xatm.prometheus.autoinstall()  # as any process with prometheus_client would have it
    was_installed = xatm.prometheus.installed()
    xatm.prometheus.uninstall()
    registry = CollectorRegistry()
    if exporter == "prometheus":
        xatm.prometheus.install(registry)
    elif exporter == "otel":
        xatm.otel.instrument(TracerProvider())  # spans are built, then dropped

    def restore() -> None:
        xatm.otel.uninstrument()
        xatm.prometheus.uninstall(registry)
        if was_installed:
            xatm.prometheus.install()

    return restore


class XatmMode:
    """One TransactionManager shared by every client thread; its log in a scratch dir
    (or ``log``: a directory shared with other nodes, or a PostgreSQL URL).
    ``exporter``: what listens to its events (none, or the Prometheus or OTel exporter);
    ``pure``: mysql-connector pure (``use_pure=true``) or its C extension (checked)."""

    def __init__(
        self,
        ctx: RunContext,
        exporter: str = "none",
        *,
        pure: bool = True,
        node_id: str = "bench",
        log: str | Path | None = None,
        **tm_options: Any,
    ) -> None:
        self.ctx = ctx
        self._restore = listen(exporter)
        self.logdir = ctx.workdir / f"xatm-log-{next(_ids)}" if log is None else None
        tm_options.setdefault("pool_size", ctx.clients)  # as many idle connections as clients
        try:
            self.tm = TransactionManager(
                {"pg": ctx.urls.pg, "maria": with_use_pure(ctx.urls.mysql, pure)},
                log=self.logdir or log or "",
                node_id=node_id,
                **tm_options,
            )
        except BaseException:
            self._restore()
            raise
        try:
            # Open the pooled connections before timing (through the manager's context).
            for name, pool in self.tm.context.resources.pools.items():
                conns = [pool.get() for _ in range(ctx.clients)]
                if name == "maria":
                    self.mysql_kind = require_kind(conns[0], pure, "xatm's MariaDB pool")
                for conn in conns:
                    pool.put(conn)
        except BaseException:
            self.close()
            raise

    def client(self) -> Client:
        return XatmClient(self.tm, self.ctx.table)

    def log_counters(self) -> tuple[int, int] | None:
        log: Any = self.tm.context.log
        return int(log.forces), int(log.forced_records)

    def close(self) -> None:
        self.tm.close()
        self._restore()
        if self.logdir is not None:
            shutil.rmtree(self.logdir, ignore_errors=True)


class SagaClient:
    def __init__(self, tm: TransactionManager) -> None:
        self.tm = tm

    def transfer(self, debit: int, credit: int, amount: int) -> None:
        result = self.tm.run_saga("bench", data={"d": debit, "c": credit, "a": amount})
        if result.state != "completed":
            raise RuntimeError(f"saga {result.saga_id} {result.state}: {result.error}")

    def close(self) -> None:
        pass


def bench_saga(table: str) -> Saga:
    """Debit on PostgreSQL ("pg"), then credit on MariaDB ("maria"), each compensable."""
    debit, credit = _debit_sql(table), _credit_sql(table)

    def step(resource: str, sql: str, account: str, sign: int) -> Callable[[Any, Any], None]:
        def run(tx: Any, d: dict[str, int]) -> None:
            _one_row(tx.execute(resource, sql, (sign * d["a"], d[account])).rowcount, resource)

        return run

    saga = Saga("bench", max_attempts=1)
    saga.step("debit", step("pg", debit, "d", 1), step("pg", debit, "d", -1), ["pg"])
    saga.step("credit", step("maria", credit, "c", 1), step("maria", credit, "c", -1), ["maria"])
    return saga


class SagaMode(XatmMode):
    """``XatmMode`` running each transfer as a saga; barrier tables made before timing."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, sagas=[bench_saga(ctx.table)])
        for name, spec in self.tm.resources.items():
            ensure_barrier_table(name, spec)

    def client(self) -> Client:
        return SagaClient(self.tm)


def xatm_mode(**tm_options: Any) -> ModeFactory:
    """A factory for xatm with these ``TransactionManager`` keyword arguments."""

    def factory(ctx: RunContext) -> Mode:
        return XatmMode(ctx, **tm_options)

    return factory


#: ``xatm-gated``'s ``max_active``: about the concurrency at which throughput stops rising here
GATE = 8

#: the threaded modes (``benchmarks.catalog.MODES`` adds the asyncio ones)
MODES: dict[str, ModeFactory] = {
    "onepc": OnePCMode,
    "raw": RawMode,
    "raw-durable": RawDurableMode,
    "sqlalchemy": SQLAlchemyMode,
    "xatm": xatm_mode(),
    "xatm-serial": xatm_mode(parallel=False),
    "xatm-gated": xatm_mode(max_active=GATE),
    "xatm-fast": xatm_mode(commit_markers=("pg",)),
    "xatm-metrics": xatm_mode(exporter="prometheus"),
    "xatm-otel": xatm_mode(exporter="otel"),
    "xatm-saga": SagaMode,
    "raw-cext": raw_cext,
    "xatm-cext": xatm_mode(pure=False),
    "xatm-fast-cext": xatm_mode(pure=False, commit_markers=("pg",)),
}


#: the modes every other mode is compared against (where they ran)
BASELINES = ("raw", "raw-durable", "sqlalchemy", "raw-async", "raw-mp", "raw-cext")


def is_xatm(mode: str) -> bool:
    return mode.startswith("xatm")


def needs_cext(mode: str) -> bool:
    """Does ``mode`` measure mysql-connector's C extension (and so need it to load)?"""
    return mode.endswith("-cext")


def like_for_like(mode: str) -> str:
    """The hand-written baseline doing the same as ``mode`` the same way: ``raw-cext`` for
    the C-extension modes, ``raw-mp`` for the multi-process ones, ``raw-async`` for
    asyncio, ``raw`` otherwise."""
    if needs_cext(mode):
        return "raw-cext"
    if "-mp" in mode:
        return "raw-mp"
    if "-async" in mode:
        return "raw-async"
    return "raw"
