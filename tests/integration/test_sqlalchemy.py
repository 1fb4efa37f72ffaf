"""SQLAlchemy integration on real servers: engines as resources, tx.session(), tx.sa_connection().

The ORM models (tests.support.sa_models) live on the private PostgreSQL pg1 (Ledger) and MariaDB
(Wallet) servers, each test on tables of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, event, exc, insert, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from tests.support import ROOT, Bank, MakeTM, Servers, autocommit_of
from tests.support.sa_models import Orm, make_models, sa_url
from xatm import (
    BranchState,
    ConfigurationError,
    ResourceUnavailable,
    TransactionError,
    TransactionManager,
    TransactionRolledBack,
    TransactionState,
)
from xatm.integrations.sqlalchemy.resources import EnginePool
from xatm.integrations.sqlalchemy.session import Enlisted

_numbers = itertools.count(1)


def _count(orm: Orm, engine: Engine, name: str) -> None:
    for what in ("connect", "checkout", "checkin"):
        key = f"{name}.{what}"
        orm.events[key] = 0

        def bump(*args: Any, _key: str = key) -> None:
            orm.events[_key] += 1

        event.listen(engine, what, bump)


@pytest.fixture
def orm(servers: Servers) -> Iterator[Orm]:
    suffix = f"{os.getpid()}_{next(_numbers)}"
    base, ledger, wallet = make_models(suffix)
    pg = create_engine(sa_url(servers.urls["pg1"]))
    my = create_engine(sa_url(servers.urls["maria"]))
    ledger.__table__.create(pg)
    wallet.__table__.create(my)
    with pg.begin() as conn:
        conn.execute(ledger.__table__.insert(), [{"id": 1, "owner": "ann", "balance": 1000}])
    with my.begin() as conn:
        conn.execute(wallet.__table__.insert(), [{"id": 1, "owner": "bob", "balance": 1000}])
    o = Orm(pg, my, base, ledger, wallet, suffix)
    _count(o, pg, "pg")
    _count(o, my, "my")
    try:
        yield o
    finally:
        with contextlib.suppress(Exception), pg.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            ledger.__table__.drop(conn)
        with contextlib.suppress(Exception), my.connect() as conn:
            conn.execute(text("SET SESSION lock_wait_timeout = 5"))
            wallet.__table__.drop(conn)
        pg.dispose()
        my.dispose()


def transfer(session: Any, orm: Orm, amount: int) -> None:
    ledger = session.get(orm.ledger, 1)
    wallet = session.get(orm.wallet, 1)
    ledger.balance -= amount
    wallet.balance += amount


# -- ORM work across a PostgreSQL engine and a MariaDB engine ----------------------------------


def test_orm_commits_across_postgres_and_mariadb(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        transfer(session, orm, 30)
        session.add(orm.ledger(id=2, owner="carl", balance=5))
        session.add(orm.wallet(id=2, owner="dora", balance=7))
    assert tx.state is TransactionState.COMMITTED
    assert tx.branches == {"ledger": BranchState.COMMITTED, "wallet": BranchState.COMMITTED}
    assert orm.rows(orm.ledger) == {1: ("ann", 970), 2: ("carl", 5)}
    assert orm.rows(orm.wallet) == {1: ("bob", 1030), 2: ("dora", 7)}


def test_orm_exception_in_block_rolls_back_both(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with pytest.raises(RuntimeError, match="boom"), tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        transfer(session, orm, 30)
        session.add(orm.wallet(id=2, owner="dora", balance=7))
        session.flush()  # the work is in both branches ...
        raise RuntimeError("boom")  # ... and goes away with them
    assert tx.state is TransactionState.ROLLED_BACK
    assert orm.rows(orm.ledger) == {1: ("ann", 1000)}
    assert orm.rows(orm.wallet) == {1: ("bob", 1000)}
    assert orm.pg.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert orm.my.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_orm_flushed_before_prepare_and_flush_failure_rolls_back(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        session.add(orm.ledger(id=3, owner="eve", balance=1))  # never flushed by hand
        session.add(orm.wallet(id=3, owner="fay", balance=2))
    assert orm.rows(orm.ledger)[3] == ("eve", 1)
    assert orm.rows(orm.wallet)[3] == ("fay", 2)

    fails = pytest.raises(TransactionRolledBack, match="before prepare")
    with fails as info, tm.transaction() as tx:
        transfer(tx.session(binds=orm.binds), orm, 10)
        other = tx.session(binds=orm.binds)
        other.add(orm.ledger(id=1, owner="dup", balance=0))  # fails at the flush
    assert isinstance(info.value.__cause__, exc.IntegrityError)
    assert tx.state is TransactionState.ROLLED_BACK
    assert orm.rows(orm.ledger)[1] == ("ann", 1000)
    assert orm.rows(orm.wallet)[1] == ("bob", 1000)


def test_session_commit_flushes_but_commits_nothing_before_the_block_ends(
    orm: Orm, make_tm: MakeTM
) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        session.add(orm.ledger(id=4, owner="gus", balance=40))
        session.add(orm.wallet(id=4, owner="hal", balance=41))
        session.commit()
        assert tx.state is TransactionState.ACTIVE
        assert set(tx.branches.values()) == {BranchState.ACTIVE}
        # the rows are in the branches, not committed: other sessions do not see them ...
        assert 4 not in orm.rows(orm.ledger)
        assert 4 not in orm.rows(orm.wallet)
        # ... the session does (reloaded from its branch), and keeps working
        assert session.get(orm.ledger, 4).balance == 40
        session.get(orm.wallet, 4).balance += 1
    assert orm.rows(orm.ledger)[4] == ("gus", 40)
    assert orm.rows(orm.wallet)[4] == ("hal", 42)


def test_session_rollback_makes_the_transaction_rollback_only(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with pytest.raises(TransactionRolledBack, match="rolled back"), tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        transfer(session, orm, 25)
        session.flush()
        session.rollback()
        # more work after the rollback is possible, but the transaction cannot commit
        session.add(orm.wallet(id=5, owner="ivy", balance=1))
    assert tx.state is TransactionState.ROLLED_BACK
    assert orm.rows(orm.ledger) == {1: ("ann", 1000)}
    assert orm.rows(orm.wallet) == {1: ("bob", 1000)}


def test_session_closed_inside_the_block_keeps_its_work(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        with tx.session(binds=orm.binds) as session:
            session.add(orm.wallet(id=6, owner="jo", balance=6))  # pending at close
        other = tx.session(binds=orm.binds)
        other.add(orm.ledger(id=6, owner="kim", balance=6))
        other.close()
    assert orm.rows(orm.wallet)[6] == ("jo", 6)
    assert orm.rows(orm.ledger)[6] == ("kim", 6)


def test_session_block_raising_dooms_the_transaction(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with pytest.raises(TransactionRolledBack, match="raised ValueError"), tm.transaction() as tx:
        tx.execute("ledger", f"UPDATE {orm.ledger.__tablename__} SET balance = 0")
        with contextlib.suppress(ValueError), tx.session(binds=orm.binds) as session:
            session.add(orm.wallet(id=7, owner="lou", balance=7))
            session.flush()
            raise ValueError("caught inside the transaction block")
    assert orm.rows(orm.ledger) == {1: ("ann", 1000)}
    assert 7 not in orm.rows(orm.wallet)


def test_sessions_are_closed_when_the_transaction_ends(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        ledger = session.get(orm.ledger, 1)
    assert ledger not in session  # closed: its objects are detached
    assert tx.annotation(Enlisted) is None  # and forgotten (no leak of finished transactions)
    with pytest.raises(TransactionError, match="committed"):
        session.get(orm.ledger, 1)
    with pytest.raises(TransactionError, match="committed"):
        tx.session(binds=orm.binds)


def test_session_enlists_only_the_resources_it_uses(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        assert tx.branches == {}
        session.get(orm.wallet, 1).owner = "bea"
    assert tx.branches == {"wallet": BranchState.COMMITTED}  # one branch: one phase
    assert orm.rows(orm.wallet)[1] == ("bea", 1000)


def test_session_binds_by_declarative_base_and_default_bind(
    orm: Orm, make_tm: MakeTM, servers: Servers
) -> None:
    tm = make_tm(sweeper=False, resources={"ledger": orm.pg, "pg2": servers.urls["pg2"]})
    with tm.transaction() as tx:
        session = tx.session(binds={orm.base: "ledger"})
        session.get(orm.ledger, 1).balance = 1
        other = tx.session(bind="pg2")
        assert other.execute(text("SELECT 41 + 1")).scalar() == 42
    assert orm.rows(orm.ledger)[1] == ("ann", 1)


def test_session_savepoints_bulk_statements_and_named_binds(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        session.execute(insert(orm.wallet), [{"id": i, "owner": "w", "balance": i} for i in (2, 3)])
        session.execute(update(orm.ledger).values(balance=orm.ledger.balance + 1))
        with session.begin_nested():  # SAVEPOINT inside the branches (also inside XA)
            session.get(orm.wallet, 2).balance = 20
        with contextlib.suppress(KeyError), session.begin_nested():
            session.get(orm.ledger, 1).balance = 0
            session.get(orm.wallet, 3).balance = 0
            session.flush()
            raise KeyError("back to the savepoint only")
        count = text(f"SELECT count(*) FROM {orm.wallet.__tablename__}")
        assert session.execute(count, bind_arguments={"bind": "wallet"}).scalar() == 3
        conn = session.connection(bind_arguments={"bind": "ledger"})
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert tx.state is TransactionState.COMMITTED
    assert orm.rows(orm.ledger) == {1: ("ann", 1001)}
    assert orm.rows(orm.wallet) == {1: ("bob", 1000), 2: ("w", 20), 3: ("w", 3)}


def test_session_begin_block_raising_makes_the_transaction_rollback_only(
    orm: Orm, make_tm: MakeTM
) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        session = tx.session(binds=orm.binds, autobegin=False)
        with session.begin():  # leaving it normally: flush, and no commit
            session.get(orm.wallet, 1).balance = 1
        assert tx.state is TransactionState.ACTIVE
        with contextlib.suppress(LookupError), session.begin():
            session.get(orm.ledger, 1).balance = 2
            raise LookupError("rolls the session back")
    assert orm.rows(orm.ledger)[1] == ("ann", 1000)
    assert orm.rows(orm.wallet)[1] == ("bob", 1000)


def test_session_mistakes_are_clear_errors(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with tm.transaction() as tx:
        with pytest.raises(ConfigurationError, match="needs binds"):
            tx.session()
        with pytest.raises(ConfigurationError, match="unknown resource 'nope'"):
            tx.session(binds={orm.ledger: "nope"})
        with pytest.raises(ConfigurationError, match="must name a resource"):
            tx.session(binds={orm.ledger: orm.pg})
        with pytest.raises(ConfigurationError, match="twophase"):
            tx.session(binds=orm.binds, twophase=True)
    assert tx.branches == {}


# -- engines as resources ----------------------------------------------------------------------


def test_engine_pool_is_reused_and_given_back_as_it_was(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    assert isinstance(tm._ctx.resources.pools["ledger"], EnginePool)
    before = dict(orm.events)
    for n in range(3):
        with tm.transaction() as tx:
            tx.execute("ledger", f"UPDATE {orm.ledger.__tablename__} SET balance = %s", (n,))
            tx.execute("wallet", f"UPDATE {orm.wallet.__tablename__} SET balance = %s", (n,))
    for name in ("pg", "my"):
        assert orm.events[f"{name}.checkout"] - before[f"{name}.checkout"] == 3
        assert orm.events[f"{name}.checkin"] - before[f"{name}.checkin"] == 3
        assert orm.events[f"{name}.connect"] - before[f"{name}.connect"] == 0  # reused
    assert orm.pg.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert orm.my.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert orm.rows(orm.ledger)[1][1] == 2
    # the engines' connections came back in their own (non-autocommit) mode: a plain
    # SQLAlchemy transaction on them still rolls back
    for engine, model in ((orm.pg, orm.ledger), (orm.my, orm.wallet)):
        with engine.connect() as conn:
            assert autocommit_of(conn.connection.driver_connection) is False
            conn.execute(model.__table__.update().values(balance=-1))
            conn.rollback()
    assert orm.rows(orm.ledger)[1][1] == 2
    assert orm.rows(orm.wallet)[1][1] == 2


def test_engine_isolation_level_applies_to_branches(orm: Orm, make_tm: MakeTM) -> None:
    engine = create_engine(orm.pg.url, isolation_level="SERIALIZABLE")
    try:
        tm = make_tm(sweeper=False, resources={"ledger": engine, "wallet": orm.my})
        with tm.transaction() as tx:
            level = tx.execute("ledger", "SHOW transaction_isolation").fetchone()[0]
        assert level == "serializable"
    finally:
        engine.dispose()


def test_engine_recovery_and_failed_connections(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    report = tm.recover()  # recovery draws from the engines' pools too
    assert report.unreachable == ()
    assert orm.pg.pool.checkedout() == 0  # type: ignore[attr-defined]
    # a branch whose connection failed is invalidated, not given back
    connects = orm.events["pg.connect"]
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        tx.execute("wallet", f"UPDATE {orm.wallet.__tablename__} SET balance = 0")
        with contextlib.suppress(psycopg.OperationalError):  # the branch's connection dies
            tx.connection("ledger").execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert orm.rows(orm.ledger)[1][1] == 1000
    assert orm.rows(orm.wallet)[1][1] == 1000
    with tm.transaction() as tx:  # the dead one was invalidated: the engine made another
        tx.execute("ledger", f"UPDATE {orm.ledger.__tablename__} SET balance = 9")
    assert orm.events["pg.connect"] == connects + 1
    assert orm.rows(orm.ledger)[1][1] == 9


def test_unreachable_engine_is_a_clear_error(orm: Orm, make_tm: MakeTM) -> None:
    down = create_engine("postgresql+psycopg://xatm:hush-hush@127.0.0.1:1/xatm")
    tm = make_tm(sweeper=False, resources={"ledger": down, "wallet": orm.my})
    refused = pytest.raises(ResourceUnavailable, match="cannot connect to resource 'ledger'")
    with refused as info, tm.transaction() as tx:
        tx.execute("wallet", f"UPDATE {orm.wallet.__tablename__} SET balance = 0")
        tx.execute("ledger", "SELECT 1")
    assert "hush-hush" not in str(info.value)
    assert tx.state is TransactionState.ROLLED_BACK
    assert orm.rows(orm.wallet)[1][1] == 1000
    assert orm.my.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_unsupported_engines_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="sqlite"):
        TransactionManager({"a": create_engine("sqlite://")}, "/nonexistent", "n1")
    static = create_engine("postgresql+psycopg://u:secret@127.0.0.1:1/db", poolclass=StaticPool)
    with pytest.raises(ConfigurationError, match="StaticPool") as info:
        TransactionManager({"a": static}, "/nonexistent", "n1")
    assert "secret" not in str(info.value)


# -- tx.sa_connection() ------------------------------------------------------------------------


def test_sa_connection_runs_in_the_branch_and_never_ends_it(orm: Orm, make_tm: MakeTM) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    table = orm.ledger.__table__
    with tm.transaction() as tx:
        conn = tx.sa_connection("ledger")
        assert tx.sa_connection("ledger") is conn
        conn.execute(table.insert().values(id=8, owner="max", balance=8))
        conn.commit()  # does nothing: the branch commits when the block ends
        assert 8 not in orm.rows(orm.ledger)
        # the same branch as tx.execute() and the session
        assert tx.execute("ledger", f"SELECT owner FROM {table.name} WHERE id = 8").fetchone()
        session = tx.session(binds=orm.binds)
        assert session.get(orm.ledger, 8).owner == "max"
        with conn.begin():
            conn.execute(table.update().where(table.c.id == 8).values(balance=88))
        conn.close()  # leaves the branch alone
        wallet = tx.sa_connection("wallet")
        wallet.execute(text(f"UPDATE {orm.wallet.__tablename__} SET balance = 3"))
        with pytest.raises(exc.InvalidRequestError, match="xatm"):
            wallet.begin_twophase()
        with pytest.raises(exc.InvalidRequestError, match="isolation_level"):
            wallet.execution_options(isolation_level="SERIALIZABLE")
    assert orm.rows(orm.ledger)[8] == ("max", 88)
    assert orm.rows(orm.wallet)[1] == ("bob", 3)
    with pytest.raises(exc.ResourceClosedError):  # closed when the transaction ended
        wallet.execute(text("SELECT 1"))


def test_sa_connection_rollback_makes_the_transaction_rollback_only(
    orm: Orm, make_tm: MakeTM
) -> None:
    tm = make_tm(sweeper=False, resources=orm.resources)
    with pytest.raises(TransactionRolledBack, match="rolled back"), tm.transaction() as tx:
        tx.execute("wallet", f"UPDATE {orm.wallet.__tablename__} SET balance = 0")
        conn = tx.sa_connection("ledger")
        with contextlib.suppress(KeyError), conn.begin():
            conn.execute(text(f"UPDATE {orm.ledger.__tablename__} SET balance = 0"))
            raise KeyError("rolls the SQLAlchemy transaction back")
    assert orm.rows(orm.ledger)[1][1] == 1000
    assert orm.rows(orm.wallet)[1][1] == 1000


# -- resources given as URLs -------------------------------------------------------------------


def test_session_on_url_resources(orm: Orm, make_tm: MakeTM, servers: Servers) -> None:
    tm = make_tm(
        sweeper=False, resources={"ledger": servers.urls["pg1"], "wallet": servers.urls["maria"]}
    )
    with tm.transaction() as tx:
        session = tx.session(binds=orm.binds)
        transfer(session, orm, 100)
        session.commit()  # expires the objects ...
        wallet = session.get(orm.wallet, 1)
        wallet.owner = "bob"  # ... so this UPDATE changes nothing: no StaleDataError
        session.flush()
        conn = tx.sa_connection("wallet")
        assert conn.execute(text("SELECT 2 * 21")).scalar() == 42
    assert orm.rows(orm.ledger)[1] == ("ann", 900)
    assert orm.rows(orm.wallet)[1] == ("bob", 1100)
    with tm.transaction() as tx:  # the dialect Engine of a URL resource is made once
        tx.session(binds=orm.binds).get(orm.ledger, 1)
    assert sorted(tm._sqlalchemy.made) == ["ledger", "wallet"]


# -- a coordinator crash between the phases ----------------------------------------------------


@pytest.mark.parametrize("failpoint", ["after_prepare", "after_decision"])
def test_orm_crash_between_the_phases_then_recover(
    failpoint: str, orm: Orm, bank: Bank, make_tm: MakeTM, servers: Servers, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    cfg = {
        "pg_url": servers.urls["pg1"],
        "mysql_url": servers.urls["maria"],
        "log": str(log),
        "node_id": "sa-crashy",
        "suffix": orm.suffix,
        "amount": 40,
    }
    path = tmp_path / "sa-worker.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.workers.sa_worker", str(path)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "XATM_FAILPOINT": failpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    prepared = bank.xatm_prepared()
    assert len(prepared["pg1"]) == 1 and len(prepared["maria"]) == 1
    assert {x.gtrid for x in prepared["pg1"] + prepared["maria"]} == {prepared["pg1"][0].gtrid}

    tm = make_tm(node_id="sa-crashy", log=log, resources=orm.resources, sweeper=False)
    report = tm.recover()
    assert report.unreachable == () and report.in_doubt == 0
    assert bank.xatm_prepared()["pg1"] == [] and bank.xatm_prepared()["maria"] == []
    if failpoint == "after_decision":  # the decision was logged: both branches commit
        assert orm.rows(orm.ledger) == {1: ("ann", 960)}
        assert orm.rows(orm.wallet) == {1: ("bob", 1040), 2: ("new", 40)}
    else:  # presumed abort
        assert orm.rows(orm.ledger) == {1: ("ann", 1000)}
        assert orm.rows(orm.wallet) == {1: ("bob", 1000)}
    # and the recovered manager keeps working with the engines
    with tm.transaction() as tx:
        transfer(tx.session(binds=orm.binds), orm, 1)
    assert (
        sum(b for _, b in orm.rows(orm.ledger).values())
        + sum(b for i, (_, b) in orm.rows(orm.wallet).items() if i == 1)
        == 2000
    )
