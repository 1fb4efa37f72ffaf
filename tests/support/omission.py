"""Omission faults for the tests: a server that stops answering (SIGSTOP), a path that stops
forwarding (a blackholing proxy), and transfers that record how long each one waited.

Only the test's own private servers are stopped (their processes, found by their data
directory), always resumed in a ``finally``, and also by a guard process that sends SIGCONT
once the longest freeze is over, should the test process itself die meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import Bank
from xatm import TransactionManager
from xatm.admin import parse_url
from xatm.aio import AsyncTransactionManager
from xatm.testing.servers import MariaDBServer, PostgresServer

Server = PostgresServer | MariaDBServer


@contextlib.contextmanager
def frozen(server: Server, longest: float) -> Iterator[list[int]]:
    """Stop every process of ``server`` (SIGSTOP; a PostgreSQL cluster's postmaster first,
    then its children) for the ``with`` block, at most ``longest`` seconds: a guard process
    resumes them then even if this process is gone. Resumed (SIGCONT) when the block ends."""
    main = server.processes()[:1]
    assert main, f"{server.name} is not running"
    os.kill(main[0], signal.SIGSTOP)  # no new backend can be forked from here on
    pids = [main[0], *(p for p in server.processes() if p != main[0])]
    guard = subprocess.Popen(
        ["sh", "-c", f"sleep {longest:.1f}; kill -CONT {' '.join(map(str, pids))} 2>/dev/null"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        guard.kill()
        guard.wait()


class BlackholeProxy:
    """A loopback TCP forwarder to one server that can stop forwarding, in both directions,
    without closing anything (:meth:`blackhole`), and resume (:meth:`heal`): a network path
    that goes silent for a while, as a partition behind a load balancer does. What was sent
    meanwhile is delivered after the heal, as TCP would after retransmitting."""

    def __init__(self, url: str) -> None:
        spec = parse_url(url)
        self.target = (spec.host, spec.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = url.replace(f":{spec.port}/", f":{self.port}/", 1)
        assert self.url != url
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.blackholes = 0
        self.cuts = 0
        self._cut_armed = threading.Event()
        self._cut_match = b""
        self._silence_armed = threading.Event()
        self._silence_match = b""
        self._answers = threading.Event()  # server-to-client forwarding (held during a cut)
        self._answers.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self.blackholes += 1
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def cut_after_next_request(self, match: bytes = b"") -> None:
        """The next request any client sends (that contains ``match``) is delivered to the
        server, which runs it; its answer is held back and both sockets are then closed: a
        session cut while its statement is in flight (the server did it, the client never
        hears)."""
        self._cut_match = match
        self._cut_armed.set()

    def silence_after_next_request(self, match: bytes) -> None:
        """The next request any client sends that contains ``match`` is delivered to the
        server, and then the path goes silent (:meth:`blackhole`) with every socket left
        open: a server that stops answering in the middle of a session."""
        self._silence_match = match
        self._silence_armed.set()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(down,), daemon=True).start()

    def _connect(self, down: socket.socket) -> None:
        self._open.wait()  # a connection made during a blackhole gets nothing until it heals
        try:
            up = socket.create_connection(self.target)
        except OSError:
            down.close()
            return
        with self._lock:
            self._socks += [down, up]
        threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            self._open.wait()
            if not request:
                self._answers.wait()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # the end of the stream, passed on
                return
            cut = request and self._cut_armed.is_set() and self._cut_match in data
            if cut:
                self._cut_armed.clear()
                self._answers.clear()
            silence = request and self._silence_armed.is_set() and self._silence_match in data
            if silence:
                self._silence_armed.clear()
                # silent before the request is passed on: its answer must not slip through
                # (the client would send its next request, delivered at the heal)
                self.blackhole()
            try:
                dst.sendall(data)
            except OSError:
                return
            if cut:
                time.sleep(0.3)  # the server runs it; its answer waits here
                self.cuts += 1  # counted first: the client sees the cut once the socket ends
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
                self._answers.set()
                return

    def close(self) -> None:
        self.heal()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            # shutdown first: a close alone does not end a socket another thread is blocked
            # reading (its server's session would live on, holding its locks)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


# -- transfers that measure their waits ----------------------------------------------------


@dataclass
class Transfer:
    """One transfer: which API, its resources, when it started, how long the caller waited
    (the whole ``with`` block), and how it ended."""

    api: str
    tid: str
    resources: tuple[str, ...]
    started: float
    seconds: float
    outcome: str


@dataclass
class Load:
    """Transfers between two of ``resources`` at a time (one account per worker, so that
    workers never wait for each other's rows), by ``threads`` threads on a threaded manager
    and ``tasks`` tasks on an asyncio manager, until :meth:`stop`."""

    bank: Bank
    resources: tuple[str, ...]
    log: Path | str
    timeout: float
    threads: int = 8
    tasks: int = 8
    seed: int = 20261207
    done: list[Transfer] = field(default_factory=list)
    intents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    acks: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.tm: TransactionManager | None = None
        self.atm: AsyncTransactionManager | None = None
        self._atm_ready = threading.Event()
        self._atm_error: BaseException | None = None
        self._closing = threading.Event()
        self.aio_in_use: dict[str, int] = {}

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        urls = {name: self.bank.urls[name] for name in self.resources}
        if self.threads:
            self.tm = TransactionManager(
                urls, self.log, "silent-t", timeout=self.timeout, sweeper=False
            )
            for i in range(self.threads):
                thread = threading.Thread(target=self._thread_worker, args=(i,), daemon=True)
                thread.start()
                self._workers.append(thread)
        if self.tasks:
            thread = threading.Thread(target=self._asyncio_main, args=(urls,), daemon=True)
            thread.start()
            self._workers.append(thread)
            self._atm_ready.wait(60)
            if self._atm_error is not None:
                raise self._atm_error

    def stop(self) -> None:
        """Stop the transfers and wait for them (the managers stay open)."""
        self._stop.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            any(t.is_alive() for t in self._workers[: self.threads])
            or (self.tasks and not self.aio_in_use and self._atm_error is None)
        ):
            time.sleep(0.05)
        assert time.monotonic() < deadline, "a transfer worker never came back"

    def close(self) -> None:
        self._stop.set()
        self._closing.set()
        for thread in self._workers:
            thread.join(60)
        if self.tm is not None:
            self.tm.close()

    def _transfer_spec(self, rng: random.Random, api: str, worker: int, n: int) -> Any:
        pair = tuple(rng.sample(self.resources, 2))
        tid = f"{api}-{worker}-{n}"
        with self._lock:
            self.intents[tid] = pair
        account = worker + 1 + (self.threads if api == "aio" else 0)
        table = self.bank.table
        statements = [
            (pair[0], f"UPDATE {table} SET bal = bal - 1 WHERE id = %s", (account,)),
            (pair[1], f"UPDATE {table} SET bal = bal + 1 WHERE id = %s", (account,)),
            *((r, f"INSERT INTO {self.bank.journal} (tid) VALUES (%s)", (tid,)) for r in pair),
        ]
        return tid, pair, statements

    def _record(self, api: str, tid: str, pair: tuple[str, ...], t0: float, outcome: str) -> None:
        seconds = time.monotonic() - t0
        with self._lock:
            self.done.append(Transfer(api, tid, pair, t0, seconds, outcome))
            if outcome.startswith("committed"):
                self.acks.add(tid)

    def _thread_worker(self, i: int) -> None:
        rng = random.Random(self.seed + i)
        assert self.tm is not None
        n = 0
        while not self._stop.is_set():
            n += 1
            tid, pair, statements = self._transfer_spec(rng, "threads", i, n)
            t0 = time.monotonic()
            try:
                with self.tm.transaction() as tx:
                    for resource, query, params in statements:
                        tx.execute(resource, query, params)
                outcome = "committed" + (" (pending)" if tx.pending_branches else "")
            except Exception as e:
                outcome = type(e).__name__
            self._record("threads", tid, pair, t0, outcome)
            if not outcome.startswith("committed"):
                time.sleep(0.05)

    def _asyncio_main(self, urls: dict[str, str]) -> None:
        async def main() -> None:
            try:
                self.atm = await AsyncTransactionManager(
                    urls, self.log, "silent-a", timeout=self.timeout, sweeper=False
                ).open()
            except BaseException as e:
                self._atm_error = e
                raise
            finally:
                self._atm_ready.set()
            try:
                await asyncio.gather(*(self._task_worker(i) for i in range(self.tasks)))
                self.aio_in_use = dict(self.atm.in_use)
                await asyncio.to_thread(self._closing.wait)  # recovery may still use it
            finally:
                atm, self.atm = self.atm, None
                await atm.close()

        asyncio.run(main())

    async def _task_worker(self, i: int) -> None:
        rng = random.Random(self.seed + 1000 + i)
        atm = self.atm
        assert atm is not None
        n = 0
        while not self._stop.is_set():
            n += 1
            tid, pair, statements = self._transfer_spec(rng, "aio", i, n)
            t0 = time.monotonic()
            try:
                async with atm.transaction() as tx:
                    for resource, query, params in statements:
                        await tx.execute(resource, query, params)
                outcome = "committed" + (" (pending)" if tx.pending_branches else "")
            except Exception as e:
                outcome = type(e).__name__
            self._record("aio", tid, pair, t0, outcome)
            if not outcome.startswith("committed"):
                await asyncio.sleep(0.05)

    # -- afterwards --------------------------------------------------------------------
    def managers(self) -> list[TransactionManager]:
        return [tm for tm in (self.tm, self.atm.sync if self.atm else None) if tm is not None]

    def books(self) -> dict[str, Any]:
        """Each intended transfer on all of its resources or none; every acknowledged one
        on all of them; the total balance unchanged."""
        journal = self.bank.journal_ids()
        split, committed = [], 0
        for tid, resources in sorted(self.intents.items()):
            present = {r for r in resources if tid in journal[r]}
            if present and present != set(resources):
                split.append((tid, sorted(present), sorted(resources)))
            elif present:
                committed += 1
        lost = sorted(t for t in self.acks if not all(t in journal[r] for r in self.intents[t]))
        return {
            "attempted": len(self.intents),
            "committed": committed,
            "acked": len(self.acks),
            "split": split,
            "lost": lost,
            "balance_delta": self.bank.total() - self.bank.initial_total,
        }


def settle(managers: list[TransactionManager], bank: Bank, nodes: set[str], bound: float) -> float:
    """Recovery passes (each manager's own, as its sweeper runs them) until none of
    ``nodes``' branches is prepared anywhere and no decision is pending; the seconds it
    took (AssertionError past ``bound``: a liveness bound, not a measurement)."""
    t0 = time.monotonic()
    while True:
        quiet = True
        for tm in managers:
            try:
                report = tm.recover()
            except Exception:
                quiet = False
                continue
            quiet = quiet and report.clean and not (report.committed or report.rolled_back)
            quiet = quiet and not report.ended and not tm.context.log.pending()
        left = [x for xids in bank.xatm_prepared().values() for x in xids if x.node_id in nodes]
        if quiet and not left:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < bound, left[:5]
        time.sleep(0.2)


def during(
    transfers: list[Transfer], start: float, end: float, keep: Callable[[Transfer], bool]
) -> list[Transfer]:
    """The transfers that started in [start, end) and satisfy ``keep``."""
    return [t for t in transfers if start <= t.started < end and keep(t)]
