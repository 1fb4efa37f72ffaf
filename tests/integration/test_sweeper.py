"""The sweeper: resolves what dead coordinators left, by itself, and never harms live ones."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import xatm.core.failpoint
import xatm.recovery.sweeper
from tests.support import Bank, MakeTM, Servers, prepare_foreign, resolve_foreign, run
from tests.support.recovery import crash, prepared_gtrids, wait_for
from xatm import ConfigurationError, TransactionManager, TransactionTimeout, load_config
from xatm.admin import Inspector, Xid
from xatm.log.file import read_log


def nothing_prepared(bank: Bank) -> bool:
    return all(not v for v in prepared_gtrids(bank).values())


def test_sweeper_resolves_a_dead_coordinators_branches_by_itself(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    committed = crash(bank, log, "dead", "after_decision", ("pg1", "maria"), "c", account=1)
    aborted = crash(bank, log, "dead", "after_prepare", ("pg2", "maria"), "a", account=2)
    assert prepared_gtrids(bank) == {
        "pg1": {committed},
        "pg2": {aborted},
        "maria": {committed, aborted},
    }
    tm = make_tm(node_id="sweeper", log=log, sweep_interval=0.1)
    assert tm.sweeper.running
    wait_for(lambda: nothing_prepared(bank), what="the sweeper to resolve every branch")
    wait_for(lambda: not read_log(log / "dead").pending, what="the decision to be closed")
    # all or nothing, as the log said
    journal = bank.journal_ids()
    assert journal == {"pg1": {"c"}, "pg2": set(), "maria": {"c"}}
    b = bank.balances()
    assert (b["pg1"][1], b["maria"][1], b["pg2"][2], b["maria"][2]) == (990, 1010, 1000, 1000)
    assert bank.total() == bank.initial_total
    # the audit trail has every action, by the sweeper
    trail = tm.audit_trail()
    acted = sorted((e.gtrid, e.resource, e.action, e.outcome) for e in trail if e.resource)
    assert acted == sorted(
        [
            (committed, "pg1", "commit", "done"),
            (committed, "maria", "commit", "done"),
            (aborted, "pg2", "rollback", "done"),
            (aborted, "maria", "rollback", "done"),
        ]
    )
    assert [(e.gtrid, e.action) for e in trail if not e.resource] == [(committed, "end")]
    for e in trail:
        assert e.actor == "sweeper@sweeper" and e.node == "sweeper"
        assert e.at > 0 and e.reason and e.branch in ("", "pg1", "pg2", "maria")
    status = tm.sweeper.status()
    assert status.passes >= 1 and status.failed_passes == 0 and status.backoff == ()
    tm.close()
    assert not tm.sweeper.running


def test_sweeper_racing_live_coordinators_breaks_nothing(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """Two live coordinators (one log directory) transfer money in threads while both their
    sweepers run every 0.05 s and a third node keeps running recovery passes: no
    transaction is harmed, nothing is left prepared, no sweeper acts at all."""
    log = tmp_path / "log"
    one = make_tm(node_id="one", log=log, sweep_interval=0.05)
    two = make_tm(node_id="two", log=log, sweep_interval=0.05)
    third = make_tm(node_id="third", log=log, sweeper=False)
    names = ["pg1", "pg2", "maria"]
    errors: list[BaseException] = []
    done: list[tuple[str, str, str]] = []
    stop = threading.Event()

    def work(tm: TransactionManager, account: int, seed: int) -> None:
        r = random.Random(seed)
        try:
            for i in range(12):
                src, dst = r.sample(names, 2)
                tid = f"{tm.node_id}-{account}-{i}"
                with tm.transaction() as tx:
                    t, j = bank.table, bank.journal
                    tx.execute(src, f"UPDATE {t} SET bal = bal - 1 WHERE id = %s", (account,))
                    tx.execute(dst, f"UPDATE {t} SET bal = bal + 1 WHERE id = %s", (account,))
                    tx.execute(src, f"INSERT INTO {j} VALUES (%s)", (tid,))
                    tx.execute(dst, f"INSERT INTO {j} VALUES (%s)", (tid,))
                done.append((tid, src, dst))
        except BaseException as e:  # reported below
            errors.append(e)

    def recover_in_a_loop() -> None:
        while not stop.is_set():
            try:
                third.recover()
                one.recover(dry_run=True)
            except BaseException as e:  # reported below
                errors.append(e)
                return

    threads = [
        threading.Thread(target=work, args=(one, 1, 1)),
        threading.Thread(target=work, args=(one, 2, 2)),
        threading.Thread(target=work, args=(two, 3, 3)),
        threading.Thread(target=work, args=(two, 4, 4)),
    ]
    recoverer = threading.Thread(target=recover_in_a_loop)
    recoverer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    recoverer.join()
    assert errors == []
    assert len(done) == 48
    journal = bank.journal_ids()
    for tid, src, dst in done:
        assert tid in journal[src] and tid in journal[dst]
    assert sum(len(v) for v in journal.values()) == 96
    assert bank.total() == bank.initial_total
    assert nothing_prepared(bank)
    # no sweeper or recovery pass had anything to do with a live transaction
    assert one.audit_trail() == []
    assert one.sweeper.status().passes > 0 and two.sweeper.status().passes > 0


def test_sweeper_aborts_an_expired_undecided_transaction_and_only_that(
    bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    """A transaction stuck between prepare and its decision past its timeout is marked
    aborted by the sweeper; its coordinator then rolls it back instead of committing."""
    tm = make_tm(node_id="fenced", timeout=0.5, sweep_interval=0.05)

    def stall() -> None:  # between prepare and decision, until the sweeper marked it
        wait_for(
            lambda: any(e.action == "expire" for e in tm.audit_trail()),
            what="the sweeper to mark the transaction aborted",
        )

    with pytest.raises(TransactionTimeout), tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 5 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 5 WHERE id = 1")
        at_step["after_prepare"] = stall
    (entry,) = [e for e in tm.audit_trail() if e.action == "expire"]
    assert entry.gtrid == tx.gtrid and entry.actor == "sweeper@fenced"
    assert bank.total() == bank.initial_total and bank.balance("pg1") == 1000
    assert nothing_prepared(bank)
    # transactions within their timeout are never touched, with the sweeper still running
    for _ in range(5):
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 2")
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 2")
    assert bank.balances()["maria"][2] == 1005


def test_participant_down_during_sweeps(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """MariaDB is down: the sweeper resolves what it can on the others (the decided
    transactions: an undecided one waits, since MariaDB, never read, might hold its
    commit-marker decision row), backs off from MariaDB, and finishes its branch once it is
    back."""
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    log = tmp_path / "log"
    on_maria = crash(bank, log, "dead", "after_decision", ("pg1", "maria"), "m", account=1)
    elsewhere = crash(bank, log, "dead", "after_decision", ("pg1", "pg2"), "p", account=2)
    maria = servers.set.maria
    maria.stop()
    try:
        tm = make_tm(node_id="patient", log=log, sweep_interval=0.1)
        tm.sweeper.max_backoff = 0.4

        def pg_prepared() -> set[str]:
            found = set()
            for name in ("pg1", "pg2"):
                for (gid,) in run(bank.conns[name], "SELECT gid FROM pg_prepared_xacts"):
                    xid = Xid.from_pg_gid(gid)
                    if xid is not None and xid.is_xatm:
                        found.add(xid.gtrid)
            return found

        wait_for(lambda: not pg_prepared(), what="the PostgreSQL branches to be resolved")
        wait_for(lambda: any(b.resource == "maria" for b in tm.sweeper.status().backoff))
        (backoff,) = tm.sweeper.status().backoff
        assert backoff.failures >= 1 and "maria" in backoff.error
        assert "xatm-secret" not in backoff.error
        # the decision stays open until MariaDB's branch is committed
        assert on_maria in read_log(log / "dead").pending
    finally:
        maria.start()
    bank.reconnect("maria")
    wait_for(lambda: nothing_prepared(bank), what="MariaDB's branch to be committed")
    wait_for(lambda: not read_log(log / "dead").pending, what="the decision to be closed")
    wait_for(lambda: tm.sweeper.status().backoff == (), what="the backoff to be reset")
    journal = bank.journal_ids()
    assert journal == {"pg1": {"m", "p"}, "pg2": {"p"}, "maria": {"m"}}
    assert bank.total() == bank.initial_total
    actions = {(e.gtrid, e.resource, e.action) for e in tm.audit_trail()}
    assert (on_maria, "maria", "commit") in actions
    assert (elsewhere, "pg2", "commit") in actions


def test_hand_rolled_back_postgresql_branch_is_a_heuristic(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "dead", "after_decision", ("pg1", "pg2"), "h", account=3)
    (xid,) = [x for x in bank.xatm_prepared()["pg2"] if x.gtrid == gtrid]
    run(bank.conns["pg2"], f"ROLLBACK PREPARED '{xid.to_pg_gid()}'")  # an operator, by hand
    tm = make_tm(node_id="judge", log=log, sweeper=False)
    with caplog.at_level(logging.ERROR, logger="xatm"):
        report = tm.recover()
    assert report.committed == 1 and report.heuristics == 1 and report.ended == 1
    (h,) = [a for a in report.actions if a.action == "heuristic"]
    assert (h.gtrid, h.resource) == (gtrid, "pg2")
    assert "rolled back" in h.outcome
    assert any("HEURISTIC" in r.getMessage() and gtrid in r.getMessage() for r in caplog.records)
    (audited,) = [e for e in tm.audit_trail(gtrid) if e.action == "heuristic"]
    assert audited.resource == "pg2" and audited.actor == "recover@judge"
    assert bank.journal_ids()["pg1"] == {"h"} and bank.journal_ids()["pg2"] == set()


def test_vanished_mysql_branch_cannot_be_told_apart(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "dead", "after_decision", ("pg1", "maria"), "v", account=4)
    bank.wait_for_dead_sessions()  # until then only the dead coordinator's session may end it
    (xid,) = [x for x in bank.xatm_prepared()["maria"] if x.gtrid == gtrid]
    run(bank.conns["maria"], f"XA ROLLBACK {xid.to_mysql()}")
    tm = make_tm(node_id="judge", log=log, sweeper=False)
    report = tm.recover()
    assert report.committed == 1 and report.heuristics == 0 and report.ended == 1
    (v,) = [a for a in report.actions if a.action == "verify"]
    assert (v.gtrid, v.resource) == (gtrid, "maria")
    assert "cannot tell" in v.outcome


def test_branch_committed_earlier_is_verified_committed(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    crash(bank, log, "dead", "after_first_commit", ("pg1", "pg2"), "e", account=4)
    tm = make_tm(node_id="judge", log=log, sweeper=False)
    report = tm.recover()
    assert report.heuristics == 0 and report.ended == 1
    verified = [a for a in report.actions if a.action == "verify"]
    assert verified and all(a.outcome.startswith("committed") for a in verified)
    assert report.committed + len(verified) == 2
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["pg2"] == {"e"}


def test_foreign_prepared_transactions_are_untouched_by_the_sweeper(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    for name, url in bank.urls.items():
        prepare_foreign(url, f"sweep-{name}")
    try:
        log = tmp_path / "log"
        crash(bank, log, "dead", "after_prepare", ("pg1", "pg2", "maria"), "f", account=1)
        tm = make_tm(node_id="sweeper", log=log, sweeper=False)
        first = tm.sweeper.run_once()
        again = tm.sweeper.run_once()
        assert first.rolled_back == 3 and first.foreign >= 3
        assert again.rolled_back == 0 and again.foreign >= 3
        everything = bank.prepared()
        assert "foreign-sweep-pg1" in everything["pg1"]
        assert "foreign-sweep-pg2" in everything["pg2"]
        assert any(isinstance(x, str) for x in everything["maria"])
        assert {e.action for e in tm.audit_trail()} == {"rollback"}
    finally:
        for name, url in bank.urls.items():
            resolve_foreign(url, f"sweep-{name}")


def test_a_failing_pass_does_not_stop_the_sweeper(
    make_tm: MakeTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = xatm.recovery.sweeper.run_pass
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(xatm.recovery.sweeper, "run_pass", flaky)
    tm = make_tm(node_id="stubborn", sweep_interval=0.05)
    wait_for(lambda: tm.sweeper.status().passes >= 2, what="passes after the failures")
    status = tm.sweeper.status()
    assert status.failed_passes == 2 and status.running
    assert status.last_report is not None


def test_sweeper_settings_from_toml(bank: Bank, tmp_path: Path) -> None:
    from tests.support.recovery import write_config

    path = write_config(
        tmp_path / "x.toml",
        {"pg1": bank.urls["pg1"]},
        tmp_path / "log",
        extra="[sweeper]\ninterval = 0.5\nenabled = false\n",
    )
    with TransactionManager.from_config(path) as tm:
        assert tm.sweeper.interval == 0.5 and not tm.sweeper.running
    path = write_config(tmp_path / "y.toml", {"pg1": bank.urls["pg1"]}, tmp_path / "log")
    with TransactionManager.from_config(path) as tm:
        assert tm.sweeper.interval == 10.0 and tm.sweeper.running
    assert not tm.sweeper.running  # close() stopped it
    for bad in ("interval = 0", "interval = 'often'", "enabled = 'yes'", "speed = 1"):
        path = write_config(
            tmp_path / "z.toml",
            {"pg1": bank.urls["pg1"]},
            tmp_path / "log",
            extra=f"[sweeper]\n{bad}\n",
        )
        with pytest.raises(ConfigurationError, match=r"\[sweeper\]"):
            TransactionManager.from_config(path)
    assert Inspector.from_settings(load_config(path)).resource_names == ["pg1"]


def test_marker_resource_down_and_backing_off_keeps_presumed_abort_waiting(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """The decision of a commit-marker transaction is a row on MariaDB; MariaDB is down and
    the sweeper (which has never read it) backs off from it: the PostgreSQL branch must wait,
    not be presumed aborted, in every pass, including those that skip MariaDB."""
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    log = tmp_path / "log"
    gtrid = crash(bank, log, "dead", "after_decision", ("pg1", "maria"), "mk", ("maria",), 3)
    assert prepared_gtrids(bank)["pg1"] == {gtrid}  # the marker branch is committed
    maria = servers.set.maria
    maria.stop()
    try:
        tm = make_tm(node_id="careful", log=log, sweep_interval=0.05)
        tm.sweeper.max_backoff = 0.4
        wait_for(lambda: tm.sweeper.status().passes >= 12, what="passes with MariaDB down")
        on_pg1 = {
            xid.gtrid
            for (gid,) in run(bank.conns["pg1"], "SELECT gid FROM pg_prepared_xacts")
            if (xid := Xid.from_pg_gid(gid)) is not None
        }
        assert gtrid in on_pg1, "the PostgreSQL branch was resolved without its decision row"
    finally:
        maria.start()
    bank.reconnect("maria")
    wait_for(lambda: nothing_prepared(bank), what="the PostgreSQL branch to be committed")
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"mk"}
    assert bank.total() == bank.initial_total
    wait_for(
        lambda: (
            not run(
                bank.conns["maria"], "SELECT gtrid FROM xatm_decisions WHERE gtrid = %s", (gtrid,)
            )
        ),
        what="the decision row to be deleted",
    )


def test_two_sweepers_share_a_dead_peer_without_acting_twice(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """Two live nodes' sweepers race for a dead node's transactions: its log's lock lets
    one of them at a time act; every branch is resolved exactly once, as its log says."""
    log = tmp_path / "log"
    decided = [
        crash(bank, log, "dead", "after_decision", ("pg1", "maria"), f"d{a}", account=a)
        for a in (1, 2)
    ]
    undecided = [
        crash(bank, log, "dead", "after_prepare", ("pg2", "maria"), f"u{a}", account=a)
        for a in (3, 4)
    ]
    one = make_tm(node_id="one", log=log, sweep_interval=0.05)
    two = make_tm(node_id="two", log=log, sweep_interval=0.05)
    wait_for(lambda: nothing_prepared(bank), what="the dead node's branches to be resolved")
    wait_for(lambda: not read_log(log / "dead").pending, what="the decisions to be closed")
    done = [
        (e.gtrid, e.resource, e.action)
        for e in one.audit_trail()
        if e.action in ("commit", "rollback") and e.outcome == "done"
    ]
    assert sorted(done) == sorted(
        [(g, r, "commit") for g in decided for r in ("pg1", "maria")]
        + [(g, r, "rollback") for g in undecided for r in ("pg2", "maria")]
    )
    assert {e.actor for e in two.audit_trail()} <= {"sweeper@one", "sweeper@two"}
    journal = bank.journal_ids()
    assert journal == {"pg1": {"d1", "d2"}, "pg2": set(), "maria": {"d1", "d2"}}
    assert bank.total() == bank.initial_total
