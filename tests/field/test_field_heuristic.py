"""An operator rolls back by hand a transaction whose COMMIT decision is logged (``xatm
rollback --force``: a heuristic outcome), while one of its databases does not answer.

The operator's choice must hold for the branches not reached: before the fix, the COMMIT
decision stayed pending and recovery committed the branch on the database that came back,
after the operator had rolled back the other: a split made by xatm, reported by recovery
itself as a heuristic outcome. Now the decision is overruled in the log (an ABORT record,
forced before any branch is rolled back; with the shared log the row becomes an ABORT row),
and recovery rolls the rest back. Real servers; the silent database is behind a TCP proxy
that drops everything; the coordinator is a real process SIGKILLed after its decision.
When the database holding a commit-marker decision row goes silent, or its session is cut,
while the row is being overruled, the rollback is refused with no branch rolled back, and
recovery then follows whatever the row says. The same overruling keeps a branch a failover
brings back from being committed from the decision: ``tests/field/test_failover.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, run
from tests.support.omission import BlackholeProxy
from tests.support.recovery import crash
from xatm.admin import ResolutionRefused
from xatm.log.file import read_log, retained_decisions


def _without_maria(
    bank: Bank, make_tm: MakeTM, log: Path | str, node: str, gtrid: str, rolled_back: str
) -> list[str]:
    """An operator's forced rollback of ``gtrid`` through a manager whose path to MariaDB
    drops everything; returns the audited ``decide`` reasons. One branch, ``rolled_back``,
    is reached and rolled back; MariaDB's is not reached."""
    proxy = BlackholeProxy(bank.urls["maria"])
    proxy.blackhole()  # MariaDB does not answer the operator
    try:
        ops = make_tm(
            node_id=node,
            log=log,
            resources={**bank.urls, "maria": proxy.url},
            timeout=3,
            sweeper=False,
        )
        res = ops.resolve(gtrid, "rollback", force=True, actor="cli:test")
        assert [(a.resource, a.action) for a in res.actions if a.outcome == "done"] == [
            (rolled_back, "rollback")
        ]
        assert [r for r, _ in res.unreachable] == ["maria"]
        assert res.overruled and any("overruled" in n for n in res.notes), res.notes
        decided = [e.reason for e in ops.audit_trail(gtrid) if e.action == "decide"]
        ops.close()
        return decided
    finally:
        proxy.close()


@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_a_hand_rollback_of_a_decided_transaction_holds_for_the_branch_not_reached(
    log_kind: str, bank: Bank, make_tm: MakeTM, tmp_path: Path, log_url: str
) -> None:
    log: Path | str = tmp_path / "log" if log_kind == "file" else log_url
    node = f"hdead-{log_kind}"
    gtrid = crash(bank, log, node, "after_decision", ("pg1", "maria"), f"h-{log_kind}")
    assert {r: len(v) for r, v in bank.xatm_prepared().items()} == {"pg1": 1, "pg2": 0, "maria": 1}
    decided = _without_maria(bank, make_tm, log, f"hops-{log_kind}", gtrid, "pg1")
    assert decided == ["manual rollback: COMMIT decision overruled (ABORT)"]
    if log_kind == "file":
        assert gtrid not in read_log(Path(log) / node).pending  # overruled: not pending
    # MariaDB answers again: recovery follows the operator, not the overruled decision
    tm = make_tm(node_id=f"hrec-{log_kind}", log=log, sweeper=False)
    report = tm.recover()
    assert report.committed == 0 and report.heuristics == 0, report.actions
    assert [(a.resource, a.action) for a in report.actions if a.gtrid == gtrid] == [
        ("maria", "rollback")
    ]
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_a_rollback_that_finds_every_branch_committed_overrules_nothing(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A forced rollback of a decided transaction that finds no branch prepared and reaches
    every database rolls nothing back, so it overrules nothing: the transaction committed
    everywhere, its decision ends and stays retained (a failover may yet bring a branch
    back, to be committed from it)."""
    log = tmp_path / "log"
    gtrid = crash(bank, log, "hdone", "after_decision", ("pg1", "pg2"), "hd", account=2)
    for name in ("pg1", "pg2"):  # finished by someone else meanwhile
        (xid,) = [x for x in bank.xatm_prepared()[name] if x.gtrid == gtrid]
        run(bank.conns[name], f"COMMIT PREPARED '{xid.to_pg_gid()}'")
    ops = make_tm(node_id="hops2", log=log, sweeper=False)
    res = ops.resolve(gtrid, "rollback", force=True, actor="cli:test")
    assert not [a for a in res.actions if a.action in ("rollback", "heuristic")]
    assert not res.overruled
    assert [e.action for e in ops.audit_trail(gtrid) if e.action == "decide"] == []
    assert gtrid not in read_log(log / "hdone").pending  # ended
    assert gtrid in retained_decisions(log / "hdone").decisions  # and still retained
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["pg2"] == {"hd"}


def test_a_hand_rollback_overrules_a_commit_marker_decision_row(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """On the commit-marker path the decision is a row in the marker branch's database
    (committed with that branch's own work: a rollback by hand after it is a heuristic
    outcome whatever happens). The row becomes an abort row before any branch is rolled
    back, so the branch on the database not reached is rolled back later too, as the
    operator asked, not committed from the row."""
    log = tmp_path / "log"
    resources = ("pg1", "pg2", "maria")
    gtrid = crash(bank, log, "hmark", "after_decision", resources, "hm", markers=("pg1",))
    prepared = {r: len(v) for r, v in bank.xatm_prepared().items()}
    assert prepared == {"pg1": 0, "pg2": 1, "maria": 1}  # pg1 committed: the decision row
    decided = _without_maria(bank, make_tm, log, "hops3", gtrid, "pg2")
    assert decided == ["manual rollback: commit-marker decision row overruled"]
    tm = make_tm(node_id="hrec3", log=log, sweeper=False)
    report = tm.recover()
    assert report.committed == 0, report.actions
    assert [(a.resource, a.action) for a in report.actions if a.gtrid == gtrid] == [
        ("maria", "rollback")
    ]
    # the marker branch's own work committed with the decision: the heuristic outcome
    assert bank.journal_ids() == {"pg1": {"hm"}, "pg2": set(), "maria": set()}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


_RESOURCES = ("pg1", "pg2", "maria")


def _refused_overrule(
    bank: Bank, make_tm: MakeTM, log: Path, holder: str, gtrid: str, fault: str
) -> None:
    """An operator's forced rollback of the commit-marker transaction ``gtrid`` whose
    decision row is on ``holder``, through a path to ``holder`` that passes the reads and
    then fails the overrule: ``silent`` (the UPDATE delivered, then nothing forwarded either
    way, every socket left open) or ``cut`` (the COMMIT delivered and run, its answer held
    back and the session closed). The command is refused, within a coarse bound, and rolls
    nothing back."""
    before = {r: [x.gtrid for x in v] for r, v in bank.xatm_prepared().items()}
    proxy = BlackholeProxy(bank.urls[holder])
    ops = None
    try:
        ops = make_tm(
            node_id=f"hops-{fault}-{holder}",
            log=log,
            resources={**bank.urls, holder: proxy.url},
            timeout=3,
            sweeper=False,
        )
        if fault == "silent":
            proxy.silence_after_next_request(b"UPDATE xatm_decisions")
        else:  # the overrule's own COMMIT (PostgreSQL's query text, MariaDB's COM_QUERY)
            proxy.cut_after_next_request(b"COMMIT\x00" if holder != "maria" else b"\x03COMMIT")
        t0 = time.monotonic()
        with pytest.raises(ResolutionRefused, match="decision row may be there") as refused:
            ops.resolve(gtrid, "rollback", force=True, actor="cli:test")
        waited = time.monotonic() - t0
        assert waited < 30, f"the refusal waited {waited:.1f} s"  # bounded, not the silence
        assert "no branch was rolled back" in str(refused.value)
        assert (proxy.blackholes, proxy.cuts) == ((1, 0) if fault == "silent" else (0, 1))
        assert not [e for e in ops.audit_trail(gtrid) if e.action in ("decide", "rollback")]
    finally:
        proxy.close()  # the silent session ends: its UPDATE, never committed, is undone
        if ops is not None:
            ops.close()
    assert {r: [x.gtrid for x in v] for r, v in bank.xatm_prepared().items()} == before


@pytest.mark.parametrize("holder", ["pg1", "maria"])
def test_a_decision_row_silent_while_overruled_refuses_the_rollback(
    holder: str, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """The database holding the decision row answers the operator's reads, then goes silent
    as its row is overruled. The rollback is refused, nothing is rolled back, and the
    overrule never committed: once the database answers again, recovery commits the rest
    from the row. The transaction stays whole."""
    log = tmp_path / "log"
    node = f"hsil-{holder}"
    gtrid = crash(bank, log, node, "after_decision", _RESOURCES, "hs", markers=(holder,))
    others = sorted(r for r in _RESOURCES if r != holder)
    assert sorted(r for r, v in bank.xatm_prepared().items() if v) == others
    _refused_overrule(bank, make_tm, log, holder, gtrid, "silent")
    report = make_tm(node_id=f"hrec-{node}", log=log, sweeper=False).recover()
    assert sorted(
        (a.resource, a.action)
        for a in report.actions
        if a.gtrid == gtrid and a.action in ("commit", "rollback")
    ) == [(r, "commit") for r in others]
    assert bank.journal_ids() == {r: {"hs"} for r in _RESOURCES}
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {r: [] for r in _RESOURCES}


@pytest.mark.parametrize("holder", ["pg1", "maria"])
def test_a_decision_row_overruled_but_its_answer_lost_is_followed_by_recovery(
    holder: str, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """The overrule's COMMIT runs, and its answer is lost (the session is cut while the
    process lives). The operator is told the rollback was refused with no branch rolled
    back, and that recovery rolls the branches back if the overrule reached the row. It did:
    recovery reads an abort row and rolls the rest back, as the operator asked, and commits
    nothing (the holder's own work committed with the decision: the heuristic outcome)."""
    log = tmp_path / "log"
    node = f"hcut-{holder}"
    gtrid = crash(bank, log, node, "after_decision", _RESOURCES, "hc", markers=(holder,))
    _refused_overrule(bank, make_tm, log, holder, gtrid, "cut")
    report = make_tm(node_id=f"hrec-{node}", log=log, sweeper=False).recover()
    assert report.committed == 0, report.actions
    assert sorted(
        (a.resource, a.action)
        for a in report.actions
        if a.gtrid == gtrid and a.action in ("commit", "rollback")
    ) == [(r, "rollback") for r in sorted(_RESOURCES) if r != holder]
    assert bank.journal_ids() == {r: ({"hc"} if r == holder else set()) for r in _RESOURCES}
    assert bank.xatm_prepared() == {r: [] for r in _RESOURCES}
