"""Field tests of issue 8 for manual resolution (items 1 and 2): an operator's commit or
rollback without --force must never split a transaction.

Each test reproduces, against the real servers, one way version 0.1 split a transaction
(issue 8, items 1 and 2); each failed before the decision rule was made one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM
from tests.support.field import (
    LingeringProxy,
    attempt,
    books,
    cli,
    delete_marker_rows,
    maria_sessions,
    marker_config,
    roll_back_leftovers,
)
from tests.support.recovery import crash, prepared_gtrids, wait_for
from xatm.admin import ResolutionRefused
from xatm.log.file import owner_state, read_log

NODES = {"fr-mark", "fr-cli", "fr-linger"}


@pytest.fixture
def tidy(bank: Bank) -> Iterator[None]:
    """Leave nothing prepared and no decision row behind, whatever the test did."""
    yield
    roll_back_leftovers(bank, NODES)
    delete_marker_rows(bank, NODES)


def crash_with_marker_row(bank: Bank, log: Path, node: str, tid: str) -> str:
    """A coordinator with commit_markers=["pg1"] killed after its decision: pg1 committed
    with the decision row, maria prepared. Waits for its MariaDB session to go."""
    gtrid = crash(bank, log, node, "after_decision", ("pg1", "maria"), tid, markers=("pg1",))
    bank.wait_for_dead_sessions()
    assert bank.journal_ids()["pg1"] == {tid}
    assert prepared_gtrids(bank) == {"pg1": set(), "pg2": set(), "maria": {gtrid}}
    return gtrid


# -- item 1: the commit-marker row is the decision -------------------------------------------


def test_show_and_recovery_follow_the_marker_row(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, tidy: None
) -> None:
    """Baseline (passes today): inspection says commit, and recovery commits."""
    log = tmp_path / "log"
    gtrid = crash_with_marker_row(bank, log, "fr-mark", "base")
    other = make_tm(node_id="fr-other", log=log, sweeper=False, commit_markers=["pg1"])
    assert other.show(gtrid).decision == "commit"
    report = other.recover()
    assert report.committed == 1 and report.rolled_back == 0
    assert books(bank, "base", ("pg1", "maria")) == {"pg1", "maria"}


def test_manual_rollback_is_refused_when_the_marker_row_says_commit(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, tidy: None
) -> None:
    log = tmp_path / "log"
    gtrid = crash_with_marker_row(bank, log, "fr-mark", "r1")
    other = make_tm(node_id="fr-other", log=log, sweeper=False, commit_markers=["pg1"])
    assert other.show(gtrid).decision == "commit"
    _, error = attempt(lambda: other.resolve(gtrid, "rollback", actor="test"))
    assert isinstance(error, ResolutionRefused), error
    assert prepared_gtrids(bank)["maria"] == {gtrid}  # in doubt, not rolled back
    assert other.show(gtrid).decision == "commit"
    assert other.recover().committed == 1
    assert books(bank, "r1", ("pg1", "maria")) == {"pg1", "maria"}


def test_manual_commit_follows_the_marker_row(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, tidy: None
) -> None:
    log = tmp_path / "log"
    gtrid = crash_with_marker_row(bank, log, "fr-mark", "c1")
    other = make_tm(node_id="fr-other", log=log, sweeper=False, commit_markers=["pg1"])
    res = other.resolve(gtrid, "commit", actor="test")  # today: ResolutionRefused
    assert res.complete and not res.forced
    assert books(bank, "c1", ("pg1", "maria")) == {"pg1", "maria"}
    assert all(not v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total


def test_cli_rollback_is_refused_and_commit_allowed_by_the_marker_row(
    bank: Bank, tmp_path: Path, tidy: None
) -> None:
    log = tmp_path / "log"
    config = marker_config(tmp_path / "xatm.toml", bank.urls, log, "fr-cli", "pg1")
    gtrid = crash_with_marker_row(bank, log, "fr-cli", "k1")
    shown = cli(config, "show", gtrid, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["decision"] == "commit"
    listed = {r["gtrid"]: r for r in json.loads(cli(config, "indoubt", "--json").stdout)}
    assert listed[gtrid]["decision"] == "commit"

    rolled = cli(config, "rollback", gtrid)
    assert rolled.returncode == 1, rolled.stdout
    lines = [line for line in rolled.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--force" in lines[0]
    assert prepared_gtrids(bank)["maria"] == {gtrid}
    assert json.loads(cli(config, "show", gtrid, "--json").stdout)["decision"] == "commit"

    committed = cli(config, "commit", gtrid)
    assert committed.returncode == 0, committed.stderr
    assert books(bank, "k1", ("pg1", "maria")) == {"pg1", "maria"}
    assert all(not v for v in prepared_gtrids(bank).values())


# -- item 2: XAER_NOTA from a lingering session is not "gone" --------------------------------


def test_manual_commit_while_the_dead_coordinators_session_lingers(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, tidy: None
) -> None:
    """The coordinator's host "crashes" after logging COMMIT: its process is gone (its log
    lock is free, so the log can be taken over) but its MariaDB session lingers (a proxy
    keeps it open), still attached to the prepared branch. A manual commit then gets
    XAER_NOTA on maria. Once the session goes, the branch is prepared again for anyone:
    recovery must commit it, as decided."""
    log = tmp_path / "log"
    proxy = LingeringProxy(bank.urls["maria"])
    try:
        urls = dict(bank.urls, maria=proxy.url)
        gtrid = crash(bank, log, "fr-linger", "after_decision", ("pg1", "maria"), "l1", urls=urls)
        assert owner_state(log, "fr-linger") == "dead"
        assert maria_sessions(bank, proxy.session_ports()), "no lingering session"
        assert gtrid in read_log(log / "fr-linger").pending
        assert prepared_gtrids(bank)["maria"] == {gtrid}
        other = make_tm(node_id="fr-other", log=log, sweeper=False)
        res, error = attempt(lambda: other.resolve(gtrid, "commit", actor="test"))
        assert not isinstance(error, ResolutionRefused) or "commit" in str(error)
        still_prepared = gtrid in prepared_gtrids(bank)["maria"]
        # the session goes (the partition heals, or the server times it out) ...
        ports = proxy.session_ports()
        proxy.release()
        wait_for(lambda: not maria_sessions(bank, ports), what="the lingering session to go")
    finally:
        proxy.close()
    # ... and recovery settles what is left: the decision was COMMIT
    for _ in range(5):
        report = other.recover()
        if report.clean and report.committed == report.rolled_back == 0:
            break
    assert books(bank, "l1", ("pg1", "maria")) == {"pg1", "maria"}  # today: SPLIT
    assert all(not v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total
    if still_prepared and res is not None:
        assert not res.complete  # a branch left prepared is not "complete"


def test_manual_rollback_without_a_plan_is_refused_for_a_marker_transaction(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, tidy: None
) -> None:
    """Found by the simulator (tests/sim, seeds 187, 285 and 289 of `make sim`): the
    resource holding the prepared branch was not reached while the decision rule's plan was
    made (so the plan listed no branch of it), then was reached when the branches were
    looked up, and the rollback went ahead on the log alone (no COMMIT logged, coordinator
    dead: "abort"), ignoring the commit-marker row: a split. That step, taken here on the
    real servers as it follows a blind plan: refused now."""
    from xatm.ops.resolve import _Resolve

    log = tmp_path / "log"
    gtrid = crash_with_marker_row(bank, log, "fr-mark", "r9")
    other = make_tm(node_id="fr-other", log=log, sweeper=False, commit_markers=["pg1"])
    blind = _Resolve(other.context, gtrid, "rollback", False, "test")  # rule None: no plan
    _, error = attempt(blind.run)
    assert isinstance(error, ResolutionRefused), error
    assert "commit-marker row" in str(error)
    assert prepared_gtrids(bank)["maria"] == {gtrid}  # in doubt, not rolled back
    assert other.recover().committed == 1
    assert books(bank, "r9", ("pg1", "maria")) == {"pg1", "maria"}
