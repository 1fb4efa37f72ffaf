"""Connections cut and servers killed in the middle of the protocol, inside one process.

Once the COMMIT decision is durable the transaction is committed: a branch that cannot be
committed right then (connection cut, server down) does not make the block raise; recovery
finishes it. Before the decision, any such failure rolls everything back.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Bank, MakeTM, Servers, connect, mysql_connection_id, run
from xatm import BranchState, TransactionRolledBack, TransactionState


def cut_pg(bank: Bank, tx: object, resource: str) -> Callable[[], None]:
    pid = tx.connection(resource).info.backend_pid  # type: ignore[attr-defined]

    def action() -> None:
        run(bank.conns[resource], "SELECT pg_terminate_backend(%s)", (pid,))

    return action


def cut_maria(bank: Bank, tx: object) -> Callable[[], None]:
    conn_id = mysql_connection_id(tx.connection("maria"))  # type: ignore[attr-defined]

    def action() -> None:
        run(bank.conns["maria"], f"KILL CONNECTION {int(conn_id)}")

    return action


def move(tx: object, bank: Bank, src: str, dst: str, tid: str) -> None:
    tx.execute(src, f"UPDATE {bank.table} SET bal = bal - 10 WHERE id = 1")  # type: ignore[attr-defined]
    tx.execute(dst, f"UPDATE {bank.table} SET bal = bal + 10 WHERE id = 1")  # type: ignore[attr-defined]
    for r in (src, dst):
        tx.execute(r, f"INSERT INTO {bank.journal} VALUES (%s)", (tid,))  # type: ignore[attr-defined]


@pytest.mark.parametrize("victim", ["pg1", "maria"])
def test_connection_cut_after_decision_is_finished_by_recovery(
    victim: str, bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    tm = make_tm()
    with tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "cut-1")
        at_step["after_decision"] = (
            cut_pg(bank, tx, "pg1") if victim == "pg1" else cut_maria(bank, tx)
        )
    # the block did not raise: the transaction is committed
    assert tx.state is TransactionState.COMMITTED
    assert tx.pending_branches == [victim]
    assert tx.branches[victim] is BranchState.UNKNOWN
    assert len(bank.xatm_prepared()[victim]) == 1
    report = tm.recover()
    assert report.committed == 1 and report.in_doubt == 0 and report.ended == 1
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"cut-1"}
    assert bank.total() == bank.initial_total
    # the pool dropped the dead connection: the next transaction works
    with tm.transaction() as tx2:
        move(tx2, bank, "maria", "pg1", "cut-2")
    assert bank.journal_ids()["maria"] == {"cut-1", "cut-2"}


@pytest.mark.parametrize("victim", ["pg2", "maria"])
def test_connection_cut_before_prepare_rolls_back(
    victim: str, bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    tm = make_tm()
    with pytest.raises(TransactionRolledBack) as info, tm.transaction() as tx:
        move(tx, bank, "pg2", "maria", "cut-3")
        at_step["before_prepare"] = (
            cut_pg(bank, tx, "pg2") if victim == "pg2" else cut_maria(bank, tx)
        )
    assert info.value.__cause__ is not None
    tm.recover()
    assert bank.total() == bank.initial_total
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_participant_killed_after_decision_and_restarted(
    servers: Servers, bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not killed")
    maria = servers.set.maria
    tm = make_tm()
    with tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "kill-1")
        at_step["after_decision"] = maria.kill
    assert tx.state is TransactionState.COMMITTED
    assert tx.pending_branches == ["maria"]
    down = tm.recover()  # maria is down: skipped, pg1's branch is already committed
    assert down.unreachable == ("maria",)
    maria.restart()
    bank.reconnect("maria")
    assert len(bank.xatm_prepared()["maria"]) == 1  # the prepared XA survived the crash
    report = tm.recover()
    assert report.committed == 1 and report.unreachable == ()
    assert bank.journal_ids()["maria"] == {"kill-1"}
    assert bank.total() == bank.initial_total
    with tm.transaction() as tx2:  # the manager works on after the restart
        move(tx2, bank, "maria", "pg1", "kill-2")
    assert bank.journal_ids()["pg1"] == {"kill-1", "kill-2"}


def test_postgres_killed_between_transactions(
    servers: Servers, bank: Bank, make_tm: MakeTM
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not killed")
    tm = make_tm()
    with tm.transaction() as tx:
        move(tx, bank, "pg2", "maria", "k-1")
    servers.set.pg2.kill()
    servers.set.pg2.restart()
    bank.reconnect("pg2")
    with tm.transaction() as tx:  # the pooled connection is dead: a fresh one is used
        move(tx, bank, "pg2", "maria", "k-2")
    assert bank.journal_ids()["pg2"] == {"k-1", "k-2"}
    conn = connect(bank.urls["pg2"])
    conn.close()
