"""The shared PostgreSQL coordinator log: decisions, fencing, node identity, group commit."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator

import pytest

from tests.support import Servers
from xatm import LogLocked
from xatm.core.xid import new_gtrid
from xatm.log.base import DecisionNotLogged
from xatm.log.shared import DecisionFenced, PostgresLog

_n = itertools.count(1)


@pytest.fixture
def schema() -> str:
    return f"xatmlog_{os.getpid()}_{next(_n)}"


@pytest.fixture
def open_log(servers: Servers, schema: str) -> Iterator[object]:
    logs: list[PostgresLog] = []

    def make(node_id: str, **kw: object) -> PostgresLog:
        log = PostgresLog(servers.urls["pg2"], node_id, schema=schema, **kw)  # type: ignore[arg-type]
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


def test_commit_end_and_pending(open_log) -> None:  # type: ignore[no-untyped-def]
    log = open_log("n1")
    g = new_gtrid("n1")
    log.log_commit(g, ["pg1", "maria"], {"pg1": 42})
    pending = log.pending()
    assert list(pending) == [g]
    assert pending[g].branches == ("pg1", "maria") and pending[g].txids == {"pg1": 42}
    other = open_log("n2")
    assert g in other.pending(all_nodes=True) and other.pending() == {}
    log.log_end(g)
    log.flush()
    assert log.pending() == {}


def test_abort_first_fences_the_commit(open_log) -> None:  # type: ignore[no-untyped-def]
    coordinator = open_log("c1")
    sweeper = open_log("s1")
    g = new_gtrid("c1")
    assert sweeper.log_abort(g, by="sweeper@s1") == "A"
    with pytest.raises(DecisionFenced):
        coordinator.log_commit(g, ["a", "b"])
    assert isinstance(DecisionFenced("x"), DecisionNotLogged)
    assert coordinator.decisions([g]) == {g: "A"}


def test_commit_first_wins_over_abort(open_log) -> None:  # type: ignore[no-untyped-def]
    coordinator = open_log("c1")
    sweeper = open_log("s1")
    g = new_gtrid("c1")
    coordinator.log_commit(g, ["a", "b"])
    assert sweeper.log_abort(g, by="sweeper@s1") == "C"
    record = sweeper.decisions([g])[g]
    assert not isinstance(record, str) and record.branches == ("a", "b")


def test_node_id_is_exclusive_and_shows_liveness(open_log) -> None:  # type: ignore[no-untyped-def]
    first = open_log("same")
    with pytest.raises(LogLocked):
        open_log("same")
    watcher = open_log("watcher")
    assert watcher.node_alive("same")
    first.close()
    assert not watcher.node_alive("same")
    open_log("same")  # free again


def test_group_commit_batches_concurrent_decisions(open_log) -> None:  # type: ignore[no-untyped-def]
    log = open_log("busy")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                log.log_commit(new_gtrid("busy"), ["a", "b"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert log.forced_records == 320
    assert log.forces < 320
    assert len(log.pending()) == 320


def test_schema_is_versioned_and_reopened(open_log, servers: Servers, schema: str) -> None:  # type: ignore[no-untyped-def]
    open_log("a")
    open_log("b")  # a second opener finds the schema in place
    import psycopg

    with psycopg.connect(servers.urls["pg2"]) as conn:
        row = conn.execute(
            f"SELECT value FROM {schema}.meta WHERE key = 'schema_version'"
        ).fetchone()
    from xatm.log.shared import SCHEMA_VERSION

    assert row == (str(SCHEMA_VERSION),)


def test_prune_removes_ended_commits(open_log) -> None:  # type: ignore[no-untyped-def]
    log = open_log("p")
    g1, g2 = new_gtrid("p"), new_gtrid("p")
    log.log_commit(g1, ["a", "b"])
    log.log_commit(g2, ["a", "b"])
    log.log_end(g1)
    log.flush()
    assert log.prune() == 1
    assert set(log.decisions([g1, g2])) == {g2}


def test_a_failed_batch_answers_its_waiters_without_reconnecting(
    open_log, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Found by the simulator's review of the log's waits (docs/testing.md): after a batch
    failed on a broken writer connection, the group-commit leader reconnected before telling
    the batch's waiters, so a silent log server (one that accepts connections and never
    answers) held every waiter for the whole connect timeout. The failed batch's waiters are
    told at once now; the next batch reconnects (bounded by the connect timeout). The
    writer's session is cut during the batch, after its INSERT (a cut before it is found
    before the batch is sent): its COMMIT fails on the dead session, whose outcome the
    writer cannot know (in doubt); the server had rolled it back."""
    import socket
    import time
    from dataclasses import replace

    import psycopg

    import xatm.core.failpoint
    from xatm.errors import LogError

    log = open_log("silent-writer")
    log.log_commit(new_gtrid("silent-writer"), ["pg1"])  # the writer works
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers: a silent server
    pid = log._writer.info.backend_pid

    def cut(name: str) -> None:
        if name == "commit_batch_open":
            with psycopg.connect(servers.urls["pg2"], autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                while admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone():
                    time.sleep(0.01)

    try:
        log.spec = replace(log.spec, host="127.0.0.1", port=silent.getsockname()[1])
        monkeypatch.setattr(xatm.core.failpoint, "hit", cut)
        lost = new_gtrid("silent-writer")
        started = time.monotonic()
        with pytest.raises(LogError):
            log.log_commit(lost, ["pg1"])
        took = time.monotonic() - started
        assert took < 2.0, f"the failed batch's waiter waited {took:.1f} s for a reconnect"
        monkeypatch.undo()
        # the next batch reconnects, bounded by the connect timeout: refused, not logged
        started = time.monotonic()
        with pytest.raises(DecisionNotLogged):
            log.log_commit(new_gtrid("silent-writer"), ["pg1"])
        assert time.monotonic() - started < 10.0
    finally:
        silent.close()
    other = open_log("silent-reader")
    assert lost not in other.pending(all_nodes=True)


def _cut(servers: Servers, pid: int) -> None:
    """End the session ``pid`` of the shared log's server, as a DBA or a restart would, and
    wait until it is gone (its process lives on)."""
    import time

    import psycopg

    with psycopg.connect(servers.urls["pg2"], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            time.sleep(0.01)


def test_a_writer_session_cut_while_idle_is_replaced_before_the_next_decision(
    open_log, servers: Servers
) -> None:  # type: ignore[no-untyped-def]
    """The writer's session is ended while it sits idle (a restart of the log's server, an
    administrator, an idle timeout), its process living on. The next decision is not sent
    on the dead session, where its outcome would be unknown (the transaction in doubt): the
    cut is found first, a new session takes the node lock and the decision is logged."""
    log = open_log("idle-cut")
    log.log_commit(new_gtrid("idle-cut"), ["pg1"])
    pid = log._writer.info.backend_pid
    _cut(servers, pid)
    decided = new_gtrid("idle-cut")
    log.log_commit(decided, ["pg1"])
    assert decided in log.pending()
    assert log._writer.info.backend_pid != pid
    with pytest.raises(LogLocked):  # the node lock is held again, by the new session
        open_log("idle-cut")


def test_a_reader_session_cut_while_idle_is_replaced_before_the_next_read(
    open_log, servers: Servers
) -> None:  # type: ignore[no-untyped-def]
    log = open_log("idle-read")
    decided = new_gtrid("idle-read")
    log.log_commit(decided, ["pg1"])
    assert decided in log.pending()
    pid = log._reader_conn.info.backend_pid
    _cut(servers, pid)
    assert decided in log.pending()  # not a failed read first
    assert log._reader_conn.info.backend_pid != pid


def test_a_writer_whose_session_was_cut_cannot_decide_once_a_twin_holds_the_node(
    open_log, servers: Servers
) -> None:  # type: ignore[no-untyped-def]
    """The node lock is the shared log's lease, held by the writer's session. That session
    is cut while its process lives on (a DBA, a proxy, a failover), and a second process
    with the same node_id takes the lock. The first one's next writes find the session
    cut before they are sent and are refused (a new session cannot take the lock back);
    nothing of them is written, and the twin decides alone. Once the twin is gone, the first
    takes the lock again and decides."""
    import psycopg

    first = open_log("twin-n")
    first.log_commit(new_gtrid("twin-n"), ["pg1"])  # the writer works
    pid = first._writer.info.backend_pid
    with psycopg.connect(servers.urls["pg2"], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        twin = open_log("twin-n")  # the lock is free: the twin takes it
        lost, refused = new_gtrid("twin-n"), new_gtrid("twin-n")
        # the cut is found before the write is sent: a new session cannot take the node
        with pytest.raises(DecisionNotLogged):
            first.log_commit(lost, ["pg1"])
        with pytest.raises(DecisionNotLogged):  # reconnected, but the node is the twin's
            first.log_commit(refused, ["pg1"])
        assert lost not in twin.pending() and refused not in twin.pending()
        decided = new_gtrid("twin-n")
        twin.log_commit(decided, ["pg1"])
        assert decided in twin.pending()
        twin.close()
        later = new_gtrid("twin-n")
        first.log_commit(later, ["pg1"])
        assert later in first.pending()


def test_a_writer_session_cut_before_its_commit_was_sent_logs_nothing_and_says_so(
    open_log, servers: Servers, schema: str
) -> None:  # type: ignore[no-untyped-def]
    """The writer's session is cut while its INSERT waits (for a lock here): its COMMIT was
    never sent, so the decision is certainly not logged: refused (the transaction rolls
    back), not in doubt."""
    import time

    import psycopg

    log = open_log("cut-insert")
    log.log_commit(new_gtrid("cut-insert"), ["pg1"])
    pid = log._writer.info.backend_pid
    refused: list[BaseException] = []
    g = new_gtrid("cut-insert")

    def commit() -> None:
        try:
            log.log_commit(g, ["pg1"])
        except BaseException as e:
            refused.append(e)

    with psycopg.connect(servers.urls["pg2"], autocommit=True) as admin:
        with admin.transaction():
            admin.execute(f"LOCK TABLE {schema}.decisions IN EXCLUSIVE MODE")
            t = threading.Thread(target=commit)
            t.start()
            deadline = time.monotonic() + 5
            while not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                (pid,),
            ).fetchone():
                assert time.monotonic() < deadline, "the INSERT never waited"
                time.sleep(0.005)
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        t.join(30)
    assert len(refused) == 1 and isinstance(refused[0], DecisionNotLogged), refused
    assert "terminating connection" in str(refused[0])
    assert g not in log.pending()
