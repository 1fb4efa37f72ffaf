"""The core protocol on real servers: commit, rollback, errors in branches, votes, limits."""

from __future__ import annotations

import contextlib
import time

import psycopg
import pytest

from tests.support import (
    Bank,
    MakeTM,
    connect,
    mysql_errno,
    mysql_errors,
    prepare_foreign,
    resolve_foreign,
    run,
)
from xatm import (
    BranchState,
    ConfigurationError,
    ResourceNotFit,
    ResourceUnavailable,
    TransactionError,
    TransactionManager,
    TransactionRolledBack,
    TransactionState,
    TransactionTimeout,
)


def transfer(tx: object, bank: Bank, src: str, dst: str, amount: int, tid: str) -> None:
    t, j = bank.table, bank.journal
    tx.execute(src, f"UPDATE {t} SET bal = bal - %s WHERE id = 1", (amount,))  # type: ignore[attr-defined]
    tx.execute(dst, f"UPDATE {t} SET bal = bal + %s WHERE id = 1", (amount,))  # type: ignore[attr-defined]
    for r in {src, dst}:
        tx.execute(r, f"INSERT INTO {j} (tid) VALUES (%s)", (tid,))  # type: ignore[attr-defined]


def test_commit_across_three_resources(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 30 WHERE id = 1")
        tx.execute("pg2", f"UPDATE {bank.table} SET bal = bal + 10 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 20 WHERE id = 1")
        rows = tx.execute("pg1", f"SELECT bal FROM {bank.table} WHERE id = %s", (1,)).fetchall()
        assert rows == [(970,)]
    assert tx.state is TransactionState.COMMITTED
    assert set(tx.branches.values()) == {BranchState.COMMITTED}
    b = bank.balances()
    assert (b["pg1"][1], b["pg2"][1], b["maria"][1]) == (970, 1010, 1020)
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_exception_in_block_rolls_back_everything(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with pytest.raises(RuntimeError, match="boom"), tm.transaction() as tx:
        transfer(tx, bank, "pg1", "maria", 50, "t1")
        tx.execute("pg2", f"UPDATE {bank.table} SET bal = 0")
        raise RuntimeError("boom")
    assert tx.state is TransactionState.ROLLED_BACK
    assert bank.total() == bank.initial_total
    assert bank.balance("pg2") == 1000
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    # the connections went back to the pool clean: the next transaction works
    with tm.transaction() as tx2:
        transfer(tx2, bank, "pg1", "maria", 5, "t2")
    assert bank.balance("maria") == 1005


def test_sql_error_in_postgres_branch(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with pytest.raises(psycopg.errors.UniqueViolation), tm.transaction() as tx:
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
        tx.execute("pg1", f"INSERT INTO {bank.table} VALUES (1, 1)")
    assert bank.total() == bank.initial_total
    assert tx.state is TransactionState.ROLLED_BACK


def test_sql_error_in_mysql_branch(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with pytest.raises(mysql_errors()) as info, tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
        tx.execute("maria", f"INSERT INTO {bank.table} VALUES (1, 1)")
    assert mysql_errno(info.value) == 1062
    assert bank.total() == bank.initial_total


def test_swallowed_postgres_error_makes_the_branch_vote_no(bank: Bank, make_tm: MakeTM) -> None:
    """PREPARE TRANSACTION in a failed transaction answers ROLLBACK instead of raising."""
    tm = make_tm()
    with pytest.raises(TransactionRolledBack, match="already failed"), tm.transaction() as tx:
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 7 WHERE id = 1")
        # the application swallows the error and tries to commit
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            tx.execute("pg2", f"INSERT INTO {bank.table} VALUES (1, 1)")
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_branch_votes_no_at_prepare(bank: Bank, make_tm: MakeTM) -> None:
    """PostgreSQL refuses to PREPARE a transaction that touched a temporary table."""
    tm = make_tm()
    with pytest.raises(TransactionRolledBack) as info, tm.transaction() as tx:
        transfer(tx, bank, "maria", "pg2", 40, "t-vote")
        tx.execute("pg1", "CREATE TEMP TABLE scratch (x int)")
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 2")
    assert isinstance(info.value.__cause__, psycopg.errors.FeatureNotSupported)
    assert info.value.gtrid == tx.gtrid
    assert bank.total() == bank.initial_total
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_branch_committed_behind_xatms_back_votes_no(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with pytest.raises(TransactionRolledBack, match="outside xatm"), tm.transaction() as tx:
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 3 WHERE id = 1")
        tx.execute("pg1", "SELECT 1")
        tx.connection("pg1").execute("COMMIT")
    assert bank.balance("maria") == 1000


def test_mysql_deadlock_victim_votes_no(bank: Bank, make_tm: MakeTM) -> None:
    """A deadlock inside an XA branch makes it rollback-only: the whole transaction rolls back
    even when the application swallows the error."""
    import threading

    tm = make_tm()
    blocker = connect(bank.urls["maria"])
    t = bank.table
    run(blocker, "BEGIN")
    for i in range(50):  # a bigger transaction, so InnoDB picks the xatm branch as victim
        run(blocker, f"INSERT INTO {bank.journal} VALUES (%s)", (f"blk{i}",))
    run(blocker, f"UPDATE {t} SET bal = bal WHERE id = 4")
    waiter = threading.Thread(target=run, args=(blocker, f"UPDATE {t} SET bal = bal WHERE id = 3"))
    errors: list[int] = []
    try:
        with pytest.raises(TransactionRolledBack, match="maria") as info, tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 1")
            tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 3")
            waiter.start()
            time.sleep(0.3)
            try:
                tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 4")
            except mysql_errors() as e:
                errors.append(mysql_errno(e))  # swallowed: the application tries to commit anyway
        waiter.join()
    finally:
        run(blocker, "ROLLBACK")
        blocker.close()
    assert errors == [1213]
    assert isinstance(info.value.__cause__, mysql_errors())
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared()["maria"] == []


def test_one_branch_commits_in_one_phase_without_a_log_write(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    log = tm._ctx.log
    before = log.forced_records  # type: ignore[attr-defined]
    with tm.transaction() as tx:
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 2")
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 1")
    assert log.forced_records == before  # type: ignore[attr-defined]
    assert bank.balance("maria", 1) == 1005 and bank.balance("maria", 2) == 1005
    assert bank.balance("pg1") == 1005


def test_two_branches_force_one_log_record(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    log = tm._ctx.log
    before = log.forced_records  # type: ignore[attr-defined]
    with tm.transaction() as tx:
        transfer(tx, bank, "pg1", "maria", 1, "t-log")
    assert log.forced_records == before + 1  # type: ignore[attr-defined]
    assert log.pending() == {}


def test_empty_transaction(make_tm: MakeTM) -> None:
    tm = make_tm()
    with tm.transaction() as tx:
        pass
    assert tx.state is TransactionState.COMMITTED


def test_connection_is_the_enlisted_driver_connection(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with tm.transaction() as tx:
        conn = tx.connection("pg1")
        assert isinstance(conn, psycopg.Connection)
        conn.execute(f"UPDATE {bank.table} SET bal = 1 WHERE id = 4")
        mconn = tx.connection("maria")
        cur = mconn.cursor()
        cur.execute(f"UPDATE {bank.table} SET bal = 2 WHERE id = 4")
        cur.close()
    assert bank.balances()["pg1"][4] == 1 and bank.balances()["maria"][4] == 2


def test_unknown_resource_is_a_clear_error(make_tm: MakeTM) -> None:
    tm = make_tm()
    with (
        pytest.raises(ConfigurationError, match=r"unknown resource 'nope'.*maria"),
        tm.transaction() as tx,
    ):
        tx.execute("nope", "SELECT 1")


def test_node_with_2pc_disabled_is_refused(
    pg_no2pc: str, bank: Bank, make_tm: MakeTM, servers: object
) -> None:
    tm = make_tm(resources={"pg0": pg_no2pc, "maria": bank.urls["maria"]})
    with (
        pytest.raises(ResourceNotFit, match="max_prepared_transactions") as info,
        tm.transaction() as tx,
    ):
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
        tx.execute("pg0", "SELECT 1")
    assert "xatm-secret" not in str(info.value)
    assert bank.total() == bank.initial_total


def test_unreachable_node_is_a_clear_error_without_the_password(
    bank: Bank, make_tm: MakeTM
) -> None:
    from xatm.testing.servers import free_port

    dead = f"postgresql://xatm:hunter2@127.0.0.1:{free_port()}/xatm"
    tm = make_tm(resources={"dead": dead, "maria": bank.urls["maria"]})
    with pytest.raises(ResourceUnavailable) as info, tm.transaction() as tx:
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
        tx.execute("dead", "SELECT 1")
    assert "hunter2" not in str(info.value)
    assert "'dead'" in str(info.value)
    assert bank.total() == bank.initial_total
    report = tm.recover()
    assert report.unreachable == ("dead",)


def test_bad_url_is_a_configuration_error_without_the_password(tmp_path: object) -> None:
    for url in ("postgresql://u:hunter2@h:notaport/db", "oracle://u:hunter2@h/db", 42):
        with pytest.raises(ConfigurationError) as info:
            TransactionManager({"r": url}, log=str(tmp_path), node_id="n")  # type: ignore[dict-item]
        assert "hunter2" not in str(info.value)


def test_bad_node_id_and_resource_names(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="at most 30"):
        TransactionManager({"r": "mysql://h/d"}, log=str(tmp_path), node_id="n" * 31)
    with pytest.raises(ConfigurationError, match="node_id"):
        TransactionManager({"r": "mysql://h/d"}, log=str(tmp_path), node_id="a.b'; DROP")
    with pytest.raises(ConfigurationError, match="resource name"):
        TransactionManager({"r x": "mysql://h/d"}, log=str(tmp_path), node_id="n")


def test_timeout_rolls_back(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(timeout=0.3)
    with pytest.raises(TransactionTimeout), tm.transaction() as tx:
        transfer(tx, bank, "pg1", "maria", 9, "t-slow")
        time.sleep(0.4)
    assert bank.total() == bank.initial_total
    assert bank.journal_ids()["pg1"] == set()
    with pytest.raises(TransactionTimeout), tm.transaction() as tx:
        tx.execute("pg1", "SELECT 1")
        time.sleep(0.4)
        tx.execute("maria", "SELECT 1")


def test_set_rollback_only(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with pytest.raises(TransactionRolledBack, match="audit"), tm.transaction() as tx:
        transfer(tx, bank, "pg1", "maria", 9, "t-doomed")
        tx.set_rollback_only("audit said no")
    assert bank.total() == bank.initial_total


def test_no_work_after_the_end(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    with tm.transaction() as tx:
        tx.execute("pg1", "SELECT 1")
    with pytest.raises(TransactionError, match="committed"):
        tx.execute("pg2", "SELECT 1")


def test_foreign_prepared_transactions_are_untouched(bank: Bank, make_tm: MakeTM) -> None:
    for name in ("pg1", "maria"):
        prepare_foreign(bank.urls[name], "core")
    try:
        tm = make_tm()
        report = tm.recover()
        assert report.foreign >= 2
        assert report.committed == report.rolled_back == 0
        prepared = bank.prepared()
        assert "foreign-core" in prepared["pg1"]
        assert any(
            b"other-app-core".hex() in str(x) or "other-app-core" in str(x)
            for x in prepared["maria"]
        )
    finally:
        for name in ("pg1", "maria"):
            resolve_foreign(bank.urls[name], "core")


def test_manager_is_shared_between_threads(bank: Bank, make_tm: MakeTM) -> None:
    import threading

    tm = make_tm()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                with tm.transaction() as tx:
                    transfer(tx, bank, "pg1", "maria", 1, f"th{n}-{i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert bank.balance("pg1") == 960 and bank.balance("maria") == 1040
    assert len(bank.journal_ids()["maria"]) == 40


def test_read_only_postgres_branch_skips_phase_two_and_the_log(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    log = tm._ctx.log
    before = log.forced_records  # type: ignore[attr-defined]
    # one writer (maria) and one reader (pg2): no decision needs logging
    with tm.transaction() as tx:
        tx.execute("pg2", f"SELECT bal FROM {bank.table} WHERE id = 1").fetchall()
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
    assert log.forced_records == before  # type: ignore[attr-defined]
    assert tx.branches == {"pg2": BranchState.COMMITTED, "maria": BranchState.COMMITTED}
    assert bank.balance("maria") == 1001


def test_commit_record_names_writing_branches_with_postgres_txids(
    bank: Bank, make_tm: MakeTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    tm = make_tm()
    seen: list[tuple[str, list[str], dict[str, int]]] = []
    real = tm._ctx.log.log_commit

    def spy(
        gtrid: str,
        branches: list[str],
        txids: dict[str, int] | None = None,
        deadline: float | None = None,
    ) -> None:
        seen.append((gtrid, list(branches), dict(txids or {})))
        real(gtrid, branches, txids, deadline)

    monkeypatch.setattr(tm._ctx.log, "log_commit", spy)
    with tm.transaction() as tx:
        tx.execute("pg2", f"SELECT bal FROM {bank.table} WHERE id = 1").fetchall()
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
    [(gtrid, branches, txids)] = seen
    assert gtrid == tx.gtrid
    assert sorted(branches) == ["maria", "pg1"]
    assert set(txids) == {"pg1"} and txids["pg1"] > 0
    status = run(bank.conns["pg1"], "SELECT pg_xact_status(%s::text::xid8)", (txids["pg1"],))
    assert status == [("committed",)]
