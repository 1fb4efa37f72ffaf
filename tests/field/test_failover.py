"""PostgreSQL failover (xatm.node.failover): detection, decisions kept for a resurrected branch,
and the report of what a switch may have lost.

The server tests run a private primary with a streaming standby behind a TCP proxy
(``xatm.testing.replica``), and MariaDB from the session's servers. The losses are made
deterministic by pausing the standby's WAL stream (its proxy holds the bytes) before the
primary is crashed (``pg_ctl stop -m immediate``) and the standby promoted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from tests.support import Bank, MakeTM, connect, run, saga_defs
from tests.support.omission import BlackholeProxy
from tests.support.recovery import crash
from xatm import Saga, TransactionManager
from xatm.admin import ResolutionRefused
from xatm.cli.main import main
from xatm.core.xid import parse_gtrid
from xatm.errors import LogError
from xatm.log.timelines import FileTimelines, Loss, ResourceTimeline, Switch
from xatm.node.failover import FailoverWatch, after_failover, classify, covered, switched_since
from xatm.participants.postgres.participant import promotion_bound, server_state
from xatm.testing.replica import PostgresPair, start_pair
from xatm.testing.servers import make_basedir

# ----------------------------------------------------------------------------- no servers


def test_classify_says_what_is_certain() -> None:
    assert classify(None, 100, None, False)[0] == "unknown"
    assert classify(150, 100, None, False)[0] == "lost"  # never assigned on the new primary
    assert classify(100, 100, "committed", False)[0] == "lost"  # at the bound: lost
    assert classify(99, 100, "future", False)[0] == "lost"
    assert classify(99, 100, "aborted", False)[0] == "lost"
    assert classify(99, 100, "committed", False)[0] is None
    assert classify(99, 100, "in progress", True)[0] is None  # came back prepared
    assert classify(99, 100, "in progress", False)[0] == "unknown"  # another's id now
    assert classify(99, 100, None, False)[0] == "unknown"  # status no longer kept
    assert classify(99, None, "committed", False)[0] is None


def test_server_state_and_checkpoint_rows() -> None:
    assert server_state(("0000000A", "1234")) == (10, 1234)
    assert server_state((None, "77")) == (None, 77)  # a standby
    assert promotion_bound((3, "0:741"), 3) == 741
    assert promotion_bound((3, "2:5"), 3) == (2 << 32) | 5
    assert promotion_bound((2, "0:741"), 3) is None  # a checkpoint older than the promotion


def test_the_watch_records_switches_durably(tmp_path: Path) -> None:
    store = FileTimelines(tmp_path)
    watch = FailoverWatch("n1", store)
    assert watch.changed("pg", 1, 100) == "timeline"  # nothing recorded yet
    watch.record("pg", 1, 100, None)
    assert watch.changed("pg", 1, 120) == "same"
    assert store.load("n1")["pg"].switches == ()
    # a promotion: the next xid of the first connection to the new primary is kept...
    assert watch.changed("pg", 2, 118) == "timeline"
    watch.record("pg", 2, 118, 110)
    # ... the least one, if another connection of the same moment saw a lower one
    watch.record("pg", 2, 117, None)
    (switch,) = store.load("n1")["pg"].switches
    assert (switch.old, switch.new, switch.next_xid, switch.bound) == (1, 2, 117, 110)
    assert switch.lost_from == 110
    assert watch.lost_txid("pg", 111, switch.detected_at - 1) == switch
    assert watch.lost_txid("pg", 109, switch.detected_at - 1) is None
    assert watch.lost_txid("pg", 111, switch.detected_at + 1) is None  # decided after it
    # a restart reads the record: the same timeline is no switch
    again = FailoverWatch("n1", store)
    assert again.changed("pg", 2, 130) == "same" and again.current("pg") == 2
    # a watch that only looks records nothing and never reports a change
    looker = FailoverWatch("n1", store, writable=False)
    assert looker.changed("pg", 9, 1) == "same" and looker.current("pg") == 9
    assert store.load("n1")["pg"].timeline == 2


def test_the_failover_fact() -> None:
    before = ResourceTimeline(1, 10.0)
    switched = before.with_switch(Switch(1, 2, 50.0, 300))
    assert switched_since([switched], 40.0, 2) and not switched_since([switched], 60.0, 2)
    # a node that never saw the new timeline prepared whatever it has on the old one
    assert switched_since([before], 60.0, 2) and not switched_since([before], 60.0, 1)
    assert covered(100.0, 50.0) and not covered(52.0, 50.0)  # a few seconds of skew
    never = ResourceTimeline(1, 1.0)
    assert after_failover([never], 5.0, 1, lambda: True, lambda: 0.0) == "none"
    assert after_failover([switched], 40.0, 2, lambda: True, lambda: 99.0) == "commit"
    assert after_failover([switched], 40.0, 2, lambda: False, lambda: 0.0) == "none"
    assert after_failover([switched], 40.0, 2, lambda: False, lambda: 39.0) == "unknown"


def test_records_survive_a_round_trip(tmp_path: Path) -> None:
    loss = Loss("xatm.n.1", 5, 1.5, "lost", "why")
    record = ResourceTimeline(1, 2.0).with_switch(Switch(1, 2, 3.0, 4, None, 5.0, 1.0, 7, (loss,)))
    store = FileTimelines(tmp_path)
    store.save("n", "pg", record)
    assert store.load("n") == {"pg": record}
    assert store.every_node() == {"n": {"pg": record}}
    (tmp_path / "n" / "timelines").write_text("not json")
    assert store.load("n") == {}  # unreadable: no record (never an error)


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def ha_pair(servers: Any) -> Iterator[PostgresPair]:
    """An asynchronous primary + standby, shared by this module's tests (each test that
    fails it over gets a new standby afterwards)."""
    if servers.set is None:
        pytest.skip("external servers: no private primary and standby")
    base = make_basedir("xatm-test-ha-")
    pair = start_pair(base, "ha", synchronous=False)
    try:
        yield pair
    finally:
        pair.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ha(ha_pair: PostgresPair) -> Iterator[PostgresPair]:
    ha_pair.replication.resume()
    if ha_pair.standby is None:
        ha_pair.rebuild_standby()
    yield ha_pair
    ha_pair.replication.resume()


_numbers = iter(range(1, 10**6))


@pytest.fixture
def books(ha: PostgresPair, servers: Any) -> Iterator[Bank]:
    """Account tables on the pair (through its proxy) and on MariaDB."""
    bank = Bank({"pg": ha.url(), "maria": servers.urls["maria"]}, f"fo_{next(_numbers)}")
    bank.create(accounts=4, balance=1000)
    ha.wait_replayed()
    try:
        yield bank
    finally:
        bank.close()


def transfer(tm: TransactionManager, bank: Bank, tid: str) -> str:
    with tm.transaction() as tx:
        tx.execute("pg", f"UPDATE {bank.table} SET bal = bal - 10 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 10 WHERE id = 1")
        for r in ("pg", "maria"):
            tx.execute(r, f"INSERT INTO {bank.journal} (tid) VALUES (%s)", (tid,))
    return tx.gtrid


def fail_over(pair: PostgresPair, bank: Bank) -> None:
    pair.fail_over()
    pair.replication.resume()
    bank.reconnect("pg")


def settle(tm: TransactionManager, passes: int = 4) -> list[Any]:
    """Recovery passes until one reaches every resource (a pooled connection to the old
    primary costs a pass)."""
    reports = []
    for _ in range(passes):
        reports.append(tm.recover())
        if not reports[-1].unreachable:
            break
    return reports


def indoubt(tm: TransactionManager) -> Any:
    """``tm.indoubt()`` once every resource answers (a pooled connection to the old
    primary costs an attempt)."""
    for _ in range(4):
        report = tm.indoubt()
        if not report.unreachable:
            return report
    raise AssertionError(report.unreachable)


def test_a_failover_is_detected_and_recorded(
    ha: PostgresPair, books: Bank, make_tm: MakeTM, tmp_path: Path, caplog: Any
) -> None:
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    tm = make_tm(node_id="fo-detect", resources=urls, sweeper=False)
    transfer(tm, books, "d-1")
    store = FileTimelines(tmp_path / "log")
    before = store.load("fo-detect")["pg"]
    assert before.timeline == ha.timeline() and before.switches == ()
    caplog.set_level(logging.WARNING, "xatm.failover")
    fail_over(ha, books)
    settle(tm)  # its connections find the new primary
    (switch,) = store.load("fo-detect")["pg"].switches
    assert (switch.old, switch.new) == (before.timeline, before.timeline + 1)
    assert switch.next_xid is not None and switch.checked_at is not None
    assert "FAILOVER" in caplog.text
    transfer(tm, books, "d-2")  # and work goes on
    tm.close()
    # a manager started later finds the same timeline: no new switch
    again = make_tm(node_id="fo-detect", resources=urls, sweeper=False)
    transfer(again, books, "d-3")
    assert len(store.load("fo-detect")["pg"].switches) == 1


def test_a_failover_while_the_node_is_down_is_detected_at_its_start(
    ha: PostgresPair, books: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    tm = make_tm(node_id="fo-down", resources=urls, sweeper=False)
    transfer(tm, books, "x-1")
    tm.close()
    fail_over(ha, books)
    make_tm(node_id="fo-down", resources=urls, sweeper=False)  # its identity lock connects
    (switch,) = FileTimelines(tmp_path / "log").load("fo-down")["pg"].switches
    assert switch.new == ha.timeline()


def _resurrect(
    ha: PostgresPair, books: Bank, tm: TransactionManager, at_step: dict[str, Callable[[], None]]
) -> str:
    """A transfer whose PREPARE the standby replayed, but not its COMMIT PREPARED: the
    primary crashes after the transaction ended (END written), the standby is promoted."""

    def hold_replication() -> None:
        ha.wait_replayed()  # the PREPARE is on the standby
        ha.replication.pause()  # what follows (COMMIT PREPARED) is not

    at_step["after_prepare"] = hold_replication
    gtrid = transfer(tm, books, "r-1")
    tm.context.log.flush()  # the END is written: the decision is no longer pending
    assert gtrid not in tm.context.log.pending()
    fail_over(ha, books)
    assert [x.gtrid for x in books.xatm_prepared_on("pg")] == [gtrid]  # it came back
    return gtrid


@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_a_branch_a_failover_brings_back_is_committed(
    ha: PostgresPair,
    books: Bank,
    make_tm: MakeTM,
    at_step: dict[str, Callable[[], None]],
    log_kind: str,
    log_url: str,
) -> None:
    """Asynchronous replication lost a COMMIT PREPARED: the branch is prepared again on the
    new primary, its decision long ended. Presumed abort would roll it back while MariaDB
    has committed (a split xatm made); the retained decision commits it instead. With the
    shared log, the ended row is what is retained, and the node's timelines are rows too."""
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    extra: dict[str, Any] = {"log": log_url} if log_kind == "shared" else {}
    tm = make_tm(node_id=f"fo-back-{log_kind}", resources=urls, sweeper=False, **extra)
    gtrid = _resurrect(ha, books, tm, at_step)
    plan = indoubt(tm)
    assert [t.gtrid for t in plan] == [gtrid]
    assert plan.transactions[0].plan.startswith("commit")
    reports = settle(tm)
    commits = [a for r in reports for a in r.actions if a.action == "commit"]
    assert [(a.gtrid, a.resource) for a in commits] == [(gtrid, "pg")]
    if log_kind == "file":  # the shared log finds the ended row like any other decision
        assert "failover" in commits[0].reason
    assert books.journal_ids() == {"pg": {"r-1"}, "maria": {"r-1"}}
    assert books.xatm_prepared() == {"pg": [], "maria": []}


def test_a_branch_older_than_the_retained_decisions_is_left_in_doubt(
    ha: PostgresPair,
    books: Bank,
    make_tm: MakeTM,
    at_step: dict[str, Callable[[], None]],
    tmp_path: Path,
) -> None:
    """The same, with no decisions retained: nothing can tell whether the branch was
    decided COMMIT, so it is left in doubt (never presumed aborted)."""
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    tm = make_tm(
        node_id="fo-gone", resources=urls, sweeper=False, decision_retention=0, segment_bytes=4096
    )
    gtrid = _resurrect(ha, books, tm, at_step)
    for i in range(40):  # rotate the log: the segment holding the decision goes
        tm.context.log.log_commit(f"xatm.fo-gone.{i:027x}", ["pg"])
        tm.context.log.log_end(f"xatm.fo-gone.{i:027x}")
    tm.context.log.flush()
    reports = settle(tm)
    left = [a for r in reports for a in r.actions if a.gtrid == gtrid]
    assert left and all(a.action == "skip" and a.outcome == "left" for a in left)
    assert "failed over" in left[-1].reason
    assert "left prepared" in indoubt(tm).transactions[0].plan
    assert [x.gtrid for x in books.xatm_prepared_on("pg")] == [gtrid]
    # the operator, who knows it committed (MariaDB has it), commits it by hand
    tm.resolve(gtrid, "commit", force=True, actor="test")
    assert books.journal_ids() == {"pg": {"r-1"}, "maria": {"r-1"}}


@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_the_report_lists_what_the_failover_lost(
    ha: PostgresPair, books: Bank, make_tm: MakeTM, tmp_path: Path, log_kind: str, log_url: str
) -> None:
    """Transfers committed while the standby got nothing are lost by the promotion: each is
    reported as a heuristic outcome (certain: their transaction ids were never assigned on
    the new primary), in the audit trail, the metrics and ``xatm indoubt --lost``; a
    transfer the standby had is not."""
    from xatm import prometheus

    collector = prometheus.collector()
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    node = f"fo-lost-{log_kind}"
    log = log_url if log_kind == "shared" else str(tmp_path / "log")
    tm = make_tm(node_id=node, resources=urls, sweeper=False, log=log)
    transfer(tm, books, "kept")
    ha.wait_replayed()
    ha.replication.pause()
    lost = [transfer(tm, books, f"lost-{i}") for i in range(3)]
    tm.context.log.flush()
    fail_over(ha, books)
    reports = settle(tm)
    heuristics = [a for r in reports for a in r.actions if a.action == "heuristic"]
    assert sorted(a.gtrid for a in heuristics) == sorted(lost)
    assert all("lost in the failover" in a.reason for a in heuristics)
    assert sum(r.heuristics for r in reports) == 3
    assert books.journal_ids()["pg"] == {"kept"}  # what PostgreSQL lost
    assert {"lost-0", "lost-1", "lost-2"} <= books.journal_ids()["maria"]
    audited = [e for e in tm.audit_trail() if e.action == "heuristic" and e.node == node]
    assert sorted(e.gtrid for e in audited) == sorted(lost)
    report = indoubt(tm)
    assert sorted((x.gtrid, x.status) for x in report.possibly_lost if x.node == node) == sorted(
        (g, "lost") for g in lost
    )
    value = collector.failover_losses.labels(node, "pg", "lost")._value.get()
    assert value == 3
    # the checked switch is not checked again
    assert tm.recover().heuristics == 0
    config = tmp_path / "xatm.toml"
    config.write_text(
        f'node_id = "{node}-cli"\nlog = "{log}"\n'
        + "".join(f'[resources.{n}]\nurl = "{u}"\n' for n, u in urls.items())
    )
    result = CliRunner().invoke(main, ["--config", str(config), "indoubt", "--lost", "--json"])
    assert result.exit_code == 0, result.output
    listed = [r["gtrid"] for r in json.loads(result.output) if r["node"] == node]
    assert sorted(listed) == sorted(lost)
    human = CliRunner().invoke(main, ["--config", str(config), "indoubt"])
    assert "LOST" in human.output and lost[0] in human.output


def test_reused_transaction_ids_are_told_as_far_as_they_can_be(
    ha: PostgresPair, books: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """Another client writes on the new primary before this process reaches it, and so
    takes the transaction ids the lost transfers had on the old primary: one it committed
    reads as committed (not reported: the documented limit), one it rolled back reads as
    lost (certain), one it holds prepared as possibly lost (unknown)."""
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    tm = make_tm(node_id="fo-reuse", resources=urls, sweeper=False)
    transfer(tm, books, "before")
    ha.wait_replayed()
    ha.replication.pause()
    lost = [transfer(tm, books, f"gone-{i}") for i in range(3)]
    tm.close()
    fail_over(ha, books)
    other = connect(ha.url())
    try:
        run(other, f"INSERT INTO {books.journal} VALUES ('other-1')")  # takes the 1st id
        run(other, "BEGIN")
        run(other, f"INSERT INTO {books.journal} VALUES ('other-2')")  # the 2nd, rolled back
        run(other, "ROLLBACK")
        run(other, "BEGIN")
        run(other, f"INSERT INTO {books.journal} VALUES ('other-3')")  # the 3rd, held
        run(other, "PREPARE TRANSACTION 'fo-reuse-other'")
        again = make_tm(node_id="fo-reuse", resources=urls, sweeper=False)
        settle(again)
        found = {x.gtrid: x.status for x in indoubt(again).possibly_lost}
        # the one another client's commit reused reads as committed, unless the new
        # timeline's first checkpoint already bounds the promotion below it
        assert found.get(lost[0]) in (None, "lost")
        assert found[lost[1]] == "lost"  # certain: that id is aborted there
        assert found[lost[2]] in ("unknown", "lost")  # another's prepared transaction
    finally:
        with psycopg.connect(ha.url(), autocommit=True) as c:
            c.execute("ROLLBACK PREPARED 'fo-reuse-other'")
        other.close()
    assert parse_gtrid(lost[0])[0] == "fo-reuse"


def test_doctor_warns_of_asynchronous_standbys_and_weak_commits(
    ha: PostgresPair, make_tm: MakeTM
) -> None:
    def findings(url: str) -> dict[str, Any]:
        tm = make_tm(node_id=f"fo-doc-{next(_numbers)}", resources={"pg": url}, sweeper=False)
        report = tm.doctor()
        tm.close()
        return {c.name: c for c in report.checks if c.subject == "pg"}

    found = findings(ha.url())
    assert found["standbys"].advice and "asynchronously" in found["standbys"].detail
    # the shared log's database, replicated the same way, can lose COMMIT decisions
    tm = make_tm(node_id=f"fo-doc-{next(_numbers)}", log=ha.url(), sweeper=False)
    log = {c.name: c for c in tm.doctor().checks if c.subject == "log"}
    tm.close()
    assert log["shared-log"].ok and log["standbys"].advice
    assert "lose COMMIT decisions" in log["standbys"].detail
    assert not found["synchronous-commit"].advice
    weak = findings(ha.url() + "?options=-c%20synchronous_commit%3Dlocal")
    assert weak["synchronous-commit"].advice and "= local" in weak["synchronous-commit"].detail
    admin = psycopg.connect(ha.primary.admin_dsn(), autocommit=True)
    try:
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        admin.execute("SELECT pg_reload_conf()")
        hidden = findings(ha.url())  # this role cannot see sync_state
        assert not hidden["standbys"].advice and "pg_monitor" in hidden["standbys"].detail
        admin.execute("GRANT pg_monitor TO xatm")
        shown = findings(ha.url())
        assert not shown["standbys"].advice and "1 synchronous standby" in shown["standbys"].detail
    finally:
        admin.execute("REVOKE pg_monitor FROM xatm")
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")
        admin.close()


def test_the_asyncio_manager_detects_a_failover_too(
    ha: PostgresPair, books: Bank, tmp_path: Path
) -> None:
    import asyncio

    from xatm.aio import AsyncTransactionManager

    urls = {"pg": ha.url(), "maria": books.urls["maria"]}

    async def go() -> None:
        async with AsyncTransactionManager(
            resources=urls, log=tmp_path / "alog", node_id="fo-aio", sweeper=False
        ) as tm:
            async with tm.transaction() as tx:
                await tx.execute("pg", f"INSERT INTO {books.journal} VALUES ('a-1')")
                await tx.execute("maria", f"INSERT INTO {books.journal} VALUES ('a-1')")
            fail_over(ha, books)
            for _ in range(4):  # the pooled connection to the old primary costs a try
                try:
                    async with tm.transaction() as tx:
                        await tx.execute("pg", f"INSERT INTO {books.journal} VALUES ('a-2')")
                        await tx.execute("maria", f"INSERT INTO {books.journal} VALUES ('a-2')")
                    break
                except Exception:
                    await asyncio.sleep(0.2)

    asyncio.run(go())
    (switch,) = FileTimelines(tmp_path / "alog").load("fo-aio")["pg"].switches
    assert switch.new == ha.timeline() and switch.next_xid is not None


def test_a_retention_must_be_a_number(make_tm: MakeTM) -> None:
    from xatm import ConfigurationError

    with pytest.raises(ConfigurationError, match="decision_retention"):
        make_tm(node_id="fo-bad", decision_retention=-1)


def _decided_then_paused(
    ha: PostgresPair, books: Bank, log: Path | str, node: str, tid: str
) -> tuple[dict[str, str], dict[str, Any], str]:
    """A transfer between the pair's primary and MariaDB whose coordinator (node ``node``,
    log ``log``) is SIGKILLed after its COMMIT decision, its PREPARE replayed on the
    standby, and replication then paused: the resources' URLs, a manager's log keyword
    for the shared log, and the gtrid."""
    urls = {"pg": ha.url(), "maria": books.urls["maria"]}
    extra: dict[str, Any] = {"log": log} if isinstance(log, str) else {}
    gtrid = crash(books, log, node, "after_decision", ("pg", "maria"), tid, urls=urls)
    ha.wait_replayed()  # the PREPARE is on the standby
    ha.replication.pause()  # what comes next is not
    return urls, extra, gtrid


@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_a_branch_a_failover_brings_back_after_a_hand_rollback_is_not_committed(
    ha: PostgresPair,
    books: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    log_kind: str,
    log_url: str,
) -> None:
    """An operator rolled back by hand (forced) a transaction decided COMMIT, on both
    databases; asynchronous replication lost PostgreSQL's ROLLBACK PREPARED, and the
    standby is promoted: the branch is prepared again. Committing it from the retained
    decision would split the transaction (MariaDB's branch is rolled back): the decision
    was overruled, so recovery rolls it back again."""
    urls, extra, gtrid = _decided_then_paused(
        ha, books, tmp_path / "log" if log_kind == "file" else log_url, f"fo-heur-{log_kind}", "hr"
    )
    ops = make_tm(node_id=f"fo-ops-{log_kind}", resources=urls, sweeper=False, **extra)
    res = ops.resolve(gtrid, "rollback", force=True, actor="cli:test")
    assert (
        res.complete
        and res.overruled
        and {a.resource for a in res.actions if a.action == "rollback"}
        == {
            "pg",
            "maria",
        }
    )
    fail_over(ha, books)
    assert [x.gtrid for x in books.xatm_prepared_on("pg")] == [gtrid]  # it came back
    reports = settle(ops)
    acted = [
        (a.resource, a.action)
        for r in reports
        for a in r.actions
        if a.gtrid == gtrid and a.action in ("commit", "rollback")
    ]
    assert acted == [("pg", "rollback")]
    assert books.journal_ids() == {"pg": set(), "maria": set()}
    assert books.xatm_prepared() == {"pg": [], "maria": []}


@pytest.mark.parametrize("log_kind", ["file", "shared"])
def test_a_failover_in_the_middle_of_a_hand_rollback_brings_nothing_to_commit(
    ha: PostgresPair,
    books: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    log_kind: str,
    log_url: str,
) -> None:
    """The hand rollback of a transaction decided COMMIT stops half-way: PostgreSQL's branch
    is rolled back (replication does not carry it), MariaDB does not answer. Then the
    standby is promoted, bringing PostgreSQL's branch back prepared, and MariaDB answers
    again. Both faults together: recovery rolls both branches back, as the operator asked,
    and commits nothing (the overrule was durable before any branch was touched)."""
    urls, extra, gtrid = _decided_then_paused(
        ha, books, tmp_path / "log" if log_kind == "file" else log_url, f"fo-half-{log_kind}", "hh"
    )
    proxy = BlackholeProxy(urls["maria"])
    proxy.blackhole()  # MariaDB does not answer the operator
    try:
        ops = make_tm(
            node_id=f"fo-half-ops-{log_kind}",
            resources={**urls, "maria": proxy.url},
            timeout=3,
            sweeper=False,
            **extra,
        )
        res = ops.resolve(gtrid, "rollback", force=True, actor="cli:test")
        assert res.overruled and not res.complete
        assert [(a.resource, a.action) for a in res.actions if a.outcome == "done"] == [
            ("pg", "rollback")
        ]
        assert [r for r, _ in res.unreachable] == ["maria"]
    finally:
        proxy.close()
    ops.close()
    fail_over(ha, books)
    assert [x.gtrid for x in books.xatm_prepared_on("pg")] == [gtrid]  # it came back
    tm = make_tm(node_id=f"fo-half-rec-{log_kind}", resources=urls, sweeper=False, **extra)
    acted = sorted(
        (a.resource, a.action)
        for r in settle(tm)
        for a in r.actions
        if a.gtrid == gtrid and a.action in ("commit", "rollback")
    )
    assert acted == [("maria", "rollback"), ("pg", "rollback")]
    assert books.journal_ids() == {"pg": set(), "maria": set()}
    assert books.xatm_prepared() == {"pg": [], "maria": []}


# ------------------------------------------ a failover of the shared log's own database


def _half_committed(bank: Bank, log: str, node: str, tid: str) -> tuple[str, str]:
    """A coordinator on ``log`` decides COMMIT of transfer ``tid``, commits one branch and is
    SIGKILLed before the other's: (its gtrid, the resource left prepared)."""
    gtrid = crash(bank, log, node, "after_first_commit", ("pg1", "maria"), tid, parallel=False)
    [committed] = [r for r in ("pg1", "maria") if bank.journal_ids()[r] == {tid}]
    [prepared] = [r for r in ("pg1", "maria") if r != committed]
    return gtrid, prepared


def test_a_failover_of_the_shared_logs_database_that_lost_a_decision_splits_nothing(
    ha: PostgresPair, bank: Bank, make_tm: MakeTM, caplog: Any
) -> None:
    """The shared log's database is the pair (asynchronous). A coordinator decides COMMIT,
    commits one branch and is SIGKILLed before the other's; its COMMIT row never reached the
    standby, which is then promoted. The log holds no decision any more: presuming the
    transaction aborted would roll the other branch back while the first is committed. Recovery
    finds the log's database on a new timeline, leaves the branch prepared, in doubt, and
    says why; the operator commits it by hand, and the books balance."""
    log = ha.url()
    first = make_tm(node_id="fo-log-first", log=log, sweeper=False)
    first.close()  # the log's schema, and the timeline it runs on, are on the standby
    ha.wait_replayed()
    ha.replication.pause()
    gtrid, prepared = _half_committed(bank, log, "fo-log-dead", "lf")
    ha.fail_over()
    ha.replication.resume()
    caplog.set_level(logging.WARNING)
    tm = make_tm(node_id="fo-log-rec", log=log, sweeper=False)
    rolled = [
        a for r in settle(tm) for a in r.actions if a.gtrid == gtrid and a.action == "rollback"
    ]
    assert rolled == []  # no split
    assert [x.gtrid for x in bank.xatm_prepared_on(prepared)] == [gtrid]
    assert "shared log" in caplog.text and "failed over" in caplog.text
    [txn] = [t for t in indoubt(tm).transactions if t.gtrid == gtrid]
    assert "failed over" in str(txn)
    for outcome in ("rollback", "commit"):  # neither without --force: nothing here can tell
        with pytest.raises(ResolutionRefused, match="failed over"):
            tm.resolve(gtrid, outcome, actor="cli:test")
    res = tm.resolve(gtrid, "commit", force=True, actor="cli:test")
    assert res.complete
    assert bank.journal_ids()[prepared] == {"lf"}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_a_failover_before_the_logs_first_timeline_reached_the_standby_is_seen(
    ha: PostgresPair, bank: Bank, make_tm: MakeTM, caplog: Any
) -> None:
    """As above, but the log's record of the timeline it runs on had not reached the
    standby either (the log's first start right before the failover; made here by deleting
    the records everywhere before replication stops). On the new primary the new timeline
    would pass for the first one and the failover for none. A process that found the old
    timeline records it again when its next session finds the new one, so recovery still
    leaves the transaction in doubt instead of splitting it."""
    log = ha.url()
    make_tm(node_id="fo-base-first", log=log, sweeper=False).close()  # the schema, replicated
    conn = connect(log)
    try:
        run(conn, "DELETE FROM xatm.meta WHERE key LIKE 'log_timeline:%'")
    finally:
        conn.close()
    ha.wait_replayed()
    ha.replication.pause()
    tm = make_tm(node_id="fo-base-rec", log=log, sweeper=False)  # finds the old timeline
    gtrid, prepared = _half_committed(bank, log, "fo-base-dead", "lb")
    ha.fail_over()
    ha.replication.resume()
    caplog.set_level(logging.WARNING)
    rolled = [
        a for r in settle(tm) for a in r.actions if a.gtrid == gtrid and a.action == "rollback"
    ]
    assert rolled == []  # no split
    assert [x.gtrid for x in bank.xatm_prepared_on(prepared)] == [gtrid]
    assert "shared log" in caplog.text and "failed over" in caplog.text
    res = tm.resolve(gtrid, "commit", force=True, actor="cli:test")
    assert res.complete
    assert bank.journal_ids()[prepared] == {"lb"}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


_after_debit: list[Callable[[], None]] = []


def _debit_then(tx: Any, d: dict[str, Any]) -> None:
    """The transfer's debit, then what the test put in ``_after_debit`` (once)."""
    saga_defs.debit(tx, d)
    while _after_debit:
        _after_debit.pop()()


logfo = Saga("logfo", backoff=0.01, max_backoff=0.1)
logfo.step("debit", action=_debit_then, compensation=saga_defs.refund, resources=["pg1"])
logfo.step("credit", action=saga_defs.credit, compensation=saga_defs.uncredit, resources=["maria"])
logfo.step("finish", action=saga_defs.finish, resources=["pg1"])


def test_a_saga_whose_record_a_failover_of_the_store_lost_runs_to_its_end(
    ha: PostgresPair, bank: Bank, make_tm: MakeTM, caplog: Any
) -> None:
    """The saga store is the shared log on the pair (asynchronous). A saga's record is
    written while replication is paused; during its first step the store's database fails
    over, so the new primary has no record of it and the runner's sessions are cut. The
    runner, alive, writes its record again on the new primary and runs the saga to its end:
    each step once, its state recorded, the loss logged. (Before: its next write found no
    row, raised SagaTakenOver, and the debit stayed without its credit, recorded nowhere.)"""
    tm = make_tm(node_id="fo-saga", log=ha.url(), timeout=30, sweeper=False, sagas=[logfo])
    data = {"table": bank.table, "journal": bank.journal, "src": 1, "dst": 2, "amt": 5}
    assert tm.run_saga("logfo", data={**data, "tid": "warm"}).state == "completed"
    ha.wait_replayed()
    ha.replication.pause()
    _after_debit.append(lambda: (ha.fail_over(), ha.replication.resume()))
    caplog.set_level(logging.WARNING, logger="xatm")  # a CLI test may have raised it
    promotions = ha.promotions
    result = tm.run_saga("logfo", data={**data, "tid": "sf"})
    assert result.state == "completed", result
    assert ha.promotions == promotions + 1
    ids = bank.journal_ids()
    assert {t for t in ids["pg1"] if t.startswith("sf-")} == {"sf-debit", "sf-finish"}
    assert {t for t in ids["maria"] if t.startswith("sf-")} == {"sf-credit"}
    assert bank.total() == bank.initial_total
    record = tm.saga(result.saga_id)
    assert record is not None and record.state == "completed"
    assert "was gone from the saga store" in caplog.text


def test_a_saga_whose_record_a_failover_lost_after_it_ran_is_reported(
    ha: PostgresPair, bank: Bank, make_tm: MakeTM, caplog: Any
) -> None:
    """A saga runs to its end while the store's replication is paused, then the store's
    database fails over: the new primary has no record of it, and no runner is left to write
    it again. Recovery cannot finish or compensate what it does not know; after the
    failover it reads the barrier rows of the time before it and reports the saga, at
    ERROR and in the pass's report, with the steps that ran, and records it as failed, so
    that operators see it with the other sagas and nobody reports it again."""
    tm = make_tm(node_id="fo-saga-lost", log=ha.url(), timeout=30, sweeper=False, sagas=[logfo])
    data = {"table": bank.table, "journal": bank.journal, "src": 1, "dst": 2, "amt": 5}
    kept = tm.run_saga("logfo", data={**data, "tid": "kept"})
    ha.wait_replayed()
    ha.replication.pause()
    gone = tm.run_saga("logfo", data={**data, "tid": "gone"})
    assert kept.state == gone.state == "completed"
    ha.fail_over()
    ha.replication.resume()
    caplog.set_level(logging.ERROR, logger="xatm")
    for _ in range(3):  # a log session the failover cut costs a pass
        with contextlib.suppress(LogError):
            report = tm.recover_sagas()
            if report.lost:
                break
    lost = dict(report.lost)
    assert kept.saga_id not in lost
    assert lost[gone.saga_id] == ("maria: credit action, pg1: debit action, pg1: finish action"), (
        report
    )
    assert f"saga {gone.saga_id}: its record is gone" in caplog.text
    record = tm.saga(gone.saga_id)  # recorded again, final, saying what ran
    assert record is not None and record.state == "failed" and "debit action" in record.error
    other = make_tm(node_id="fo-saga-lost-2", log=ha.url(), sweeper=False, sagas=[logfo])
    assert not other.recover_sagas().lost  # said once, by the first process that looked
