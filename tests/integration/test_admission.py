"""``max_active``: at most that many transactions of a manager in their block at once, on
real servers. The others wait their turn at the start of their block; one whose timeout
passes first is refused with TransactionTimeout, having begun nothing; a slot is given back
however the block ends."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import Bank, MakeTM, Servers
from xatm import ConfigurationError, TransactionTimeout
from xatm.aio import AsyncTransactionManager


def transfer(tx: object, bank: Bank, amount: int = 1) -> None:
    tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - %s WHERE id = 1", (amount,))  # type: ignore[attr-defined]
    tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + %s WHERE id = 1", (amount,))  # type: ignore[attr-defined]


class Holder:
    """A thread inside a transaction's block (a transfer done) until ``release`` is set."""

    def __init__(self, tm: object, bank: Bank) -> None:
        self.release = threading.Event()
        holding = threading.Event()

        def hold() -> None:
            with tm.transaction() as tx:  # type: ignore[attr-defined]
                transfer(tx, bank)
                holding.set()
                self.release.wait(30)

        self.thread = threading.Thread(target=hold)
        self.thread.start()
        assert holding.wait(30)

    def let_go(self) -> None:
        self.release.set()
        self.thread.join(30)


def test_no_more_than_max_active_transactions_are_in_their_block(
    make_tm: MakeTM, bank: Bank
) -> None:
    tm = make_tm("gated", max_active=2, sweeper=False)
    inside = peak = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(account: int) -> None:
        nonlocal inside, peak
        try:
            for _ in range(3):
                with tm.transaction() as tx:
                    with lock:
                        inside += 1
                        peak = max(peak, inside)
                    tx.execute(
                        "pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = %s", (account,)
                    )
                    time.sleep(0.05)  # the block takes a while: the others must wait
                    tx.execute(
                        "maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = %s", (account,)
                    )
                    with lock:
                        inside -= 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(1 + i % 4,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert peak == 2
    assert tm.context.admission.active == tm.context.admission.waiting == 0
    balances = bank.balances()
    assert sum(balances["pg1"].values()) == 4 * 1000 - 18
    assert sum(balances["maria"].values()) == 4 * 1000 + 18
    assert bank.total() == bank.initial_total
    assert bank.prepared() == {name: [] for name in bank.conns}


def test_a_transaction_that_waits_past_its_timeout_is_refused_having_begun_nothing(
    make_tm: MakeTM, bank: Bank
) -> None:
    tm = make_tm("gated1", max_active=1, sweeper=False)
    holder = Holder(tm, bank)
    started = time.monotonic()
    with (
        pytest.raises(TransactionTimeout, match="waiting for its turn: max_active=1"),
        tm.transaction(timeout=0.3) as tx,
    ):
        transfer(tx, bank)  # never reached
    assert time.monotonic() - started < 10  # bounded by its timeout, not by the holder
    holder.let_go()
    assert bank.balance("pg1") == 999 and bank.balance("maria") == 1001
    # nothing was left behind: this thread begins and commits the next one at once
    with tm.transaction() as tx:
        transfer(tx, bank)
    assert bank.balance("pg1") == 998 and bank.balance("maria") == 1002
    assert tm.context.admission.active == tm.context.admission.waiting == 0


def test_a_block_that_raises_or_rolls_back_gives_its_slot_back(make_tm: MakeTM, bank: Bank) -> None:
    tm = make_tm("gated2", max_active=1, sweeper=False, timeout=5)
    with pytest.raises(ZeroDivisionError), tm.transaction() as tx:
        transfer(tx, bank)
        1 / 0  # noqa: B018
    with tm.transaction() as tx:
        transfer(tx, bank)
        tx.rollback()
    with tm.transaction(timeout=1) as tx:  # the slot is free: no wait for a timeout
        transfer(tx, bank)
    assert bank.balance("pg1") == 999 and bank.balance("maria") == 1001
    assert tm.context.admission.active == 0


@pytest.mark.parametrize("bad", [0, -1, "8", True, 2.5])
def test_a_bad_max_active_is_refused(make_tm: MakeTM, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="max_active"):
        make_tm("gatedbad", max_active=bad, sweeper=False)


def test_the_asyncio_manager_refuses_max_active(servers: Servers, tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match=r"asyncio\.Semaphore"):
        AsyncTransactionManager(servers.urls, str(tmp_path), "gatedaio", max_active=4)


def test_the_waiting_transactions_are_a_gauge(make_tm: MakeTM, bank: Bank) -> None:
    from prometheus_client import CollectorRegistry

    import xatm.prometheus

    tm = make_tm("gatedmetrics", max_active=1, sweeper=False)
    own = CollectorRegistry()
    xatm.prometheus.install(own)

    def waiting() -> float | None:
        return own.get_sample_value("xatm_transactions_waiting_turn", {"node": "gatedmetrics"})

    def waiter() -> None:
        with tm.transaction() as tx:
            transfer(tx, bank)

    holder: Holder | None = None
    try:
        assert waiting() == 0
        holder = Holder(tm, bank)
        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 10
        while tm.context.admission.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting() == 1
        holder.let_go()
        thread.join(30)
        assert waiting() == 0
        assert bank.balance("pg1") == 998 and bank.balance("maria") == 1002
    finally:
        if holder is not None:
            holder.let_go()
        xatm.prometheus.uninstall(own)
