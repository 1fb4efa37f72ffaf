"""Closing a manager with transactions in flight drains them (sync and asyncio alike).

``close()`` begins no new transaction, waits for the running ones up to a bound, and rolls
back those still running then with an error that says the manager was closed: never "the
commit decision could not be logged" from a log closed under a transaction.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers
from xatm import TransactionError, TransactionRolledBack, XatmError
from xatm.aio import AsyncTransactionManager


def test_close_waits_for_transactions_in_flight(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="drain1", sweeper=False)
    t = bank.table
    release = threading.Event()
    enlisted = threading.Event()
    outcome: list[str] = []

    def transfer() -> None:
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal - 3 WHERE id = 1")
            tx.execute("maria", f"UPDATE {t} SET bal = bal + 3 WHERE id = 1")
            enlisted.set()
            release.wait(30)
        outcome.append(tx.state.value)

    worker = threading.Thread(target=transfer)
    worker.start()
    assert enlisted.wait(30)
    unused = tm.transaction()  # made before the close, no branch yet
    threading.Timer(0.3, release.set).start()
    tm.close(drain=30)  # returns once the transfer is over
    worker.join(30)
    assert outcome == ["committed"]
    assert bank.balance("pg1", 1) == 997 and bank.balance("maria", 1) == 1003
    with pytest.raises(XatmError, match="closed"):
        tm.transaction()
    with pytest.raises(TransactionError, match="manager was closed"), unused:
        unused.execute("pg1", "SELECT 1")


def test_past_the_bound_the_rest_roll_back_saying_so(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="drain2", sweeper=False)
    t = bank.table
    release = threading.Event()
    ready = threading.Barrier(3)
    errors: dict[str, BaseException] = {}

    def run(name: str, more: bool) -> None:
        try:
            with tm.transaction() as tx:
                tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = %s", (int(more) + 2,))
                tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = %s", (int(more) + 2,))
                ready.wait(30)
                release.wait(30)
                if more:  # goes on working after the close gave up on it
                    tx.execute("pg2", "SELECT 1")
        except BaseException as e:
            errors[name] = e

    threads = [threading.Thread(target=run, args=(n, n == "more")) for n in ("ends", "more")]
    for th in threads:
        th.start()
    ready.wait(30)
    started = time.monotonic()
    tm.close(drain=0.5)
    assert time.monotonic() - started < 20  # the bound, not the transactions, ended the wait
    release.set()
    for th in threads:
        th.join(30)
    assert isinstance(errors["ends"], TransactionRolledBack)
    assert "manager was closed" in str(errors["ends"])
    assert isinstance(errors["more"], TransactionError)
    assert "manager was closed" in str(errors["more"])
    for e in errors.values():
        assert "could not be logged" not in str(e)
    assert bank.total() == bank.initial_total
    assert bank.balance("pg1", 2) == bank.balance("pg1", 3) == 1000


def test_closing_inside_a_transaction_does_not_wait_for_it(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="drain3", sweeper=False)
    started = time.monotonic()
    with pytest.raises(TransactionRolledBack, match="manager was closed"), tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = 0 WHERE id = 4")
        tm.close()  # the manager's timeout is 30 s: it did not wait for its own caller
    assert time.monotonic() - started < 20
    assert bank.balance("pg1", 4) == 1000


def test_asyncio_close_drains_too(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    t = bank.table

    async def main() -> dict[str, object]:
        tm = AsyncTransactionManager(servers.urls, tmp_path / "log", "drain4", sweeper=False)
        await tm.open()
        release = asyncio.Event()
        enlisted = {"quick": asyncio.Event(), "slow": asyncio.Event()}
        results: dict[str, object] = {}

        async def transfer(name: str, account: int, hold: bool) -> None:
            try:
                async with tm.transaction() as tx:
                    await tx.execute("pg1", f"UPDATE {t} SET bal = bal - 2 WHERE id = {account}")
                    await tx.execute("maria", f"UPDATE {t} SET bal = bal + 2 WHERE id = {account}")
                    enlisted[name].set()
                    await (release.wait() if hold else asyncio.sleep(0.3))
                results[name] = tx.state.value
            except BaseException as e:
                results[name] = e

        slow = asyncio.create_task(transfer("slow", 2, True))
        await enlisted["slow"].wait()
        quick = asyncio.create_task(transfer("quick", 1, False))
        await enlisted["quick"].wait()
        await tm.close(drain=2)
        release.set()
        await asyncio.gather(quick, slow)
        with pytest.raises(XatmError, match="closed"):
            tm.transaction()
        return results

    results = asyncio.run(main())
    assert results["quick"] == "committed"
    slow = results["slow"]
    assert isinstance(slow, TransactionRolledBack), slow
    assert "manager was closed" in str(slow) and "could not be logged" not in str(slow)
    assert bank.balance("pg1", 1) == 998 and bank.balance("maria", 1) == 1002
    assert bank.balance("pg1", 2) == 1000 and bank.balance("maria", 2) == 1000
