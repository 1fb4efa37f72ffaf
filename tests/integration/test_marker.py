"""The commit-marker fast path: the decision row committed inside one participant."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.support import Bank, MakeTM, run
from xatm import BranchState, TransactionManager, TransactionRolledBack, TransactionState
from xatm.core.participant import Participant
from xatm.participants.adapters import make_participant


def move(tx: object, bank: Bank, src: str, dst: str, tid: str) -> None:
    t, j = bank.table, bank.journal
    tx.execute(src, f"UPDATE {t} SET bal = bal - 10 WHERE id = 1")  # type: ignore[attr-defined]
    tx.execute(dst, f"UPDATE {t} SET bal = bal + 10 WHERE id = 1")  # type: ignore[attr-defined]
    for r in (src, dst):
        tx.execute(r, f"INSERT INTO {j} VALUES (%s)", (tid,))  # type: ignore[attr-defined]


def decision_rows(bank: Bank, resource: str) -> set[str]:
    return {r[0] for r in run(bank.conns[resource], "SELECT gtrid FROM xatm_decisions")}


@pytest.mark.parametrize("marker", ["pg1", "maria"])
def test_commit_with_marker_writes_no_log_and_one_decision_row(
    marker: str, bank: Bank, make_tm: MakeTM
) -> None:
    tm = make_tm(commit_markers=[marker])
    forced = tm._ctx.log.forced_records  # type: ignore[attr-defined]
    with tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "m-1")
    assert tx.state is TransactionState.COMMITTED
    assert set(tx.branches.values()) == {BranchState.COMMITTED}
    assert tm._ctx.log.forced_records == forced  # type: ignore[attr-defined]
    assert tx.gtrid in decision_rows(bank, marker)
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"m-1"}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_marker_rows_are_deleted_in_batches(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(commit_markers=["pg1"])
    with tm.transaction() as tx:  # creates the marker table if this is its first use
        move(tx, bank, "pg1", "maria", "b-first")
    before = decision_rows(bank, "pg1")
    gtrids = []
    for i in range(80):
        with tm.transaction() as tx:
            move(tx, bank, "pg1", "maria", f"b-{i}")
        gtrids.append(tx.gtrid)
    left = decision_rows(bank, "pg1") - before
    assert len(left) < 80  # the first batches were deleted by later marker transactions
    assert set(gtrids[-10:]) <= left
    assert bank.total() == bank.initial_total


def test_marker_rollback_on_no_vote(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(commit_markers=["maria"])
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "m-no")
        tx.execute("pg2", "CREATE TEMP TABLE scratch (x int)")
        tx.execute("pg2", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 2")
    assert tx.gtrid not in decision_rows(bank, "maria")
    assert bank.total() == bank.initial_total
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_marker_branch_failing_rolls_back_the_prepared_ones(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(commit_markers=["pg1"])
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "m-dup")
        # the decision row's key is taken: the marker branch's commit fails
        run(bank.conns["pg1"], "INSERT INTO xatm_decisions VALUES (%s, '{}', 0)", (tx.gtrid,))
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    run(bank.conns["pg1"], "DELETE FROM xatm_decisions WHERE gtrid = %s", (tx.gtrid,))


def test_commit_marker_from_toml(bank: Bank, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "xatm.toml"
    path.write_text(
        'node_id = "toml"\nlog = "log"\n'
        f'[resources.pg1]\nurl = "{bank.urls["pg1"]}"\ncommit_marker = true\n'
        f'[resources.maria]\nurl = "{bank.urls["maria"]}"\n'
    )
    with TransactionManager.from_config(path) as tm:
        assert tm.commit_markers == frozenset({"pg1"})
        with tm.transaction() as tx:
            move(tx, bank, "pg1", "maria", "toml-1")
        assert tx.gtrid in decision_rows(bank, "pg1")


def test_recoverys_fence_beats_a_late_decision_row(
    bank: Bank, make_tm: MakeTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery's probe commits an abort row when it finds no decision: a decision row that
    arrives later (statements of a coordinator that died with them in flight) loses."""
    import xatm.core.failpoint
    from xatm.recovery import markers as _marker_recovery

    tm = make_tm(commit_markers=["pg1"], sweeper=False)
    probes: list[str] = []

    def hit(name: str) -> None:
        if name == "after_prepare":
            participant, _ = tm._ctx.resources.get("pg1")
            probes.append(_marker_recovery.probe_row(participant, tx.gtrid))

    monkeypatch.setattr(xatm.core.failpoint, "hit", hit)
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "late-1")
    assert probes == ["no-row"]
    assert tx.gtrid in decision_rows(bank, "pg1")  # the fence, not a decision
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    assert tm.recover().committed == 0
    participant, _ = tm._ctx.resources.get("pg1")
    assert _marker_recovery.probe_row(participant, tx.gtrid, fence=False) == "no-row"


def test_marker_connection_lost_at_commit_is_in_doubt_then_settled(
    bank: Bank, make_tm: MakeTM, at_step: dict[str, object]
) -> None:
    from xatm import TransactionInDoubt

    tm = make_tm(commit_markers=["pg1"], sweeper=False)
    with pytest.raises(TransactionInDoubt), tm.transaction() as tx:
        move(tx, bank, "pg1", "maria", "lost-1")
        pid = tx.connection("pg1").info.backend_pid
        at_step["after_prepare"] = lambda: run(
            bank.conns["pg1"], "SELECT pg_terminate_backend(%s)", (pid,)
        )
    assert tx.state.value == "in-doubt"
    report = tm.recover()  # no decision row (the commit never ran): maria is rolled back
    assert report.rolled_back == 1 and report.committed == 0
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_sessions_creating_a_table_at_the_same_moment_all_succeed(
    resource: str, bank: Bank, make_tm: MakeTM
) -> None:
    """A fresh deployment whose threads all open their first connection at once: each one
    creates the commit-marker table (or the saga barrier table). PostgreSQL's ``IF NOT
    EXISTS`` is checked before its catalog insert, so the sessions that lose the race failed
    on the catalog's unique index: their callers' first transactions failed with
    ResourceNotFit (seen in a benchmark run). Every session must succeed."""
    participant = make_participant(resource, make_tm().resources[resource])
    conns = [participant.connect() for _ in range(8)]
    try:
        for attempt in range(4):
            table = f"xatm_race_{attempt}"
            ddl = f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, v text)"
            errors = _create_at_once(participant, conns, ddl)
            assert errors == []
            assert participant.table_exists(conns[0], table)
            participant.execute(conns[0], f"DROP TABLE {table}").close()
    finally:
        for conn in conns:
            participant.close(conn)


def _create_at_once(participant: Participant, conns: list[Any], ddl: str) -> list[BaseException]:
    """``ddl`` run by ``create_table`` on every connection at the same moment; what failed."""
    gate = threading.Barrier(len(conns))
    errors: list[BaseException] = []

    def create(conn: Any) -> None:
        gate.wait()
        try:
            participant.create_table(conn, ddl)
        except BaseException as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=create, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
