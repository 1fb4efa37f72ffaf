"""The read-side view of the coordinator logs (xatm.log.view): the same questions asked of a
directory of file logs and of the shared PostgreSQL log, answered by the real logs.

Each world has this process's node (``me``, its log open here), a live peer (``live``, its
log held open: by another FileLog, or another session's node lock), a dead peer (``dead``,
its log closed with a COMMIT pending) and a node nothing is known of (``ghost``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, MakeTM, Servers
from tests.support.recovery import crash, prepared_gtrids
from xatm import LogLocked
from xatm.admin import ResolutionRefused
from xatm.core.xid import new_gtrid
from xatm.log import view as _log_view
from xatm.log.audit import AuditTrail, SharedAuditTrail
from xatm.log.base import CoordinatorLog
from xatm.log.file import FileLog, owner_state
from xatm.log.node_markers import record as record_markers
from xatm.log.shared import PostgresLog
from xatm.log.view import FileLogs, LogView, SharedLogs
from xatm.ops import resolve as _resolve

_n = itertools.count(1)


@dataclass
class World:
    kind: str
    view: LogView
    me: CoordinatorLog
    g: dict[str, str]  # role -> gtrid with a COMMIT pending (me, live, dead), or not (ghost)
    opened: list[Any] = field(default_factory=list)
    #: opens node ``dead``'s log again (a recovery pass holding it, say)
    reopen_dead: Callable[[], Any] | None = None


@pytest.fixture(params=["file", "shared"])
def world(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers) -> Iterator[World]:
    kind = str(request.param)
    opened: list[Any] = []
    g = {n: new_gtrid(n) for n in ("me", "live", "dead", "ghost")}
    if kind == "file":
        directory = tmp_path / "log"

        def open_log(node: str) -> Any:
            log = FileLog(directory, node)
            opened.append(log)
            return log

    else:
        schema = f"xatmview_{os.getpid()}_{next(_n)}"
        url = servers.urls["pg2"]

        def open_log(node: str) -> Any:
            log = PostgresLog(url, node, schema=schema)
            opened.append(log)
            return log

    me, live, dead = open_log("me"), open_log("live"), open_log("dead")
    for node, log in (("me", me), ("live", live), ("dead", dead)):
        log.log_commit(g[node], ["pg1", "maria"])
    dead.close()  # the dead peer's lock is free, its COMMIT pending
    if kind == "file":
        record_markers(directory / "dead", ["pg1"])
        AuditTrail(directory, "me").record(g["dead"], "pg1", "pg1", "rollback", "r", "done", "t")
        view: LogView = FileLogs(directory, own_node="me", own_log=me, own_pending=me.pending)
    else:
        SharedAuditTrail(me, "me").record(g["dead"], "pg1", "pg1", "rollback", "r", "done", "t")
        view = SharedLogs(me, own_node="me")
    w = World(kind, view, me, g, opened, lambda: open_log("dead"))
    yield w
    for log in opened:
        log.close()


OWNERS = {
    # node: (file log, shared log)
    "me": ("this-process", "this-process"),
    "live": ("alive", "alive"),
    "dead": ("dead", "dead"),
    "ghost": ("unknown", "dead"),  # the shared log cannot tell "never seen" from "dead"
}


@pytest.mark.parametrize("node", sorted(OWNERS))
def test_owner(world: World, node: str) -> None:
    expected = OWNERS[node][0 if world.kind == "file" else 1]
    assert world.view.owner(node) == expected


PENDING = {
    # node: the pending COMMITs its log shows (file log); the shared log shows every node's
    "me": {"me"},
    "live": {"live"},  # read without the live coordinator's lock
    "dead": {"dead"},
    "ghost": set(),
}


@pytest.mark.parametrize("node", sorted(PENDING))
def test_pending(world: World, node: str) -> None:
    pending = world.view.pending(node, world.view.owner(node))
    if world.kind == "file":
        assert set(pending) == {world.g[n] for n in PENDING[node]}
    else:
        assert set(pending) == {world.g[n] for n in ("me", "live", "dead")}
    for gtrid, record in pending.items():
        assert record.gtrid == gtrid and tuple(record.branches) == ("pg1", "maria")


def test_every_pending(world: World) -> None:
    asked: list[str] = []

    def node_pending(node: str) -> Any:
        asked.append(node)
        return world.view.pending(node, world.view.owner(node))

    every = world.view.every_pending(node_pending)
    found = {g for pending in every for g in pending}
    assert found == {world.g[n] for n in ("me", "live", "dead")}
    # a file log is read node by node through the caller; the shared log is one table
    assert asked == (["dead", "live", "me"] if world.kind == "file" else [])


def test_aborted_fenced_and_markers(world: World) -> None:
    view = world.view
    assert not view.aborted(world.g["ghost"]) and not view.aborted(world.g["dead"])
    with view.open_for_decision("ghost", view.owner("ghost"), 0.1) as opened:
        answer = opened.fence_abort(world.g["ghost"], by="test")
        decided = opened.decision(world.g["ghost"])
    if world.kind == "file":  # presumed abort writes nothing there
        assert (answer, decided, view.aborted(world.g["ghost"])) == (None, None, False)
        assert view.marker_resources("dead") == frozenset({"pg1"})
        assert view.marker_resources("live") is None
    else:
        assert (answer, decided, view.aborted(world.g["ghost"])) == ("A", "A", True)
        with view.open_for_decision("dead", "dead", 0.1) as opened:
            assert opened.fence_abort(world.g["dead"], by="test") == "C"  # the COMMIT holds
        assert view.marker_resources("dead") is None


def test_audit(world: World) -> None:
    (entry,) = world.view.audit(world.g["dead"])
    assert (entry.action, entry.resource, entry.node) == ("rollback", "pg1", "me")
    assert world.view.audit(world.g["live"]) == []
    assert len(world.view.audit()) == 1


def test_node_files(world: World) -> None:
    view = world.view
    if world.kind == "shared":
        assert view.nodes() == [] and view.read("dead").segments == ()
        with view.take_over("dead", 0.0) as log:
            assert log is world.me  # nothing to take over: the table is written as it is
        return
    assert view.nodes() == ["dead", "live", "me"]
    snap = view.read("dead", strict=False)
    assert set(snap.pending) == {world.g["dead"]} and snap.segments
    with view.take_over("dead", 0.0) as log:
        assert owner_state(view.directory, "dead") == "alive"  # type: ignore[attr-defined]
        assert set(log.pending()) == {world.g["dead"]}
    assert view.owner("dead") == "dead"  # closed again
    with pytest.raises(LogLocked), view.take_over("live", 0.0):
        pass


DECISION_LOGS = {
    # owner: (a log is held to write, the pending COMMIT of the node is seen) for a file log
    "me": (True, True),
    "live": (False, True),  # read without its lock, nothing to write to
    "dead": (True, True),  # taken over for the duration
    "ghost": (False, False),
}


@pytest.mark.parametrize("node", sorted(DECISION_LOGS))
def test_open_for_decision(world: World, node: str) -> None:
    view = world.view
    owner = view.owner(node)
    held, seen = DECISION_LOGS[node] if world.kind == "file" else (True, node != "ghost")
    with view.open_for_decision(node, owner, 0.1) as opened:
        assert (opened.log is not None) == held
        found = opened.decision(world.g[node])
        assert (found is not None) == seen
        if seen:
            assert found is not None and found != "A" and found.gtrid == world.g[node]
        if world.kind == "file" and node == "dead":
            assert opened.log is not world.me and view.owner("dead") == "alive"
            assert opened.log is not None
            opened.log.log_end(world.g["dead"])
            opened.log.flush()
            assert opened.decision(world.g["dead"]) is None  # read again, not remembered
        if world.kind == "shared":
            assert opened.log is world.me
    if world.kind == "file" and node == "dead":
        assert view.owner("dead") == "dead"  # the taken-over log was closed
        assert world.g["dead"] not in view.read("dead").pending


def test_a_dead_nodes_log_held_elsewhere_is_refused(world: World) -> None:
    assert world.reopen_dead is not None
    world.reopen_dead()  # a recovery pass (file log) or a restarted coordinator holds it
    view = world.view
    if world.kind == "file":
        with pytest.raises(LogLocked), view.open_for_decision("dead", "dead", 0.1):
            pass
    else:  # the shared table needs no lock to be written: nothing is refused
        with view.open_for_decision("dead", "dead", 0.1) as opened:
            assert opened.decision(world.g["dead"]) is not None


def test_shared_view_needs_only_the_log(servers: Servers) -> None:
    log = PostgresLog(servers.urls["pg2"], "viewer", schema=f"xatmview_{os.getpid()}_solo")
    try:
        view = SharedLogs(log, own_node=None)
        assert view.shared
        assert view.owner("viewer") == "alive"  # no own node: its own session counts as live
    finally:
        log.close()


# -- manual resolution, which opens a node's log through the view --------------------------


def test_forced_commit_after_an_abort_in_the_shared_log_is_refused(
    bank: Bank, make_tm: MakeTM, log_url: str
) -> None:
    gtrid = crash(bank, log_url, "lvabort", "after_prepare", ("pg1", "maria"), "lv1")
    ops = make_tm(node_id="lvops1", log=log_url, sweeper=False)
    assert ops.shared_log is not None and ops.shared_log.log_abort(gtrid, by="test") == "A"
    with pytest.raises(ResolutionRefused) as refused:
        ops.resolve(gtrid, "commit", force=True, actor="test")
    assert str(refused.value) == (
        f"refused to commit {gtrid}: an ABORT decision is logged in the shared log (a sweeper"
        " aborted it); it cannot be committed any more"
    )
    assert gtrid in prepared_gtrids(bank)["pg1"]  # nothing was touched
    res = ops.resolve(gtrid, "rollback", actor="test")
    assert res.complete and res.decision == "abort" and res.owner == "dead"
    assert not any(gtrid in v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total


def test_forced_rollback_under_a_live_owner_fences_the_shared_log_first(
    bank: Bank, make_tm: MakeTM, log_url: str
) -> None:
    gtrid = crash(bank, log_url, "lvlive", "after_prepare", ("pg1", "maria"), "lv2", account=2)
    make_tm(node_id="lvlive", log=log_url, sweeper=False)  # its coordinator is back
    ops = make_tm(node_id="lvops2", log=log_url, sweeper=False)
    with pytest.raises(ResolutionRefused, match="is alive"):
        ops.resolve(gtrid, "rollback", actor="test")
    res = ops.resolve(gtrid, "rollback", force=True, actor="test")
    assert res.forced and res.owner == "alive" and res.complete
    assert any(
        "forced although its coordinator is alive" in n and "'lvlive'" in n for n in res.notes
    )
    assert ops.shared_log is not None
    assert ops.shared_log.decisions([gtrid]) == {gtrid: "A"}  # a late COMMIT now loses
    actions = [(e.action, e.reason) for e in ops.audit_trail(gtrid)]
    assert ("decide", "manual rollback: ABORT decision logged") in actions
    assert [a for a, _ in actions].count("rollback") == 2
    assert not any(gtrid in v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total


def test_a_dead_nodes_file_log_held_by_another_process_is_refused(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is taken between the probe and the take-over (a recovery pass, or the
    coordinator restarting): a forced commit is refused after TAKE_OVER_WAIT, nothing
    touched. (The probe says "dead" for the planning dry run too: it plans a rollback.)"""
    log = tmp_path / "log"
    gtrid = crash(bank, log, "lvheld", "after_prepare", ("pg1", "maria"), "lv3", account=3)
    ops = make_tm(node_id="lvops3", log=log, sweeper=False)
    holder = FileLog(log, "lvheld")  # someone else took the log
    try:
        probe = _log_view.owner_state
        monkeypatch.setattr(  # the probe ran just before the lock was taken
            _log_view, "owner_state", lambda d, n: "dead" if n == "lvheld" else probe(d, n)
        )
        monkeypatch.setattr(_resolve, "TAKE_OVER_WAIT", 0.2)
        with pytest.raises(ResolutionRefused) as refused:
            ops.resolve(gtrid, "commit", force=True, actor="test")
    finally:
        holder.close()
    assert str(refused.value) == (
        f"refused to commit {gtrid}: the log of 'lvheld' is held by another process (a"
        " recovery pass, or its coordinator restarting): try again in a moment"
    )
    assert gtrid in prepared_gtrids(bank)["pg1"] and gtrid in prepared_gtrids(bank)["maria"]
    assert ops.audit_trail(gtrid) == []  # refused before anything was done or overridden
    monkeypatch.undo()
    assert ops.resolve(gtrid, "rollback", actor="test").complete
    assert bank.total() == bank.initial_total


def test_forced_rollback_is_refused_while_another_session_writes_a_decision(
    bank: Bank, make_tm: MakeTM, log_url: str
) -> None:
    """A session is inserting the transaction's decision row and has not committed (its
    live coordinator's COMMIT batch): an operator's forced rollback cannot write the ABORT
    that would fence it ("busy"). Rolling back then could split the transaction when that
    COMMIT lands, so the rollback is refused and nothing is touched. Once the COMMIT has
    landed, the branches are committed."""
    import psycopg

    gtrid = crash(bank, log_url, "lvbusy", "after_prepare", ("pg1", "maria"), "lv5", account=3)
    make_tm(node_id="lvbusy", log=log_url, sweeper=False)  # its coordinator is back
    ops = make_tm(node_id="lvops5", log=log_url, sweeper=False)
    with psycopg.connect(log_url) as batch:  # the COMMIT batch, still open
        batch.execute(
            "INSERT INTO xatm.decisions (gtrid, node_id, decision, branches)"
            " VALUES (%s, 'lvbusy', 'C', %s)",
            (gtrid, '["pg1", "maria"]'),
        )
        with pytest.raises(ResolutionRefused, match="is alive"):
            ops.resolve(gtrid, "rollback", actor="test")
        with pytest.raises(ResolutionRefused) as refused:
            ops.resolve(gtrid, "rollback", force=True, actor="test")
        assert str(refused.value) == (
            f"refused to roll back {gtrid}: another session is writing a decision for it in"
            " the shared log right now (a COMMIT batch still open), so no ABORT could be"
            " logged to fence it; run the command again in a moment"
        )
        assert all(gtrid in prepared_gtrids(bank)[r] for r in ("pg1", "maria"))
        batch.commit()  # the COMMIT lands
    with pytest.raises(ResolutionRefused, match="is alive"):
        ops.resolve(gtrid, "rollback", actor="test")
    res = ops.resolve(gtrid, "commit", force=True, actor="test")  # what its coordinator does
    assert res.complete
    assert not any(gtrid in v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total
