"""Field tests of issue 17 (items 1-3): the node identity is a lease, and a twin never splits.

A node's identity lock proves it only while held: its session can be cut while the process
lives on, and a second process with the same node_id can take it. Here the identity sessions
of a live manager are cut (``pg_terminate_backend``, MariaDB ``KILL``) at each step of its
commit protocol while a twin with its own log takes the lock and runs recovery; a twin is
started while a resource is unreachable; a manager's path to a server goes silent (a
blackholing proxy); and two resources share one MariaDB server. In every case: nothing is
split, nothing acknowledged is lost, the twin never touches the live manager's branches (they
are a *stranger's* to it), and the manager that lost its lease refuses to enlist or decide
there with an error naming node and resource.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Bank, MakeTM, Servers, add_query, journaled_transfer, run
from tests.support.field import attempt, books, lock_timeouts, roll_back_leftovers, transfer_books
from tests.support.recovery import prepared_gtrids, wait_for
from xatm import IdentityNotHeld, TransactionManager, TransactionRolledBack
from xatm.admin import parse_url

NODES = {"lease-a", "lease-b", "lease-c", "lease-d", "lease-e", "lease-f"}


@pytest.fixture(autouse=True)
def tidy(bank: Bank) -> Iterator[None]:
    yield
    roll_back_leftovers(bank, NODES)


def cut_identity(bank: Bank, node: str, resource: str) -> None:
    """End the session holding ``node``'s identity lock on ``resource``, as a DBA (or a
    failover, or a proxy) would, while its process lives on."""
    conn = bank.conns[resource]
    if resource.startswith("pg"):
        key = _pg_key(node)
        rows = run(
            conn,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND classid = %s AND objid = %s AND objsubid = 2 AND granted",
            (0x786E, key),
        )
        assert rows, f"no session holds {node}'s identity on {resource}"
    else:
        holder = run(conn, "SELECT IS_USED_LOCK(%s)", (f"xatm:node:{node}",))[0][0]
        assert holder is not None, f"no session holds {node}'s identity on {resource}"
        run(conn, f"KILL {int(holder)}")


def _pg_key(node: str) -> int:
    import zlib

    return zlib.crc32(node.encode("ascii"))


def identity_state(tm: TransactionManager) -> dict[str, str]:
    return {s.resource: s.state for s in tm.context.identity.status()}


def identity_held(tm: TransactionManager) -> dict[str, bool]:
    return {s.resource: s.held for s in tm.context.identity.status()}


STEPS = ["before_prepare", "after_prepare", "before_decision", "after_decision"]


@pytest.mark.parametrize("step", STEPS)
def test_a_twin_that_takes_a_cut_lock_never_splits_a_live_transaction(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, at_step: dict[str, Callable[[], None]], step: str
) -> None:
    """Found item 1. The live manager's identity sessions are cut at ``step`` of a transfer;
    a twin (same node_id, its own log) takes the locks and runs recovery there; the live
    manager's keeper then finds the locks taken. Before: the twin presumed abort for the
    live manager's prepared branches while it committed: SPLIT, acknowledged."""
    live = make_tm(node_id="lease-a", log=tmp_path / "a", sweeper=False)
    twin: dict[str, Any] = {}

    def cut_and_recover() -> None:
        for resource in ("pg1", "pg2", "maria"):
            cut_identity(bank, "lease-a", resource)
        b = make_tm(node_id="lease-a", log=tmp_path / "b", sweeper=False, lock_timeout=10)
        twin["tm"], twin["report"] = b, b.recover()
        wait_for(
            lambda: identity_state(live)["pg1"] == "taken" == identity_state(live)["maria"],
            what="the live manager's keeper finding its locks taken",
        )

    at_step[step] = cut_and_recover
    _, failed = attempt(lambda: journaled_transfer(live, bank, f"lease-{step}"))
    present = books(bank, f"lease-{step}", ("pg1", "maria"))
    assert "report" in twin, failed
    report = twin["report"]
    assert report.rolled_back == 0 and report.committed == 0, report.actions
    if step in ("before_prepare", "after_prepare"):
        # the lease is gone at the fence: rolled back, never acknowledged
        assert isinstance(failed, TransactionRolledBack), failed
        assert isinstance(failed.__cause__, IdentityNotHeld), failed.__cause__
        assert "lease-a" in str(failed) and ("pg1" in str(failed) or "maria" in str(failed))
        assert present == set()
    else:
        # it passed the fence before the lock was lost: it commits, and the twin left it
        assert failed is None, failed
        assert present == {"pg1", "maria"}
        assert report.strangers == 2, report.actions
    if step == "after_prepare":
        assert report.strangers == 2, report.actions
    # the live manager refuses new work where its lease is lost, naming node and resource
    with pytest.raises(IdentityNotHeld) as refused:
        journaled_transfer(live, bank, f"lease-{step}-2")
    assert "lease-a" in str(refused.value) and "another live process" in str(refused.value)
    twin["tm"].close()
    wait_for(lambda: all(identity_held(live).values()), what="the locks taken back")
    journaled_transfer(live, bank, f"lease-{step}-3")
    assert books(bank, f"lease-{step}-3", ("pg1", "maria")) == {"pg1", "maria"}
    live.recover()
    assert not any(prepared_gtrids(bank).values())


def test_a_twin_started_while_a_resource_is_unreachable_does_not_use_it(
    servers: Servers,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    at_step: dict[str, Callable[[], None]],
) -> None:
    """Found item 2. The twin's pg1 is unreachable at its start (its identity there not
    taken), then comes back while the first manager still holds it there: the twin must not
    run transactions on pg1, and its recovery must not touch the first one's branches."""
    live = make_tm(
        node_id="lease-b",
        resources={"pg1": servers.urls["pg1"], "maria": servers.urls["maria"]},
        log=tmp_path / "a",
        sweeper=False,
    )
    with Forwarder(servers.urls["pg1"], up=False) as proxy:
        twin = make_tm(
            node_id="lease-b",
            resources={"pg1": proxy.url, "pg2": servers.urls["pg2"]},
            log=tmp_path / "b",
            sweeper=False,
            lock_timeout=1,
        )
        assert identity_state(twin) == {"pg1": "unreached", "pg2": "held"}
        proxy.start()
        wait_for(lambda: identity_state(twin)["pg1"] == "taken", what="the twin's keeper")
        for i in range(5):
            with pytest.raises(IdentityNotHeld) as refused, twin.transaction() as tx:
                tx.execute("pg2", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
                tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
            assert "'pg1'" in str(refused.value) and "lease-b" in str(refused.value)
            journaled_transfer(live, bank, f"twin-unreach-{i}")
        assert bank.total() == bank.initial_total
        # the twin's recovery, run while the live manager has a transfer prepared, leaves it
        reports: list[Any] = []
        at_step["after_prepare"] = lambda: reports.append(twin.recover())
        journaled_transfer(live, bank, "twin-unreach-prepared")
        assert reports[0].rolled_back == 0 and reports[0].strangers == 1, reports[0].actions
        assert books(bank, "twin-unreach-prepared", ("pg1", "maria")) == {"pg1", "maria"}
        assert bank.total() == bank.initial_total


def test_two_resources_on_one_mariadb_server_share_one_identity(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """Found item 3: GET_LOCK is server-wide, so two databases of one MariaDB server share the
    node's lock. Before: the manager refused to start ("already in use on 'my2'")."""
    if servers.set is None:
        pytest.skip("needs a second database on the private MariaDB server")
    servers.set.maria.create_database("lease_second")
    urls = {
        "pg1": servers.urls["pg1"],
        "my1": servers.urls["maria"],
        "my2": servers.set.maria.url("lease_second"),
    }
    tm = make_tm(node_id="lease-c", resources=urls, log=tmp_path / "a", sweeper=False)
    status = {s.resource: s for s in tm.context.identity.status()}
    assert all(s.held for s in status.values()), status
    assert "shares the lock" in status["my2"].detail or "shares the lock" in status["my1"].detail
    with tm.transaction() as tx:
        tx.execute("pg1", "SELECT 1")
        tx.execute("my1", "SELECT 1")
        tx.execute("my2", "SELECT 1")

    # the shared session cut: one retake serves both, and a twin is still refused on either
    def holder() -> Any:
        return run(bank.conns["maria"], "SELECT IS_USED_LOCK('xatm:node:lease-c')")[0][0]

    first = holder()
    cut_identity(bank, "lease-c", "maria")
    wait_for(
        lambda: holder() not in (None, first) and all(identity_held(tm).values()),
        what="the shared lock taken back",
    )
    with pytest.raises(Exception, match="lease-c"):
        make_tm(
            node_id="lease-c",
            resources={"my2": urls["my2"]},
            log=tmp_path / "b",
            sweeper=False,
            lock_timeout=0.5,
        )


def test_a_silent_path_to_the_identity_session_ends_the_lease(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """The half-open keeper session: the path from the manager to pg1 blackholes (no FIN, no
    RST), and meanwhile the server ends that session and a twin takes the lock. The manager's
    keeper never gets an answer; its lease lapses after LEASE seconds and it refuses to
    enlist there; when the path heals it finds the lock taken and keeps refusing."""
    with Forwarder(servers.urls["pg1"]) as proxy:
        urls = {"pg1": proxy.url, "maria": servers.urls["maria"]}
        live = make_tm(node_id="lease-d", resources=urls, log=tmp_path / "a", sweeper=False)
        journaled_transfer(live, bank, "halfopen-1")
        proxy.blackhole()
        cut_identity(bank, "lease-d", "pg1")  # the server's side ends; the client never hears
        wait_for(lambda: not identity_held(live)["pg1"], what="the lease lapsing", timeout=30)
        with pytest.raises(IdentityNotHeld) as refused, live.transaction() as tx:
            tx.execute("pg1", "SELECT 1")
        assert "has not answered" in str(refused.value) or "lost" in str(refused.value)
        # a twin (direct path) takes the lock in the meantime
        twin = make_tm(
            node_id="lease-d",
            resources={"pg1": servers.urls["pg1"]},
            log=tmp_path / "b",
            sweeper=False,
        )
        proxy.heal()
        wait_for(lambda: identity_state(live)["pg1"] == "taken", what="the keeper after healing")
        with pytest.raises(IdentityNotHeld, match="another live process"):
            journaled_transfer(live, bank, "halfopen-2")
        twin.close()
        wait_for(lambda: identity_held(live)["pg1"], what="the lock taken back")
        journaled_transfer(live, bank, "halfopen-3")
        assert books(bank, "halfopen-3", ("pg1", "maria")) == {"pg1", "maria"}


class Forwarder:
    """A loopback TCP forwarder to one server that can start late (connections refused until
    then), and *blackhole* (stop forwarding both ways without closing anything, as a dead
    path or a paused VM looks) and heal."""

    def __init__(self, url: str, *, up: bool = True) -> None:
        spec = parse_url(url)
        self.target = (spec.host, spec.port)
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.port = int(probe.getsockname()[1])
        self.url = url.replace(f":{spec.port}/", f":{self.port}/", 1)
        self.listener: socket.socket | None = None
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        if up:
            self.start()

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target)
            except OSError:
                down.close()
                continue
            with self.lock:
                self.sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            self.flowing.wait()  # blackholed: neither data nor a close gets through
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.flowing.set()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
        with self.lock:
            socks, self.sockets = self.sockets, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_a_coordinator_paused_past_the_servers_session_timeout_splits_nothing(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """A coordinator process is frozen (SIGSTOP) longer than the servers' session timeouts
    (``idle_session_timeout``, ``wait_timeout``) and its lease: the servers end its idle
    sessions, its identity locks with them, and a twin takes them and recovers. When the
    first one thaws it must find its lease gone and not decide on top of the twin."""
    bank.create(accounts=4, balance=10_000)
    urls = {
        name: add_query(
            url,
            "options=-c%20idle_session_timeout%3D1500"
            if name.startswith("pg")
            else "init_command=SET%20SESSION%20wait_timeout%3D2",
        )
        for name, url in lock_timeouts(bank.urls).items()
    }
    intents, acks, calls = tmp_path / "intents", tmp_path / "acks", tmp_path / "calls"
    cfg = {
        "urls": urls,
        "log": str(tmp_path / "a"),
        "node_id": "lease-e",
        "table": bank.table,
        "journal": bank.journal,
        "threads": 2,
        "seconds": 16,
        "seed": 5,
        "accounts": 4,
        "intents": str(intents),
        "acks": str(acks),
        "calls": str(calls),
        "sweep_interval": 0.5,
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.worker", "chaos", str(path)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: acks.exists() and acks.stat().st_size > 0, what="the first transfers")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            # the servers end its idle sessions (its identity locks) within a few seconds
            with TransactionManager(
                urls, tmp_path / "b", "lease-e", sweeper=False, lock_timeout=8
            ) as twin:
                report = twin.recover()
                assert report.rolled_back == 0, report.actions
                time.sleep(6.0)  # past the first one's lease (LEASE = 5 s)
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(2.0)  # it thaws while the twin holds its identity
                assert twin.recover().rolled_back == 0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bank.wait_for_dead_sessions()
    for log in ("a", "b"):
        with TransactionManager(bank.urls, tmp_path / log, "lease-e", sweeper=False) as tm:
            tm.recover()
    result = transfer_books(bank, intents, acks)
    assert result["split"] == [] and result["lost"] == [], result
    assert result["balance_delta"] == 0
    assert not any(bank.xatm_prepared().values())
    assert result["acked"] > 0
