"""Sagas on real servers: the contract, keys, retries, compensation, each barrier case."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import Bank, MakeTM, connect, run, saga_defs
from xatm import ConfigurationError, Saga, SagaAbort, Transaction, TransactionManager
from xatm.admin import SagaRefused
from xatm.sagas import barrier as _barrier


def payload(bank: Bank, tid: str, **extra: Any) -> dict[str, Any]:
    return {
        "table": bank.table,
        "journal": bank.journal,
        "tid": tid,
        "src": 1,
        "dst": 2,
        "amt": 5,
        **extra,
    }


def journal(bank: Bank, tid: str) -> dict[str, set[str]]:
    return {
        name: {t.split("-", 1)[1] for t in ids if t.startswith(tid + "-")}
        for name, ids in bank.journal_ids().items()
    }


@pytest.fixture
def saga_tm(make_tm: MakeTM) -> TransactionManager:
    return make_tm(sweeper=False, sagas=[saga_defs.transfer, saga_defs.both])


def test_a_saga_completes(saga_tm: TransactionManager, bank: Bank) -> None:
    result = saga_tm.run_saga("transfer", data=payload(bank, "ok"), key="req-ok")
    assert result.state == "completed"
    assert result.saga_id.startswith("transfer.")
    assert result.done == ("debit", "credit", "finish")
    b = bank.balances()
    assert (b["pg1"][1], b["maria"][2]) == (995, 1005)
    assert journal(bank, "ok") == {"pg1": {"debit", "finish"}, "pg2": set(), "maria": {"credit"}}
    record = saga_tm.saga(result.saga_id)
    assert record is not None and record.state == "completed" and record.key == "req-ok"
    actions = [e.action for e in saga_tm.sagas.history(result.saga_id)]
    assert actions[0] == "saga-start" and actions[-1] == "saga-end"
    assert actions.count("saga-action") == 3


def test_an_abort_compensates_in_reverse(saga_tm: TransactionManager, bank: Bank) -> None:
    result = saga_tm.run_saga("transfer", data=payload(bank, "ab", abort=True), key="req-ab")
    assert result.state == "compensated"
    assert "aborted" in result.error
    assert result.compensated == ("finish", "credit", "debit")
    assert bank.total() == bank.initial_total
    b = bank.balances()
    assert (b["pg1"][1], b["maria"][2]) == (1000, 1000)
    assert journal(bank, "ab") == {
        "pg1": {"debit", "refund"},
        "pg2": set(),
        "maria": {"credit", "uncredit"},
    }


def test_a_step_over_two_databases_is_one_xa_transaction(
    saga_tm: TransactionManager, bank: Bank
) -> None:
    done = saga_tm.run_saga("both", data=payload(bank, "x1"))
    assert done.state == "completed"
    assert journal(bank, "x1")["maria"] == {"credit"}
    undone = saga_tm.run_saga("both", data=payload(bank, "x2", abort=True))
    assert undone.state == "compensated"
    assert bank.balances()["pg1"][1] == 995 and bank.balances()["maria"][2] == 1005
    assert bank.total() == bank.initial_total


def test_the_same_key_twice_runs_once(
    saga_tm: TransactionManager, make_tm: MakeTM, bank: Bank
) -> None:
    first = saga_tm.run_saga("transfer", data=payload(bank, "k"), key="req-k")
    again = saga_tm.run_saga("transfer", data=payload(bank, "k"), key="req-k")
    assert again.saga_id == first.saga_id and again.state == "completed"
    # from another process sharing the log (another node), too
    other = make_tm(node_id="other", sweeper=False, sagas=[saga_defs.transfer])
    third = other.run_saga("transfer", data=payload(bank, "k"), key="req-k")
    assert third.saga_id == first.saga_id
    assert bank.balances()["pg1"][1] == 995
    aborted = saga_tm.run_saga("transfer", data=payload(bank, "ka", abort=True), key="req-ka")
    assert saga_tm.run_saga("transfer", data={}, key="req-ka").state == aborted.state


def test_concurrent_runs_of_one_key_apply_once(saga_tm: TransactionManager, bank: Bank) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            r = saga_tm.run_saga("transfer", data=payload(bank, "cc"), key="req-cc")
            results.append(r.saga_id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert bank.balances()["pg1"][1] == 995


def test_bad_input_is_a_clear_error(saga_tm: TransactionManager, make_tm: MakeTM) -> None:
    with pytest.raises(ConfigurationError, match="unknown saga"):
        saga_tm.run_saga("nope", data={})
    with pytest.raises(ConfigurationError, match="JSON"):
        saga_tm.run_saga("transfer", data={"x": object()})
    with pytest.raises(ConfigurationError, match="unknown resource"):
        make_tm(node_id="bad", sagas=[Saga("s").step("a", action=print, resources=["nowhere"])])
    with pytest.raises(ConfigurationError, match="step name"):
        Saga("s").step("bad name", action=print, resources=["pg1"])


def test_a_step_writing_outside_its_resources_is_refused(make_tm: MakeTM, bank: Bank) -> None:
    sneaky = Saga("sneaky").step(
        "a", action=saga_defs.credit, compensation=saga_defs.uncredit, resources=["pg1"]
    )
    tm = make_tm(sweeper=False, sagas=[sneaky])
    result = tm.run_saga("sneaky", data=payload(bank, "sn"))
    assert result.state == "compensated"
    assert "does not name" in result.error
    assert bank.total() == bank.initial_total


def test_transient_errors_are_retried(make_tm: MakeTM, bank: Bank) -> None:
    """A lock timeout (a real one: another session holds the row) is retried."""
    holder = connect(bank.urls["pg1"])
    run(holder, "BEGIN")
    run(holder, f"SELECT * FROM {bank.table} WHERE id = 1 FOR UPDATE")
    calls = []

    def debit(tx: Any, d: dict[str, Any]) -> None:
        calls.append(1)
        if len(calls) == 2:
            run(holder, "ROLLBACK")  # the lock goes away before the second attempt
        tx.execute("pg1", "SET LOCAL lock_timeout = '100ms'")
        saga_defs.debit(tx, d)

    saga = Saga("retry", backoff=0.01).step("debit", action=debit, resources=["pg1"])
    tm = make_tm(sweeper=False, sagas=[saga])
    try:
        result = tm.run_saga("retry", data=payload(bank, "rt"))
    finally:
        holder.close()
    assert result.state == "completed"
    assert len(calls) == 2
    assert bank.balances()["pg1"][1] == 995
    assert "attempt 1 failed; retrying" in [e.outcome for e in tm.sagas.history(result.saga_id)]


def test_a_failing_compensation_leaves_the_saga_stuck_for_an_operator(
    make_tm: MakeTM, bank: Bank
) -> None:
    broken = {"yes": True}

    def refund(tx: Any, d: dict[str, Any]) -> None:
        if broken["yes"]:
            raise RuntimeError("the refund service is down")
        saga_defs.refund(tx, d)

    saga = Saga("stuck", compensation_attempts=2, backoff=0.01)
    saga.step("debit", action=saga_defs.debit, compensation=refund, resources=["pg1"])
    saga.step("finish", action=saga_defs.finish, resources=["pg1"])
    tm = make_tm(sweeper=False, sagas=[saga])
    result = tm.run_saga("stuck", data=payload(bank, "st", abort=True))
    assert result.state == "failed" and result.stuck
    assert "refund service is down" in result.error
    record = tm.saga(result.saga_id)
    assert record is not None and record.state == "compensating" and record.stuck
    assert bank.balances()["pg1"][1] == 995  # not silently dropped: it is still owed
    with pytest.raises(SagaRefused, match="already compensating"):
        tm.saga_action(result.saga_id, "abort")
    broken["yes"] = False
    fixed = tm.saga_action(result.saga_id, "retry", actor="cli:test")
    assert fixed.state == "compensated"
    assert bank.balances()["pg1"][1] == 1000
    with pytest.raises(SagaRefused, match="already compensated"):
        tm.saga_action(result.saga_id, "retry")


# -- the barrier, case by case ----------------------------------------------------------------
@pytest.mark.parametrize("step_tx", [False, True], ids=["plain", "riding"])
@pytest.mark.parametrize("resource", ["pg1", "maria"])
def test_barrier_duplicate_empty_compensation_and_hanging(
    make_tm: MakeTM, bank: Bank, resource: str, step_tx: bool
) -> None:
    """The barrier's cases, in a plain transaction (the rows inserted with parameters) and
    in a saga step's (the action's row in the round trip of the branch's begin)."""
    tm = make_tm(sweeper=False)
    _barrier.ensure_table(resource, tm.resources[resource])
    kinds = [(resource, _barrier.kind_of(tm.resources[resource]))]
    tag = f"{resource}-{'riding' if step_tx else 'plain'}"  # the rows outlive the test

    def transaction() -> Transaction:
        return tm._saga_transaction("k") if step_tx else tm.transaction()

    def action(saga_id: str) -> str:
        with transaction() as tx:
            return _barrier.enter_action(tx, kinds, saga_id, "s")

    def compensation(saga_id: str) -> str:
        with transaction() as tx:
            return _barrier.enter_compensation(tx, kinds, saga_id, "s")

    # duplicate: the action a second time (an answer lost, recovery re-running it)
    assert action(f"dup-{tag}") == "run"
    assert action(f"dup-{tag}") == "duplicate"
    assert compensation(f"dup-{tag}") == "run"
    assert compensation(f"dup-{tag}") == "duplicate"
    # empty compensation: the action never committed ...
    assert compensation(f"empty-{tag}") == "empty"
    # ... and its row blocks the action arriving late (hanging)
    assert action(f"empty-{tag}") == "hanging"
    assert compensation(f"empty-{tag}") == "duplicate"
    # a rolled-back step leaves no row: it runs again later
    with pytest.raises(SagaAbort), transaction() as tx:
        _barrier.enter_action(tx, kinds, f"rb-{tag}", "s")
        raise SagaAbort("no")
    assert action(f"rb-{tag}") == "run"
    # after a duplicate, the step's transaction is sound: it can still work and commit
    with transaction() as tx:
        assert _barrier.enter_action(tx, kinds, f"rb-{tag}", "s") == "duplicate"
        tx.execute(resource, f"UPDATE {bank.table} SET bal = bal WHERE id = 1")


def test_barrier_makes_a_retried_committed_step_a_no_op(make_tm: MakeTM, bank: Bank) -> None:
    """An action whose transaction committed but whose answer was lost (simulated: the
    step is run again by hand with the same saga id) does not apply twice."""
    tm = make_tm(sweeper=False, sagas=[saga_defs.transfer])
    first = tm.run_saga("transfer", data=payload(bank, "lost"))
    kinds = [("pg1", "postgresql")]
    with tm.transaction() as tx:
        assert _barrier.enter_action(tx, kinds, first.saga_id, "debit") == "duplicate"
    assert bank.balances()["pg1"][1] == 995


def test_a_late_action_after_its_compensation_is_blocked(make_tm: MakeTM, bank: Bank) -> None:
    """Hanging, through the runner: the step's compensation ran first (as when a recoverer
    compensates while a stalled action is still on its way); the action is then skipped and
    the saga compensates instead of going on."""
    tm = make_tm(sweeper=False, sagas=[saga_defs.transfer])
    d = payload(bank, "hang")
    saga_id = "transfer.hang0000000000000000000000.00000000"
    with tm.transaction() as tx:
        assert _barrier.enter_compensation(tx, [("pg1", "postgresql")], saga_id, "debit") == "empty"
    from xatm.sagas.store import FileSagaStore, SagaRecord

    store = tm.sagas.store
    assert isinstance(store, FileSagaStore)
    claim = store.create(SagaRecord(saga_id, "transfer", None, "dead", "running", d))
    assert claim is not None
    store.release(claim)  # as if its owner died before running anything
    tm.recover()
    record = tm.saga(saga_id)
    assert record is not None and record.state == "compensated"
    assert "compensated before" in record.error
    assert bank.balances()["pg1"][1] == 1000
    assert journal(bank, "hang")["pg1"] == set()


def test_idempotency_key_is_stable(make_tm: MakeTM, bank: Bank) -> None:
    seen: list[str | None] = []

    def call_service(tx: Any, d: dict[str, Any]) -> None:
        seen.append(tx.idempotency_key)
        if len(seen) == 1:
            raise psycopg.errors.SerializationFailure("try again")
        saga_defs.debit(tx, d)

    saga = Saga("svc", backoff=0.01).step("call", action=call_service, resources=["pg1"])
    tm = make_tm(sweeper=False, sagas=[saga])
    result = tm.run_saga("svc", data=payload(bank, "svc"))
    assert result.state == "completed"
    assert seen == [f"{result.saga_id}.call.action"] * 2


def test_config_names_sagas(tmp_path: Path, bank: Bank) -> None:
    from xatm import load_config

    cfg = tmp_path / "xatm.toml"
    lines = [
        'node_id = "cfg"',
        f'log = "{tmp_path / "log"}"',
        'sagas = ["tests.support.saga_defs:transfer"]',
    ]
    for name, url in bank.urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
    cfg.write_text("\n".join(lines) + "\n")
    with TransactionManager.from_config(cfg) as tm:
        assert tm.run_saga("transfer", data=payload(bank, "cfg")).state == "completed"
    cfg.write_text(
        cfg.read_text().replace("tests.support.saga_defs:transfer", "tests.support.saga_defs")
    )
    with pytest.raises(ConfigurationError, match="module:attribute"):
        TransactionManager.from_config(cfg)
    assert load_config  # the loader itself only checks the shape


# -- the shared log -----------------------------------------------------------------------------
def test_sagas_on_the_shared_log(make_tm: MakeTM, bank: Bank, log_url: str) -> None:
    a = make_tm(node_id="sa", log=log_url, sweeper=False, sagas=[saga_defs.transfer])
    b = make_tm(node_id="sb", log=log_url, sweeper=False, sagas=[saga_defs.transfer])
    done = a.run_saga("transfer", data=payload(bank, "sh"), key="sh-1")
    assert done.state == "completed"
    assert b.run_saga("transfer", data={}, key="sh-1").saga_id == done.saga_id
    undone = b.run_saga("transfer", data=payload(bank, "sh2", abort=True), key="sh-2")
    assert undone.state == "compensated"
    assert bank.balances()["pg1"][1] == 995
    record = b.saga(done.saga_id)
    assert record is not None and record.state == "completed" and record.node == "sa"
    assert [e.action for e in b.sagas.history(done.saga_id)][-1] == "saga-end"


def test_the_sweeper_finishes_a_dead_owners_saga(make_tm: MakeTM, bank: Bank) -> None:
    """A saga left by a dead owner (its record made, nothing run) is finished by another
    manager's background sweeper, without anyone calling recover()."""
    from tests.support.recovery import wait_for
    from xatm.sagas.store import FileSagaStore, SagaRecord

    tm = make_tm(node_id="owner", sweeper=False, sagas=[saga_defs.transfer])
    store = tm.sagas.store
    assert isinstance(store, FileSagaStore)
    saga_id = "transfer." + "5" * 24 + ".00000000"
    claim = store.create(
        SagaRecord(saga_id, "transfer", None, "gone", "running", payload(bank, "sw"))
    )
    assert claim is not None
    store.release(claim)  # its owner died
    sweeping = make_tm(node_id="sweeper", sweep_interval=0.2, sagas=[saga_defs.transfer])
    wait_for(lambda: (r := sweeping.saga(saga_id)) is not None and r.final, what="the sweeper")
    assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005


def test_a_record_less_saga_file_is_removed_by_the_next_creation(
    make_tm: MakeTM, bank: Bank
) -> None:
    """What an OS crash during a creation can leave: the name, without a record (its fsyncs
    never finished, so none of its steps ran). The next run of that key takes the name."""
    from xatm.sagas.store import FileSagaStore, key_hash

    tm = make_tm(sweeper=False, sagas=[saga_defs.transfer])
    store = tm.sagas.store
    assert isinstance(store, FileSagaStore)
    store.directory.mkdir(parents=True, exist_ok=True)
    unborn = store.directory / f"transfer.{key_hash('transfer', 'ub')[:24]}.saga"
    unborn.write_bytes(b"")
    assert tm.recover_sagas().finished == ()  # nothing to finish: it never started
    result = tm.run_saga("transfer", data=payload(bank, "ub"), key="ub")
    assert result.state == "completed"
    assert bank.balance("pg1", 1) == 995


def test_forced_retry_takes_a_live_owners_saga_on_the_shared_log(
    make_tm: MakeTM, bank: Bank, log_url: str
) -> None:
    """With the shared log, --force takes a saga from a live owner (its node lock held);
    the owner's next write then fails with SagaTakenOver."""
    from xatm.admin import SagaTakenOver
    from xatm.sagas.store import SagaRecord

    owner = make_tm(node_id="fo-owner", log=log_url, sweeper=False, sagas=[saga_defs.transfer])
    other = make_tm(node_id="fo-other", log=log_url, sweeper=False, sagas=[saga_defs.transfer])
    saga_id = "transfer." + "f" * 24 + ".0000000f"
    record = SagaRecord(saga_id, "transfer", None, "fo-owner", "running", payload(bank, "fo"))
    claim = owner.sagas.store.create(record)
    assert claim is not None
    with pytest.raises(SagaRefused, match="live process"):
        other.saga_action(saga_id, "retry")
    result = other.saga_action(saga_id, "retry", force=True, actor="cli:test")
    assert result.state == "completed"
    with pytest.raises(SagaTakenOver):
        owner.sagas.store.save(claim, record.with_(step="credit"), force=False)
    history = other.sagas.history(saga_id)
    assert any(e.action == "saga-takeover" and "by force" in e.reason for e in history)
    assert bank.balance("pg1", 1) == 995


def test_finished_sagas_are_retired_and_their_keys_still_answer(
    make_tm: MakeTM, bank: Bank
) -> None:
    import os

    from xatm.sagas.store import FileSagaStore

    tm = make_tm(sweeper=False, sagas=[saga_defs.transfer])
    store = tm.sagas.store
    assert isinstance(store, FileSagaStore)
    first = tm.run_saga("transfer", data=payload(bank, "rt1"), key="rt1")
    [path] = store.directory.glob("*.saga")
    os.utime(path, (1, 1))  # as if it ended long ago
    assert store.retire(60) == 1
    assert list(store.directory.glob("*.saga")) == []
    assert (store.done_directory / path.name).exists()
    again = tm.run_saga("transfer", data=payload(bank, "rt1"), key="rt1")
    assert (again.saga_id, again.state) == (first.saga_id, "completed")
    assert list(store.directory.glob("*.saga")) == []  # the name was given back
    record = tm.saga(first.saga_id)
    assert record is not None and record.final
    assert [r.saga_id for r in store.records(include_final=True)] == [first.saga_id]
    assert bank.balance("pg1", 1) == 995


def test_a_saga_runs_with_an_event_listener(saga_tm: TransactionManager, bank: Bank) -> None:
    """With a listener, each branch's participant is wrapped (timed) for the events; the
    begin that carries a step's barrier row is timed as the begin."""
    from xatm.core import events

    seen: list[events.Event] = []
    stop = events.subscribe(seen.append)
    try:
        result = saga_tm.run_saga("transfer", data=payload(bank, "ev"))
    finally:
        stop()
    assert result.state == "completed"
    assert journal(bank, "ev") == {"pg1": {"debit", "finish"}, "pg2": set(), "maria": {"credit"}}
    ops = [op for e in seen for op in getattr(e, "ops", ())]
    assert [o for o in ops if getattr(o, "op", None) == "begin"], seen
