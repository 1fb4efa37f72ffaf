"""Smaller defects at the edges of the manager: doctor with a shared log, a failed prune,
arguments checked before anything is opened, nothing left open by a failed start, a
transaction never used or dropped unended, and the fence before a one-phase commit."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers, connect, run
from tests.support.recovery import wait_for
from xatm import ConfigurationError, TransactionManager, TransactionRolledBack, TransactionState
from xatm.aio import AsyncTransactionManager
from xatm.recovery.sweeper import Sweeper

INNODB_TRX = "SELECT count(*) FROM information_schema.innodb_trx"


def test_doctor_checks_the_shared_log(make_tm: MakeTM, log_url: str) -> None:
    tm = make_tm("doc", log=log_url, sweeper=False)
    report = tm.doctor()
    logs = [c for c in report.checks if c.subject == "log"]
    assert [(c.name, c.ok) for c in logs] == [
        ("shared-log", True),
        ("standbys", True),  # a failover of the log's database could lose decisions: none
        ("synchronous-commit", True),
    ], logs
    assert "no log directory" not in str(report.to_json())


def test_a_failed_prune_does_not_fail_the_recovery_pass(make_tm: MakeTM, log_url: str) -> None:
    tm = make_tm("pruner", log=log_url, sweeper=False)
    conn = connect(log_url)
    try:
        # a real error from the database on the prune's DELETE, nowhere else
        run(
            conn,
            "CREATE OR REPLACE FUNCTION xatm.no_prune() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'pruning refused for this test'; END$$",
        )
        run(
            conn,
            "CREATE TRIGGER no_prune BEFORE DELETE ON xatm.decisions"
            " FOR EACH STATEMENT EXECUTE FUNCTION xatm.no_prune()",
        )
        report = tm.recover()
        assert report.committed == report.rolled_back == 0
        assert not report.problems
    finally:
        run(conn, "DROP TRIGGER IF EXISTS no_prune ON xatm.decisions")
        conn.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"sweep_interval": 0},
        {"sweep_interval": -1.0},
        {"sweep_interval": "10"},
        {"pool_size": 0},
        {"segment_bytes": -5},
        {"lock_timeout": -1},
    ],
)
def test_bad_arguments_are_refused_before_the_log_is_opened(
    servers: Servers, tmp_path: Path, log_url: str, bad: dict[str, object]
) -> None:
    log = tmp_path / "log"
    with pytest.raises(ConfigurationError):
        TransactionManager(servers.urls, log, "edge", sweeper=False, **bad)  # type: ignore[arg-type]
    assert not log.exists()  # nothing was opened, so nothing can leak
    with pytest.raises(ConfigurationError):
        TransactionManager(servers.urls, log_url, "edge", sweeper=False, **bad)  # type: ignore[arg-type]
    # the shared log's node lock was never taken: the same node_id starts at once
    TransactionManager(servers.urls, log_url, "edge", sweeper=False, lock_timeout=0).close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_start_releases_the_log(
    servers: Servers,
    tmp_path: Path,
    log_url: str,
    monkeypatch: pytest.MonkeyPatch,
    shared: bool,
) -> None:
    log: str | Path = log_url if shared else tmp_path / "log"

    def refuse(self: Sweeper) -> None:
        raise RuntimeError("cannot start a thread")

    monkeypatch.setattr(Sweeper, "start", refuse)
    with pytest.raises(RuntimeError):
        TransactionManager(servers.urls, log, "failing", sweeper=True)
    monkeypatch.undo()
    TransactionManager(servers.urls, log, "failing", sweeper=False, lock_timeout=0).close()


# -- a transaction that never enlists anything, or that the application drops ----------------


def test_a_transaction_never_used_is_not_registered(servers: Servers, make_tm: MakeTM) -> None:
    """Only a transaction that enlists a branch is "running here" (recovery leaves its
    branches to it); made and never used, none is kept, and the count of transactions in
    flight (which turns off overlapping the round trips past 2) is not inflated."""
    tm = make_tm("unused", sweeper=False)
    ctx = tm.context
    made = [tm.transaction() for _ in range(5)]
    with made[3]:
        pass  # entered, nothing done in it
    assert [ctx.running(tx.gtrid) for tx in made] == [None] * 5
    assert ctx.overlap()
    with tm.transaction() as tx:
        tx.execute("pg1", "SELECT 1")
        assert ctx.running(tx.gtrid) is tx
    assert ctx.running(tx.gtrid) is None


def test_an_asyncio_transaction_never_used_is_not_registered(
    servers: Servers, tmp_path: Path
) -> None:
    async def main() -> None:
        async with AsyncTransactionManager(
            servers.urls, tmp_path / "log", "unused", sweeper=False
        ) as tm:
            ctx = tm.sync.context
            made = [tm.transaction() for _ in range(5)]
            async with made[3]:
                pass
            assert [ctx.running(tx.gtrid) for tx in made] == [None] * 5
            assert ctx.overlap()
            async with tm.transaction() as tx:
                await tx.execute("maria", "SELECT 1")
                assert ctx.running(tx.gtrid) is tx
            assert ctx.running(tx.gtrid) is None

    asyncio.run(main())


def test_a_dropped_transaction_does_not_keep_its_row_locks(bank: Bank, make_tm: MakeTM) -> None:
    """The application begins work and drops the transaction without ending it (a bug):
    the registry does not keep it, so it is collected with its connection, whose server
    rolls its work back and frees its rows."""
    tm = make_tm("dropped", sweeper=False)
    tx = tm.transaction()
    session = tx.execute("maria", "SELECT CONNECTION_ID()").fetchone()[0]
    tx.execute("maria", f"UPDATE {bank.table} SET bal = 0 WHERE id = 4")
    gtrid = tx.gtrid
    assert tm.context.running(gtrid) is tx
    del tx
    gc.collect()
    assert tm.context.running(gtrid) is None
    # that session's transaction (not any other test's: the server is this worker's)
    mine = f"{INNODB_TRX} WHERE trx_mysql_thread_id = {int(session)}"
    wait_for(
        lambda: int(run(bank.conns["maria"], mine)[0][0]) == 0,
        timeout=30,
        what="the dropped transaction's session to end",
    )
    run(bank.conns["maria"], "SET SESSION innodb_lock_wait_timeout = 5")
    run(bank.conns["maria"], f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 4")
    assert bank.balances()["maria"][4] == 1001


# -- the decision fence before a one-phase commit ------------------------------------------------


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_a_refused_decision_stops_a_one_phase_commit(
    resource: str, bank: Bank, make_tm: MakeTM
) -> None:
    """The one-phase commit of a single branch is the transaction's decision: refused
    before it is sent (a cancelled asyncio caller, recovery's abort of an expired one), it
    rolls back, as the commit of a logged decision does."""
    tm = make_tm("fence1", sweeper=False)
    tx = tm.transaction()
    tx.execute(resource, f"UPDATE {bank.table} SET bal = 0 WHERE id = 1")
    assert tx.refuse_decision("cancelled")
    with pytest.raises(TransactionRolledBack, match="cancelled"):
        tx.commit()
    assert tx.state is TransactionState.ROLLED_BACK
    assert bank.balances()[resource][1] == 1000


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_a_refused_decision_stops_an_asyncio_one_phase_commit(
    resource: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    async def main() -> None:
        async with AsyncTransactionManager(
            servers.urls, tmp_path / "log", "fence1", sweeper=False
        ) as tm:
            tx = tm.transaction()
            await tx.execute(resource, f"UPDATE {bank.table} SET bal = 0 WHERE id = 1")
            assert tx.refuse_decision("cancelled")
            with pytest.raises(TransactionRolledBack, match="cancelled"):
                await tx.commit()
            assert tx.state is TransactionState.ROLLED_BACK
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.balances()[resource][1] == 1000


# -- a one-phase COMMIT the server refuses -----------------------------------------------------


def test_a_serialization_failure_at_a_one_phase_commit_is_a_rollback_not_a_doubt(
    bank: Bank, make_tm: MakeTM, servers: Servers
) -> None:
    """SERIALIZABLE on pg1 (set in the resource's URL), write skew with another session: the
    branch's COMMIT is refused with 40001, which psycopg counts as an OperationalError. The
    server answered and the session lives on, so the transaction rolled back: the caller gets
    TransactionRolledBack (retry it), nothing is in doubt, nothing is left to recover."""
    serializable = (
        servers.urls["pg1"] + "?options=-c%20default_transaction_isolation%3Dserializable"
    )
    tm = make_tm("ser", resources={"pg1": serializable}, sweeper=False)
    other = connect(bank.urls["pg1"])  # autocommit: each block below is one transaction
    other.autocommit = False
    try:
        other.execute("SET default_transaction_isolation = serializable")
        other.commit()
        with pytest.raises(TransactionRolledBack) as info, tm.transaction() as tx:
            tx.execute("pg1", f"SELECT bal FROM {bank.table} WHERE id = 1").fetchall()
            other.execute(f"SELECT bal FROM {bank.table} WHERE id = 2").fetchall()
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 2")
            other.execute(f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
            other.commit()  # the first to commit wins; the branch's COMMIT gets 40001
        assert "40001" in str(info.value) or "serializ" in str(info.value).lower(), info.value
    finally:
        other.close()
    assert bank.balances()["pg1"][1] == 999 and bank.balances()["pg1"][2] == 1000
    assert tm.recover().in_doubt == 0
    assert bank.xatm_prepared()["pg1"] == []
