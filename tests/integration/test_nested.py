"""A transaction inside another of the same manager, in the same thread or task, is refused.

xatm does not nest transactions: ``tm.transaction()`` inside the block of another of the same
manager raises TransactionError at once (it would otherwise be an independent transaction
that could wait on its own outer transaction's row locks until its timeout). Another thread
or task may run an independent transaction meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers, saga_defs
from xatm import TransactionError
from xatm.aio import AsyncTransactionManager


def test_nested_is_refused_at_once(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="nest", sweeper=False)
    t = bank.table
    started = time.monotonic()
    with tm.transaction(timeout=60) as outer:
        outer.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 1")  # holds the row
        with (
            pytest.raises(TransactionError, match="does not nest") as raised,
            tm.transaction() as inner,
        ):
            inner.execute("pg1", f"UPDATE {t} SET bal = bal + 1 WHERE id = 1")
        assert raised.value.gtrid == outer.gtrid and outer.gtrid in str(raised.value)
        with pytest.raises(TransactionError, match="does not nest"):
            tm.run(lambda tx: tx.execute("pg1", "SELECT 1"))
        outer.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 1")
    assert time.monotonic() - started < 25  # it never waited on the outer's row lock
    assert outer.state.value == "committed"
    assert bank.balance("pg1", 1) == 999 and bank.balance("maria", 1) == 1001
    with tm.transaction() as after:  # the block is over: a new one is fine
        after.execute("pg1", "SELECT 1")


def test_a_saga_inside_a_transaction_is_refused(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="nests", sweeper=False, sagas=[saga_defs.transfer])
    data = {"table": bank.table, "journal": bank.journal, "tid": "n1", "src": 1, "dst": 2}
    with tm.transaction() as tx:
        tx.execute("pg1", "SELECT 1")
        with pytest.raises(TransactionError, match="does not nest"):
            tm.run_saga("transfer", {**data, "amt": 1})
    assert tm.run_saga("transfer", {**data, "amt": 1}).state == "completed"


def test_another_thread_runs_an_independent_transaction(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="nestt", sweeper=False)
    t = bank.table
    done: list[str] = []

    def other() -> None:
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal + 5 WHERE id = 2")
        done.append(tx.state.value)

    with tm.transaction() as outer:
        outer.execute("pg1", f"UPDATE {t} SET bal = bal - 5 WHERE id = 1")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=60)
    assert done == ["committed"]
    assert bank.balance("pg1", 1) == 995 and bank.balance("pg1", 2) == 1005


def test_two_managers_do_not_refuse_each_other(bank: Bank, make_tm: MakeTM, tmp_path: Path) -> None:
    a = make_tm(node_id="nesta", sweeper=False)
    b = make_tm(node_id="nestb", log=tmp_path / "other-log", sweeper=False)
    with a.transaction() as outer:
        outer.execute("pg1", "SELECT 1")
        with b.transaction() as inner:
            inner.execute("pg2", "SELECT 1")
    assert inner.state.value == "committed"


def test_asyncio_same_task_refused_child_task_independent(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    t = bank.table

    async def main() -> None:
        async with AsyncTransactionManager(
            servers.urls, tmp_path / "log", "nestaio", sweeper=False
        ) as tm:

            async def independent() -> str:
                async with tm.transaction() as tx:
                    await tx.execute("pg1", f"UPDATE {t} SET bal = bal + 7 WHERE id = 3")
                return tx.state.value

            async with tm.transaction(timeout=60) as outer:
                await outer.execute("pg1", f"UPDATE {t} SET bal = bal - 7 WHERE id = 1")
                with pytest.raises(TransactionError, match="does not nest"):
                    async with tm.transaction() as inner:
                        await inner.execute("pg1", f"UPDATE {t} SET bal = 0 WHERE id = 1")
                with (
                    pytest.raises(TransactionError, match="does not nest"),
                    tm.sync.transaction(),  # the threaded side of the same manager
                ):
                    pass
                with pytest.raises(TransactionError, match="does not nest"):
                    await tm.run(lambda tx: tx.execute("pg1", "SELECT 1"))  # type: ignore[arg-type,return-value]
                assert await asyncio.create_task(independent()) == "committed"
            assert outer.state.value == "committed"
            async with tm.transaction() as after:
                await after.execute("pg1", "SELECT 1")

    asyncio.run(main())
    assert bank.balance("pg1", 1) == 993 and bank.balance("pg1", 3) == 1007
