"""Sagas in the field: a step's first round trip (its branch's BEGIN, which carries the
step's barrier row) meets a session cut or a silent path, on real servers, through a TCP
proxy in front of one database.

* **Cut in flight**: the server runs the BEGIN and the barrier insert, the client never hears
  back and its socket is closed. The branch's begin is tried again on a fresh connection
  (within the step's attempt) and the saga completes; the cut session's barrier row went
  with it (the step's second barrier insert was not a duplicate); every step applied once
  (a journal row per step and compensation, with a primary key), money conserved, nothing
  left prepared.
* **Commit cut in flight**: the server commits a step's local transaction (its barrier row
  with it), the client never hears back. The attempt is in doubt; tried again, the barrier
  row says the step is done and its body is not run twice; the saga completes. The same
  at a compensation's commit: applied once, the saga ends compensated.
* **Silent saga store** (the shared log's server): ``run_saga`` raises SagaInDoubt within
  the bound of one call, and recovery finishes the saga once the store answers.
* **Silent path**: the proxy stops forwarding (without closing anything) for longer than
  the step's whole retry budget. ``run_saga`` returns before the path heals (no call
  waits for the silence); the saga cannot undo a step on a silent database, so it ends stuck
  and says so; once the path heals, an operator's retry finishes it, compensated, and the
  books balance.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.support import Bank, MakeTM, saga_defs
from tests.support.omission import BlackholeProxy
from xatm import Saga, SagaAbort
from xatm.core.deadline import GRACE
from xatm.errors import SagaInDoubt
from xatm.log.shared import POINT_BOUND
from xatm.sagas.barrier import TABLE

TIMEOUT = 2.0
#: the bound of one attempt (timeout + connect timeout) and a loaded 2-core machine's slack
ATTEMPT = TIMEOUT + GRACE + 3.0


def _payload(bank: Bank, tid: str) -> dict[str, Any]:
    return {"table": bank.table, "journal": bank.journal, "tid": tid, "src": 1, "dst": 2, "amt": 5}


def _effects(bank: Bank, tid: str) -> dict[str, list[str]]:
    return {
        name: sorted(t.split("-", 1)[1] for t in ids if t.startswith(tid + "-"))
        for name, ids in bank.journal_ids().items()
    }


def _completed_once(bank: Bank, tid: str) -> None:
    """The transfer saga ``tid`` (after the warm-up's) applied each step once, the books
    balance, and nothing is left prepared."""
    assert _effects(bank, tid) == {"pg1": ["debit", "finish"], "pg2": [], "maria": ["credit"]}
    assert bank.balance("pg1", 1) == 990 and bank.balance("maria", 2) == 1010
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def _through(make_tm: MakeTM, bank: Bank, through: str, proxy: BlackholeProxy, saga: Saga) -> Any:
    """A manager whose path to ``through`` is ``proxy``, with a pooled connection there
    (one run of ``saga``, completed)."""
    tm = make_tm(
        resources={**bank.urls, through: proxy.url},
        timeout=TIMEOUT,
        sweeper=False,
        sagas=[saga],
    )
    assert tm.run_saga(saga.name, data=_payload(bank, "warm")).state == "completed"
    return tm


@pytest.mark.parametrize("key", [None, "with-a-key"])
@pytest.mark.parametrize("through", ["pg1", "maria"])
def test_a_cut_at_a_steps_begin_is_retried_and_applies_once(
    through: str, key: str | None, make_tm: MakeTM, bank: Bank
) -> None:
    proxy = BlackholeProxy(bank.urls[through])
    try:
        tm = _through(make_tm, bank, through, proxy, saga_defs.transfer)
        # the step's BEGIN and its barrier row, one round trip (not the identity lease's ping)
        proxy.cut_after_next_request(match=TABLE.encode())
        result = tm.run_saga("transfer", data=_payload(bank, "cut"), key=key)
        assert proxy.cuts == 1
        assert result.state == "completed", result
        # the begin is tried again on a fresh connection within the step's attempt: no
        # failed attempt, and the cut session's barrier row went with its session
        history = [(e.action, e.outcome) for e in tm.sagas.history(result.saga_id)]
        assert [a for a, o in history if "failed" in o] == [], history
        _completed_once(bank, "cut")
        assert tm.recover_sagas().finished == ()
    finally:
        proxy.close()


def test_a_silent_path_at_a_steps_begin_holds_no_caller_and_recovery_settles_it(
    make_tm: MakeTM, bank: Bank
) -> None:
    saga = Saga("silent", max_attempts=2, compensation_attempts=2, backoff=0.05)
    saga.step("debit", saga_defs.debit, saga_defs.refund, resources=["pg1"])
    saga.step("credit", saga_defs.credit, saga_defs.uncredit, resources=["maria"])
    proxy = BlackholeProxy(bank.urls["maria"])
    try:
        tm = make_tm(
            resources={**bank.urls, "maria": proxy.url},
            timeout=TIMEOUT,
            sweeper=False,
            sagas=[saga],
        )
        assert tm.run_saga("silent", data=_payload(bank, "warm")).state == "completed"
        # two attempts of the credit, two of its compensation: each bounded by one ATTEMPT
        bound = 4 * ATTEMPT
        silence = bound + 10.0
        proxy.blackhole()
        healed = threading.Timer(silence, proxy.heal)
        healed.start()
        t0 = time.monotonic()
        try:
            result = tm.run_saga("silent", data=_payload(bank, "silent"))
        finally:
            waited = time.monotonic() - t0
        assert waited < bound, f"run_saga waited {waited:.1f} s for a silent path"
        assert result.state == "failed" and result.stuck, result  # stuck: maria is silent
        healed.join()
        assert tm.saga_action(result.saga_id, "retry", actor="cli:test").state == "compensated"
        assert _effects(bank, "silent") == {"pg1": ["debit", "refund"], "pg2": [], "maria": []}
        assert bank.total() == bank.initial_total
        assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005  # the warm-up
        assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    finally:
        proxy.close()


#: the one-phase COMMIT of a step's local transaction, as each server receives it
_STEP_COMMIT = {"pg1": b"COMMIT\x00", "maria": b"ONE PHASE"}


@pytest.mark.parametrize("through", ["pg1", "maria"])
def test_a_cut_at_a_steps_commit_applies_the_step_once(
    through: str, make_tm: MakeTM, bank: Bank
) -> None:
    proxy = BlackholeProxy(bank.urls[through])
    try:
        tm = _through(make_tm, bank, through, proxy, saga_defs.transfer)
        proxy.cut_after_next_request(match=_STEP_COMMIT[through])
        result = tm.run_saga("transfer", data=_payload(bank, "cc"))
        assert proxy.cuts == 1
        assert result.state == "completed", result
        step = "debit" if through == "pg1" else "credit"
        history = [
            (e.branch, e.reason.split(":")[0], e.outcome)
            for e in tm.sagas.history(result.saga_id)
            if e.branch == step
        ]
        # the attempt whose commit went unheard is in doubt, not failed: tried again, the
        # barrier row its commit wrote says it is done, and its body is not run twice
        assert history == [
            (step, "TransactionInDoubt", "attempt 1 failed; retrying"),
            (step, "barrier", "committed"),
        ], history
        _completed_once(bank, "cc")
    finally:
        proxy.close()


@pytest.mark.parametrize("through", ["pg1", "maria"])
def test_a_cut_at_a_compensations_commit_applies_it_once(
    through: str, make_tm: MakeTM, bank: Bank
) -> None:
    """The same cut, at the commit of a compensation (the saga's last step aborts): the
    compensation is tried again, its barrier row says it is done, it is not applied twice,
    and the saga ends compensated."""
    proxy = BlackholeProxy(bank.urls[through])

    def abort(tx: Any, d: dict[str, Any]) -> None:
        if d["tid"] != "warm":  # the next one-phase commit here is a compensation's
            proxy.cut_after_next_request(match=_STEP_COMMIT[through])
            raise SagaAbort("the payload asks to abort")

    saga = Saga("undone", backoff=0.01, max_backoff=0.1)
    saga.step("debit", saga_defs.debit, saga_defs.refund, resources=["pg1"])
    saga.step("credit", saga_defs.credit, saga_defs.uncredit, resources=["maria"])
    saga.step("abort", abort, resources=["pg1"])
    try:
        tm = _through(make_tm, bank, through, proxy, saga)
        result = tm.run_saga("undone", data=_payload(bank, "cu"))
        assert proxy.cuts == 1
        assert result.state == "compensated", result
        undone = "debit" if through == "pg1" else "credit"
        history = [
            (e.reason.split(":")[0], e.outcome)
            for e in tm.sagas.history(result.saga_id)
            if e.branch == undone and e.action == "saga-compensation"
        ]
        assert history == [
            ("TransactionInDoubt", "attempt 1 failed; retrying"),
            ("barrier", "committed"),
        ], history
        assert _effects(bank, "cu") == {
            "pg1": ["debit", "refund"],
            "pg2": [],
            "maria": ["credit", "uncredit"],
        }
        assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005  # the warm-up
        assert bank.total() == bank.initial_total
        assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    finally:
        proxy.close()


def test_a_silent_shared_saga_store_holds_no_caller_and_recovery_finishes_the_saga(
    make_tm: MakeTM, bank: Bank, log_url: str
) -> None:
    """The shared log's server goes silent as a saga starts (its record's INSERT is sent,
    and delivered only when the path heals, as TCP would). Before the log's calls ran under
    a client-side deadline, ``run_saga`` waited for the whole silence; now it raises
    SagaInDoubt (with the saga's id) within the bound of one call. Whether the saga was
    recorded is unknown to the caller; here it was (late), and recovery runs it to its end:
    every step once."""
    proxy = BlackholeProxy(log_url)
    try:
        tm = make_tm(log=proxy.url, timeout=TIMEOUT, sweeper=False, sagas=[saga_defs.transfer])
        assert tm.run_saga("transfer", data=_payload(bank, "warm")).state == "completed"
        proxy.blackhole()
        healed = threading.Timer(30.0, proxy.heal)
        healed.start()
        t0 = time.monotonic()
        with pytest.raises(SagaInDoubt, match="whether the saga is recorded") as doubt:
            tm.run_saga("transfer", data=_payload(bank, "ss"))
        waited = time.monotonic() - t0
        assert waited < POINT_BOUND + 5.0, f"run_saga waited {waited:.1f} s for a silent store"
        healed.join()
        report = tm.recover_sagas()
        assert report.finished == ((doubt.value.saga_id, "completed"),), report
        record = tm.saga(doubt.value.saga_id)
        assert record is not None and record.state == "completed"
        _completed_once(bank, "ss")
    finally:
        proxy.close()
