"""One transaction used by several asyncio tasks (``asyncio.gather``) or threads at once, on
real servers: no statement is lost, none runs on a branch that nobody ends, and no
connection is left out of the pools (docs/api.md, "Several tasks in one transaction").

- statements of several tasks on one resource not enlisted yet enlist it once, and run one
  at a time on its one branch; they all commit (or none);
- a commit started while another task's (thread's) statement or enlistment still runs waits
  for it to end, then refuses: everything is rolled back (TransactionRolledBack), since the
  other task's work may not be finished;
- a rollback started meanwhile (the block raised while a sibling task still runs) waits for
  it, then rolls back.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, MakeTM, Servers, run
from xatm import TransactionError, TransactionManager, TransactionRolledBack, TransactionState
from xatm.aio import AsyncTransactionManager

NAMES = ["pg1", "pg2", "maria"]
IDLE = {"pg1": 0, "pg2": 0, "maria": 0}


def manager(servers: Servers, tmp_path: Path, **kwargs: Any) -> AsyncTransactionManager:
    return AsyncTransactionManager(
        servers.urls, tmp_path / "log", "conc", timeout=30, sweeper=False, **kwargs
    )


def sleep_sql(resource: str, seconds: float) -> str:
    function = "pg_sleep" if resource.startswith("pg") else "SLEEP"
    return f"SELECT {function}({seconds})"


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_gather_on_a_resource_not_enlisted_yet_loses_no_write(
    resource: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """The reproduction of issue 17, item 6: two tasks enlist one resource at once, then a
    write on another resource; both writes of the first resource commit, on one branch."""
    other = "pg2"
    t = bank.table

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            async with tm.transaction() as tx:
                await asyncio.gather(
                    tx.execute(resource, f"UPDATE {t} SET bal = bal - 20 WHERE id = 1"),
                    tx.execute(resource, f"UPDATE {t} SET bal = bal + 10 WHERE id = 2"),
                )
                await tx.execute(other, f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")
            assert tx.state is TransactionState.COMMITTED
            assert sorted(tx.branches) == sorted([resource, other])
            assert tm.in_use == IDLE

    asyncio.run(main())
    b = bank.balances()
    assert (b[resource][1], b[resource][2], b[other][1]) == (980, 1010, 1010)
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {n: [] for n in NAMES}


def test_many_tasks_over_every_resource(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    """Twelve tasks, four per resource, gathered in one transaction: every write commits;
    each resource is one branch."""
    t = bank.table

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:

            async def legs(resource: str, sign: int) -> None:
                await tx.execute(resource, f"UPDATE {t} SET bal = bal + %s WHERE id = 3", (sign,))
                cur = await tx.execute(resource, f"SELECT bal FROM {t} WHERE id = 3")
                assert (await cur.fetchone())[0] is not None

            async with tm.transaction() as tx:
                await asyncio.gather(
                    *(legs(r, 1) for r in ["pg1", "pg1", "pg1", "pg1"]),
                    *(legs(r, -1) for r in ["pg2", "maria", "pg2", "maria"]),
                    *(legs(r, 1) for r in ["pg2", "maria", "pg2", "maria"]),
                )
            assert tx.state is TransactionState.COMMITTED
            assert sorted(tx.branches) == sorted(NAMES)
            assert tm.in_use == IDLE

    asyncio.run(main())
    b = bank.balances()
    assert (b["pg1"][3], b["pg2"][3], b["maria"][3]) == (1004, 1000, 1000)
    assert bank.xatm_prepared() == {n: [] for n in NAMES}


@pytest.mark.parametrize("resource", ["pg2", "maria"])
def test_commit_while_another_task_enlists_is_refused(
    resource: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """A task's first statement on ``resource`` is still running (it enlists the resource)
    when the block ends: the commit waits for it and rolls everything back, so that the
    write neither commits alone nor runs on a branch nobody ends."""
    t = bank.table

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            with pytest.raises(TransactionRolledBack, match="still running"):
                async with tm.transaction() as tx:
                    await tx.execute("pg1", f"UPDATE {t} SET bal = bal - 10 WHERE id = 1")
                    late = asyncio.ensure_future(
                        tx.execute(resource, f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")
                    )
                    await asyncio.sleep(0)  # it has begun enlisting
            assert late.done()  # the commit waited for it
            await late  # its statement itself succeeded, and was rolled back
            assert tx.state is TransactionState.ROLLED_BACK
            assert tm.in_use == IDLE

    asyncio.run(main())
    assert bank.balances()["pg1"][1] == 1000
    assert bank.balances()[resource][1] == 1000
    assert bank.xatm_prepared() == {n: [] for n in NAMES}


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_commit_while_another_task_runs_a_statement_is_refused(
    resource: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    t = bank.table

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            with pytest.raises(TransactionRolledBack, match="still running"):
                async with tm.transaction() as tx:
                    await tx.execute(resource, f"UPDATE {t} SET bal = bal - 10 WHERE id = 1")
                    await tx.execute("pg2", f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")
                    slow = asyncio.ensure_future(tx.execute(resource, sleep_sql(resource, 0.3)))
                    await asyncio.sleep(0.05)  # the statement is on the server
            assert slow.done()
            await slow
            assert tm.in_use == IDLE

    asyncio.run(main())
    assert bank.total() == bank.initial_total
    assert bank.balances()[resource][1] == 1000
    assert bank.xatm_prepared() == {n: [] for n in NAMES}


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_block_raising_while_a_sibling_task_runs_waits_and_rolls_back(
    resource: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """``gather`` lets the first error through while the other task still runs: the
    rollback waits for that statement (one statement at a time per connection), then rolls
    every branch back."""
    t = bank.table

    async def fails() -> None:
        await asyncio.sleep(0.05)
        raise ZeroDivisionError

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            with pytest.raises(ZeroDivisionError):
                async with tm.transaction() as tx:
                    await tx.execute(resource, f"UPDATE {t} SET bal = 0 WHERE id = 1")
                    await asyncio.gather(tx.execute(resource, sleep_sql(resource, 0.3)), fails())
            assert tx.state is TransactionState.ROLLED_BACK
            assert tm.in_use == IDLE

    asyncio.run(main())
    assert bank.balances()[resource][1] == 1000
    assert bank.xatm_prepared() == {n: [] for n in NAMES}


def test_work_after_the_end_began_is_refused(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    t = bank.table

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            tx = tm.transaction()
            await tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 1")
            slow = asyncio.ensure_future(tx.execute("pg1", sleep_sql("pg1", 0.3)))
            await asyncio.sleep(0.05)
            ending = asyncio.ensure_future(tx.rollback())
            await asyncio.sleep(0.05)  # the rollback waits for the slow statement
            # refused: it waits for the resource behind the rollback, which has begun
            with pytest.raises(TransactionError, match=r"is ending|is rolled-back"):
                await tx.execute("pg1", f"UPDATE {t} SET bal = 0 WHERE id = 2")
            with pytest.raises(TransactionError, match=r"is ending|is rolled-back"):
                await tx.execute("maria", f"UPDATE {t} SET bal = 0 WHERE id = 2")
            await ending
            await slow
            assert tm.in_use == IDLE

    asyncio.run(main())
    assert bank.balances()["pg1"] == {1: 1000, 2: 1000, 3: 1000, 4: 1000}


# -- the threaded API: a Transaction shared by two threads -------------------------------------


def open_work(bank: Bank) -> dict[str, int]:
    """Transactions left open on each server (a branch nobody ended holds one)."""
    out = {}
    for name in NAMES:
        if name.startswith("pg"):
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'xatm'"
                " AND state LIKE 'idle in transaction%%'"
            )
        else:
            sql = "SELECT count(*) FROM information_schema.innodb_trx"
        out[name] = int(run(bank.conns[name], sql)[0][0])
    return out


class Rendezvous:
    """Makes two threads meet in ``begin`` (a branch being enlisted) if they can: with
    enlistment serialised the second never gets there while the first waits, so the wait
    gives up after a while and the first goes on alone."""

    def __init__(self, tm: TransactionManager, resource: str, monkeypatch: pytest.MonkeyPatch):
        participant = tm.context.resources.participants[resource]
        real = participant.begin
        self.barrier = threading.Barrier(2)
        self.met = False

        def begin(conn: Any, xid: Any, timeout: float | None = None) -> None:
            try:
                self.barrier.wait(timeout=1.0)
                self.met = True
            except threading.BrokenBarrierError:
                pass
            real(conn, xid, timeout)

        monkeypatch.setattr(participant, "begin", begin)


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_two_threads_enlisting_one_resource_lose_no_write(
    resource: str, bank: Bank, make_tm: MakeTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    tm = make_tm(sweeper=False)
    meet = Rendezvous(tm, resource, monkeypatch)
    t = bank.table
    errors: list[BaseException] = []
    with tm.transaction() as tx:

        def leg(account: int, delta: int) -> None:
            try:
                sql = f"UPDATE {t} SET bal = bal + %s WHERE id = %s"
                tx.execute(resource, sql, (delta, account))
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=leg, args=(1, -20)),
            threading.Thread(target=leg, args=(2, 10)),
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        tx.execute("pg2", f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")
    b = bank.balances()
    assert (b[resource][1], b[resource][2], b["pg2"][1]) == (980, 1010, 1010)
    assert bank.total() == bank.initial_total
    assert open_work(bank) == {n: 0 for n in NAMES}
    assert errors == []
    assert tx.state is TransactionState.COMMITTED
    assert bank.xatm_prepared() == {n: [] for n in NAMES}
    assert not meet.met  # enlistment is serialised: the second thread found the branch


def test_commit_while_another_thread_runs_a_statement_is_refused(
    bank: Bank, make_tm: MakeTM
) -> None:
    tm = make_tm(sweeper=False)
    t = bank.table
    tx = tm.transaction()
    tx.execute("pg1", f"UPDATE {t} SET bal = bal - 10 WHERE id = 1")
    tx.execute("maria", f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")
    started = threading.Event()
    done: list[object] = []

    def slow() -> None:
        started.set()
        done.append(tx.execute("maria", "SELECT SLEEP(0.3)"))

    th = threading.Thread(target=slow)
    th.start()
    started.wait()
    threading.Event().wait(0.05)  # the statement is on the server
    with pytest.raises(TransactionRolledBack, match="still running"):
        tx.commit()
    th.join()
    assert done  # the statement itself finished, before the rollback
    assert tx.state is TransactionState.ROLLED_BACK
    assert bank.total() == bank.initial_total
    assert bank.balances()["maria"][1] == 1000
    assert bank.xatm_prepared() == {n: [] for n in NAMES}
    assert open_work(bank) == {n: 0 for n in NAMES}
