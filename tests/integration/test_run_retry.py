"""``tm.run(fn, retries=...)`` (and ``await atm.run``): a transaction run again only when that
is safe, on real servers: a real deadlock, a real serialization failure and a real lost
connection are retried; an in-doubt outcome, a rollback asked for and an application error
are not."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import Bank, CommitsBlocked, MakeTM, Servers, connect, mysql_connection_id, run
from xatm import (
    ConfigurationError,
    SagaTransaction,
    Transaction,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
)
from xatm.aio import AsyncTransaction, AsyncTransactionManager
from xatm.transactions.retry import retryable


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_a_real_deadlock_is_retried(bank: Bank, make_tm: MakeTM, resource: str) -> None:
    tm = make_tm(node_id=f"dl{resource}", sweeper=False)
    t = bank.table
    both_locked = threading.Barrier(2, timeout=30)
    attempts = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def move(name: str, first: int, second: int) -> Callable[[Transaction], int]:
        def fn(tx: Transaction) -> int:
            attempts[name] += 1
            tx.execute(resource, f"UPDATE {t} SET bal = bal - 1 WHERE id = %s", (first,))
            if attempts[name] == 1:
                both_locked.wait()  # each holds its first row: the second update deadlocks
            tx.execute(resource, f"UPDATE {t} SET bal = bal + 1 WHERE id = %s", (second,))
            tx.execute("pg2", "SELECT 1")  # a second branch: a real two-phase commit
            return attempts[name]

        return fn

    def worker(name: str, first: int, second: int) -> None:
        try:
            tm.run(move(name, first, second), retries=5, backoff=0.01)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=("a", 1, 2)),
        threading.Thread(target=worker, args=("b", 2, 1)),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert sorted(attempts.values())[1] >= 2  # the deadlock's victim ran again
    assert bank.balance(resource, 1) == bank.balance(resource, 2) == 1000  # both moved once
    assert bank.total() == bank.initial_total


def test_a_real_serialization_failure_is_retried(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="ser", sweeper=False)
    t = bank.table
    other = connect(bank.urls["pg1"])
    attempts = 0

    def fn(tx: Transaction) -> int:
        nonlocal attempts
        attempts += 1
        tx.execute("pg1", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = tx.execute("pg1", f"SELECT bal FROM {t} WHERE id = 3").fetchone()
        assert row is not None
        if attempts == 1:  # another session changes the row after this snapshot was taken
            run(other, f"UPDATE {t} SET bal = bal + 100 WHERE id = 3")
        tx.execute("pg1", f"UPDATE {t} SET bal = %s WHERE id = 3", (int(row[0]) - 1,))
        tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 3")
        return attempts

    try:
        assert tm.run(fn, retries=2, backoff=0) == 2
    finally:
        other.close()
    assert bank.balance("pg1", 3) == 1099 and bank.balance("maria", 3) == 1001


def test_a_lost_connection_before_the_decision_is_retried(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="lost", sweeper=False)
    t = bank.table
    admin = connect(bank.urls["pg1"])
    attempts = 0

    def fn(tx: Transaction) -> None:
        nonlocal attempts
        attempts += 1
        tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 4")
        pid = tx.connection("pg1", psycopg.Connection).info.backend_pid
        if attempts == 1:
            run(admin, "SELECT pg_terminate_backend(%s)", (pid,))
        tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 4")

    try:
        tm.run(fn, retries=2, backoff=0)
    finally:
        admin.close()
    assert attempts == 2
    assert bank.balance("pg1", 4) == 999 and bank.balance("maria", 4) == 1001


def test_what_is_not_retried(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="noretry", sweeper=False)
    t = bank.table
    calls: list[str] = []

    def rollback_only(tx: Transaction) -> None:
        calls.append("rollback_only")
        tx.execute("pg1", f"UPDATE {t} SET bal = 0 WHERE id = 1")
        tx.set_rollback_only("insufficient funds")

    def duplicate(tx: Transaction) -> None:
        calls.append("duplicate")
        tx.execute("pg1", f"INSERT INTO {t} VALUES (1, 0)")

    def bug(tx: Transaction) -> None:
        calls.append("bug")
        raise KeyError("a bug")

    with pytest.raises(TransactionRolledBack, match="insufficient funds"):
        tm.run(rollback_only, retries=5, backoff=0)
    with pytest.raises(psycopg.errors.UniqueViolation):
        tm.run(duplicate, retries=5, backoff=0)
    with pytest.raises(KeyError):
        tm.run(bug, retries=5, backoff=0)
    assert calls == ["rollback_only", "duplicate", "bug"]
    assert bank.total() == bank.initial_total
    for bad in ({"retries": -1}, {"retries": 1.5}, {"backoff": -1}, {"max_backoff": 0.01}):
        with pytest.raises(ConfigurationError):
            tm.run(bug, **bad)  # type: ignore[arg-type]
    assert calls == ["rollback_only", "duplicate", "bug"]


def test_an_in_doubt_outcome_is_never_retried(bank: Bank, make_tm: MakeTM) -> None:
    """The one-phase commit of the only branch is interrupted (MariaDB answers 1317): whether
    it committed is unknown, so running the transaction again could apply it twice."""
    tm = make_tm(node_id="doubt", sweeper=False)
    with tm.transaction() as tx:  # the resource is checked
        tx.execute("maria", "SELECT 1")
    cid: list[int] = []
    attempts = 0

    def fn(tx: Transaction) -> None:
        nonlocal attempts
        attempts += 1
        tx.execute("maria", f"UPDATE {bank.table} SET bal = 0 WHERE id = 1")
        cid.append(mysql_connection_id(tx.connection("maria")))

    blocked = CommitsBlocked(bank.urls["maria"])
    try:
        interrupter = threading.Thread(
            target=blocked.interrupt, args=(lambda: cid[0] if cid else None,)
        )
        interrupter.start()
        with pytest.raises(TransactionInDoubt):
            tm.run(fn, retries=5, backoff=0)
        interrupter.join(30)
    finally:
        blocked.close()
    assert attempts == 1


def test_the_rule(bank: Bank, make_tm: MakeTM) -> None:
    """The classification itself (``xatm.transactions.retry.retryable``), on errors made by
    hand, read by a manager's participants."""
    classify = make_tm(node_id="rule", sweeper=False).context.classify

    def retry(e: BaseException) -> bool:
        return retryable(e, classify)

    cause = psycopg.errors.DeadlockDetected("deadlock detected")
    rolled = TransactionRolledBack("x")
    rolled.__cause__ = cause
    assert retry(cause) and retry(rolled)
    assert retry(TransactionTimeout("t"))
    assert not retry(TransactionRolledBack("set_rollback_only() was called"))
    assert not retry(TransactionInDoubt("?"))
    doubt = TransactionInDoubt("?")
    doubt.__cause__ = cause
    assert not retry(doubt)
    assert not retry(FileNotFoundError("x")) and retry(ConnectionResetError("x"))
    assert not retry(KeyboardInterrupt())


def test_asyncio_run_retries_a_real_deadlock(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    t = bank.table

    async def main() -> dict[str, int]:
        attempts = {"a": 0, "b": 0}
        both = asyncio.Barrier(2)
        async with AsyncTransactionManager(
            servers.urls, tmp_path / "log", "aiodl", sweeper=False
        ) as tm:

            def move(name: str, first: int, second: int) -> Any:
                async def fn(tx: AsyncTransaction) -> None:
                    attempts[name] += 1
                    await tx.execute("maria", f"UPDATE {t} SET bal = bal - 1 WHERE id = {first}")
                    if attempts[name] == 1:
                        await both.wait()
                    await tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = {second}")
                    await tx.execute("pg1", "SELECT 1")

                return fn

            await asyncio.gather(
                tm.run(move("a", 1, 2), retries=5, backoff=0.01),
                tm.run(move("b", 2, 1), retries=5, backoff=0.01),
            )
        return attempts

    attempts = asyncio.run(main())
    assert sorted(attempts.values())[1] >= 2
    assert bank.balance("maria", 1) == bank.balance("maria", 2) == 1000


def test_saga_steps_get_a_saga_transaction() -> None:
    assert issubclass(SagaTransaction, Transaction)
    assert SagaTransaction.__annotations__["idempotency_key"] == "str"
