"""The shared log's sessions cut while the coordinator lives on (its database restarted, an
administrator or an idle timeout ended them), on real servers: the cut is found before the
next decision is sent, so the transactions after it commit, none of them in doubt, and the
books balance."""

from __future__ import annotations

import time

import psycopg

from tests.support import Bank, MakeTM


def _end_sessions(url: str, pids: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_transactions_after_the_logs_sessions_were_cut_commit_not_in_doubt(
    make_tm: MakeTM, bank: Bank, log_url: str
) -> None:
    tm = make_tm("logcut", log=log_url, sweeper=False)
    log = tm.shared_log
    assert log is not None

    def transfer() -> None:
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")

    transfer()
    assert not tm.indoubt().transactions
    for _ in range(2):  # twice: the sessions that replaced the cut ones are cut in turn
        _end_sessions(log_url, [log._writer.info.backend_pid, log._reader_conn.info.backend_pid])
        for _ in range(3):
            transfer()  # TransactionInDoubt if the COMMIT row went to the dead session
        assert not tm.indoubt().transactions
    assert bank.balance("pg1") == 1000 - 7 and bank.balance("maria") == 1000 + 7
    assert bank.total() == bank.initial_total
    assert bank.prepared() == {name: [] for name in bank.conns}
