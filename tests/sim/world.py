"""One simulated world: servers, coordinators running xatm's real code, faults, operators, checks.

A run (:func:`run_seed`) builds everything from one seed: 2-3 database servers (PostgreSQL,
MariaDB, MySQL 8 semantics, ``tests.sim.servers``), 3 coordinator node_ids sharing a log
directory (some with commit markers), each a simulated process with worker greenlets running
transfers through the real :class:`xatm.Transaction`, the real sweeper (recovery passes), the
real identity leases and the real file log. Faults are injected at random virtual times for
the fault phase; then the faults stop, every process is killed and each log directory's nodes
are restarted to recover, and liveness is checked. Invariants are checked at every branch
outcome (``outcome``) and at the end.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.sim import participant as P
from tests.sim import patches
from tests.sim import sched as S
from tests.sim.servers import ConnLost, DBError, Server
from xatm.core import bugs as _bugs
from xatm.core.deadline import step_bound
from xatm.errors import ConfigurationError, TransactionInDoubt, TransactionRolledBack, XatmError
from xatm.log import incarnations as _incarnations
from xatm.log import node_markers as _node_markers
from xatm.log.audit import AuditTrail
from xatm.log.file import FileLog
from xatm.log.store import FileStore
from xatm.node.context import Context, Resources
from xatm.node.identity import IdentityLocks
from xatm.ops.resolve import ResolutionRefused, resolve
from xatm.participants.pool import Pool
from xatm.recovery.run import run_pass
from xatm.recovery.sweeper import Sweeper
from xatm.sagas.definition import Saga, SagaAbort
from xatm.sagas.runner import SagaRunner
from xatm.sagas.store import FileSagaStore
from xatm.transactions.transaction import SagaTransaction, Transaction

GRACE = 5.0


class AppError(Exception):
    """The application's block raised."""


@dataclass
class Config:
    seed: int
    duration: float = 60.0  # virtual seconds of load and faults
    recover_for: float = 90.0  # virtual seconds each recovery group gets at the end
    workers: int = 6  # transfer greenlets per coordinator
    accounts: int = 400
    timeout: float = 10.0
    fault_rate: float = 0.25  # faults per virtual second
    step_crash: float = 1e-4  # chance that a process dies at one round trip's start or end
    bugs: frozenset[str] = frozenset()
    trace: bool = False
    stop_at_first: bool = True
    #: fault kinds enabled (all by default); the shrinker narrows it
    kinds: frozenset[str] | None = None
    max_faults: int | None = None
    #: explicit fault schedule (the shrinker's): list of (time, kind, args)
    schedule: list[tuple[float, str, tuple[Any, ...]]] | None = None


@dataclass
class Stats:
    tx: int = 0
    committed: int = 0
    rolled_back: int = 0
    in_doubt: int = 0
    raised: int = 0
    faults: int = 0
    steps: int = 0
    recovered: int = 0
    sagas: int = 0
    fault_kinds: collections.Counter[str] = field(default_factory=collections.Counter)


class Violation(Exception):
    pass


class SimHost:
    """What the real SagaRunner asks of its manager (``xatm.sagas.runner.SagaHost``)."""

    def __init__(self, co: Coordinator) -> None:
        self.co = co
        self.node_id = co.node

    @property
    def context(self) -> Context:
        ctx = self.co.ctx
        assert ctx is not None
        return ctx

    @property
    def resource_names(self) -> list[str]:
        return list(self.co.world.servers)

    @property
    def resources(self) -> dict[str, Any]:
        ctx = self.co.ctx
        assert ctx is not None
        return {n: p.spec for n, p in ctx.resources.participants.items()}

    @property
    def closed(self) -> bool:
        return not self.co.proc.alive

    def _saga_transaction(self, idempotency_key: str) -> SagaTransaction:
        ctx = self.co.ctx
        assert ctx is not None
        return SagaTransaction(ctx, ctx.new_gtrid(ctx.timeout), ctx.timeout, idempotency_key)

    def recover(self, *, dry_run: bool = False, actor: str | None = None) -> Any:
        ctx = self.co.ctx
        assert ctx is not None
        return run_pass(ctx, dry_run=dry_run, actor=actor)


def make_saga(a: str, b: str) -> Saga:
    """A payment saga: debit on ``a``, credit on ``b``, then a check that may abort (the
    steps done are then compensated). Each step's work counts itself (``EFFECT``), keyed by
    the step transaction's idempotency key: at most once each, checked at every commit."""

    def work(res: str, sign: int, key: str) -> Any:
        def run(tx: Any, data: Any) -> None:
            tx.execute(res, P.EFFECT, (tx.idempotency_key,))
            tx.execute(res, P.UPDATE, (sign * data["amt"], data[key]))

        return run

    saga = Saga("pay", backoff=0.05, max_backoff=1.0)
    saga.step("debit", work(a, -1, "src"), work(a, 1, "src"), resources=[a])
    saga.step("credit", work(b, 1, "dst"), work(b, -1, "dst"), resources=[b])

    def check(tx: Any, data: Any) -> None:
        if data["abort"]:
            raise SagaAbort("over the limit")

    saga.step("check", check, resources=[a])
    return saga


class Coordinator:
    def __init__(self, world: World, node: str, log_dir: Path, twin: bool, load: bool) -> None:
        self.world = world
        self.node = node
        self.log_dir = log_dir
        self.twin = twin
        self.load = load
        n = next(world.counter)
        self.proc = S.Proc(
            f"{node}{'~twin' if twin else ''}#{n}", f"app-{node}{'-t' if twin else ''}"
        )
        self.proc.data["coord"] = self
        self.ctx: Context | None = None
        self.sweeper: Sweeper | None = None
        self.markers = world.markers.get(node, frozenset())
        self.paused_until = 0.0

    # -- start (in the process's main greenlet) ----------------------------------------------
    def main(self) -> None:
        w = self.world
        participants = {
            name: P.SimParticipant(name, srv, self.proc) for name, srv in w.servers.items()
        }
        pools = {n: Pool(p, max_idle=8) for n, p in participants.items()}
        try:
            log = FileLog(self.log_dir, self.node, lock_timeout=2.0, retain=60.0)
        except XatmError as e:
            w.note(f"{self.proc.name} cannot open its log: {type(e).__name__}")
            return
        node_dir = self.log_dir / self.node
        incarnation = f"{w.rng.getrandbits(40):010x}"
        _node_markers.record(node_dir, self.markers)
        _incarnations.record(node_dir, incarnation)
        identity = IdentityLocks(participants, self.node)
        ctx = Context(
            node_id=self.node,
            timeout=w.cfg.timeout,
            started_at=patches.wall() - 0.002,
            resources=Resources(participants, pools, bound=step_bound(w.cfg.timeout)),
            log=log,
            store=FileStore(str(self.log_dir)),
            audit=AuditTrail(str(self.log_dir), self.node),
            identity=identity,
            commit_markers=self.markers,
            incarnation=incarnation,
            incarnations=_incarnations.read(node_dir),
            retain=60.0,
            recovery_lock=patches.SimLock(),  # type: ignore[arg-type]
        )
        self.ctx = ctx
        while True:
            try:
                identity.acquire(wait=1.0)
                break
            except ConfigurationError:
                w.note(f"{self.proc.name} refused to start: node_id {self.node} in use")
                if not w.stop_load:
                    ctx.close()
                    self.ctx = None
                    return
                # recovering at the end: the operator starts it again a moment later
                identity = IdentityLocks(participants, self.node)
                ctx.identity = identity
                w.sched.sleep(2.0)
        identity.keep()
        w.note(f"{self.proc.name} started (incarnation {incarnation}, log {self.log_dir.name})")
        self.runner = SagaRunner(SimHost(self), {"pay": w.saga}, ctx.classify)
        runner = self.runner
        self.sweeper = Sweeper(
            ctx, 1.0 + w.rng.random() * 2, after_pass=lambda actor: runner.recover(actor)
        )
        self.sweeper.start()
        if self.load:
            for i in range(w.cfg.workers):
                w.sched.spawn(self.worker, self.proc, f"{self.proc.name}/w{i}")
            if not self.twin:
                w.sched.spawn(self.saga_worker, self.proc, f"{self.proc.name}/saga")

    def saga_worker(self) -> None:
        w = self.world
        rng = w.rng
        while not w.stop_load:
            data = {
                "src": rng.randrange(w.cfg.accounts),
                "dst": rng.randrange(w.cfg.accounts),
                "amt": rng.randrange(1, 50),
                "abort": rng.random() < 0.2,
            }
            w.stats.sagas += 1
            try:
                self.runner.run("pay", data, None, wait=5.0, actor="app")
            except XatmError:
                w.sched.sleep(0.2 + rng.random() * 0.5)
            w.sched.sleep(rng.random() * 0.05)

    # -- load ------------------------------------------------------------------------------
    def worker(self) -> None:
        w = self.world
        rng = w.rng
        names = list(w.servers)
        sched = w.sched
        while not w.stop_load:
            ctx = self.ctx
            assert ctx is not None
            k = 3 if len(names) > 2 and rng.random() < 0.2 else 2
            res = rng.sample(names, k)
            keys = [rng.randrange(w.cfg.accounts) for _ in res]
            amount = rng.randrange(1, 50)
            raise_in_block = rng.random() < 0.04
            tx = Transaction(ctx, ctx.new_gtrid(w.cfg.timeout), w.cfg.timeout)
            gtrid = tx.gtrid
            w.stats.tx += 1
            started = sched.now
            body_done = False
            try:
                with tx:
                    for i, (r, key) in enumerate(zip(res, keys, strict=True)):
                        delta = -amount if i == 0 else (amount if i == 1 else 0)
                        tx.execute(r, P.UPDATE, (delta, key))
                    if raise_in_block:
                        raise AppError()
                    body_done = True
                w.acked(gtrid, tx)
            except AppError:
                w.refused(gtrid, "raised in block")
            except TransactionInDoubt:
                w.stats.in_doubt += 1
            except TransactionRolledBack:
                w.refused(gtrid, "rolled back")
            except (XatmError, DBError, ConnLost) as e:
                if body_done:
                    w.violation("unexpected-error", f"{gtrid}: commit raised {e!r}")
                w.refused(gtrid, f"raised in block ({type(e).__name__})")
                if isinstance(e, XatmError):
                    sched.sleep(0.2 + rng.random() * 0.5)  # the application backs off
            took = sched.now - started
            if took > w.cfg.timeout + 3 * GRACE + 1.0 and self.paused_until < started:
                w.violation("tx-bound", f"{gtrid} took {took:.1f} s (timeout {w.cfg.timeout} s)")
            sched.sleep(rng.random() * 0.02)


class World:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sched = S.Sched(cfg.seed)
        S.SCHED = self.sched
        P.WORLD = self
        self.rng = random.Random(cfg.seed * 7919 + 1)
        self.frng = random.Random(cfg.seed * 104729 + 2)  # faults: their own stream
        patches.reseed(self.rng)
        patches.DISK.crash_hook = self._fsync_crash
        _bugs.ENABLED = cfg.bugs
        self.counter = itertools.count(1)
        self.stats = Stats()
        self.violations: list[tuple[str, str, int, float]] = []
        self.events: collections.deque[str] = collections.deque(
            maxlen=400 if not cfg.trace else 100000
        )
        self.tmp = Path(tempfile.mkdtemp(prefix=f"xatm-sim-{cfg.seed}-"))
        self.main_dir = self.tmp / "logs"
        self.twin_dir = self.tmp / "twin-logs"
        kinds = ["pg", "maria", self.rng.choice(["pg", "mysql8", "maria"])]
        if self.rng.random() < 0.3:
            kinds = kinds[:2]
        self.servers: dict[str, Server] = {}
        for i, kind in enumerate(kinds):
            name = f"{kind}{i}"
            self.servers[name] = Server(self, name, kind, f"db{i}", cfg.accounts)
        names = list(self.servers)
        self.nodes = ["n1", "n2", "n3"]
        self.markers: dict[str, frozenset[str]] = {}
        for node in self.nodes:
            if self.rng.random() < 0.5:
                self.markers[node] = frozenset({self.rng.choice(names)})
        self.saga = make_saga(names[0], names[1])
        self.backstop = 2 * cfg.timeout + GRACE
        self.crash_p = cfg.step_crash
        self.partitions: set[tuple[str, str]] = set()
        self.outcomes: dict[str, dict[str, str]] = {}
        self.acked_set: set[str] = set()
        self.refused_set: set[str] = set()
        self.exempt: set[str] = set()
        #: rolled back by hand with force, their COMMIT decision overruled (a dead owner's)
        self.overruled: set[str] = set()
        #: forced resolutions started, per gtrid (a later one, either way, is what holds)
        self.forced: dict[str, int] = {}
        self.coords: list[Coordinator] = []
        self.stop_load = False
        self.faults_on = True
        self.foreign: dict[str, str] = {}
        for name, srv in self.servers.items():
            raw = f"foreign-app-{name}"
            sess = srv.open_session("foreign")
            srv.begin(sess, raw, None, name, None)
            srv.add(sess, 0, 0)
            srv.prepare(sess)
            srv.disconnect(sess)
            self.foreign[name] = raw

    # -- reporting ---------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.events.append(f"[{self.sched.now:9.3f}s step {self.sched.steps}] {text}")

    def violation(self, kind: str, detail: str) -> None:
        self.violations.append((kind, detail, self.sched.steps, self.sched.now))
        self.note(f"VIOLATION {kind}: {detail}")
        if self.cfg.stop_at_first:
            raise Violation(f"{kind}: {detail}")

    # -- the ledger: every branch outcome, checked as it happens -----------------------------
    def outcome(self, gtrid: str, res: str, o: str, txn: Any) -> None:
        d = self.outcomes.setdefault(gtrid, {})
        d[res] = o
        if self.cfg.trace:
            who = self.sched.current.name if self.sched.current is not None else "server"
            what = "commit" if o == "C" else "rollback"
            self.note(f"{res}: {what} {gtrid} ({txn.state}) by {who}")
        if o == "C" and gtrid in self.overruled and self.sched.current is not None:
            self._raise_later(
                "overruled-committed", f"{gtrid}: {res} committed after a hand rollback"
            )
        if gtrid in self.exempt:
            return
        if (o == "R" and "C" in d.values()) or (o == "C" and "R" in d.values()):
            self._raise_later("split", f"{gtrid}: {sorted(d.items())}")
        elif o == "R" and gtrid in self.acked_set:
            self._raise_later("ack-lost", f"{gtrid} was acknowledged committed; {res} rolled back")
        elif o == "C" and gtrid in self.refused_set:
            self._raise_later(
                "refused-committed", f"{gtrid} raised to the application; {res} committed"
            )

    def _raise_later(self, kind: str, detail: str) -> None:
        # the outcome is applied inside a server call: record now, stop the run from the
        # scheduler (never unwind a greenlet halfway through a server's bookkeeping)
        self.violations.append((kind, detail, self.sched.steps, self.sched.now))
        self.note(f"VIOLATION {kind}: {detail}")

    def acked(self, gtrid: str, tx: Any) -> None:
        self.stats.committed += 1
        self.acked_set.add(gtrid)
        if gtrid not in self.exempt and "R" in self.outcomes.get(gtrid, {}).values():
            self._raise_later("ack-lost", f"{gtrid} acknowledged, but a branch rolled back")

    def refused(self, gtrid: str, why: str) -> None:
        if why.startswith("raised"):
            self.stats.raised += 1
        else:
            self.stats.rolled_back += 1
        self.refused_set.add(gtrid)
        if gtrid not in self.exempt and "C" in self.outcomes.get(gtrid, {}).values():
            self._raise_later("refused-committed", f"{gtrid} {why}, but a branch committed")

    def saga_twice(self, server: str, key: str, n: int) -> None:
        self._raise_later("saga-twice", f"{key} took effect {n} times (on {server})")

    def check_sagas(self) -> None:
        """Every saga completed or compensated: each step's action and compensation took
        effect at most once, and a compensation only where its action did."""
        counts: dict[str, dict[str, int]] = {}
        for srv in self.servers.values():
            for key, n in srv.rows.get("sagafx", {}).items():
                saga_id, step, op = key.rsplit(".", 2)
                counts.setdefault(saga_id, {})[f"{step}.{op}"] = n
        for saga_id, c in sorted(counts.items()):
            done = all(c.get(f"{s}.action", 0) == 1 for s in ("debit", "credit"))
            undone = all(
                c.get(f"{s}.compensation", 0) == c.get(f"{s}.action", 0)
                for s in ("debit", "credit")
            )
            clean = not any(k.endswith(".compensation") for k in c)
            if not (done and clean) and not undone:
                self.violation("saga-incomplete", f"saga {saga_id}: {sorted(c.items())}")
        for d in (self.main_dir, self.twin_dir):
            if d.exists():
                for record in FileSagaStore(d).records():
                    self.violation(
                        "saga-liveness", f"saga {record.saga_id} still {record.state} at the end"
                    )

    def check_foreign(self, srv: Server, raw: str) -> None:
        if raw == self.foreign.get(srv.name):
            self._raise_later("foreign-touched", f"{raw} on {srv.name}")

    # -- the network ---------------------------------------------------------------------------
    def latency(self) -> float:
        r = self.rng.random()
        return 0.0002 + r * 0.001 if r < 0.97 else 0.005 + r * 0.05

    def partitioned(self, host: str, server: str) -> bool:
        return bool(self.partitions) and (host, server) in self.partitions

    def orphan(self, conn: P.Conn, fn: Any) -> None:
        """A request on the wire when its process died: the server may still run it."""
        if self.rng.random() < 0.5:
            return
        srv, sess = conn.server, conn.session

        def deliver() -> None:
            if sess.alive and srv.up and not self.partitioned(conn.proc.host, srv.name):
                with contextlib.suppress(Exception):
                    fn(srv, sess)

        self.sched.call_at(self.sched.now + self.latency(), lambda: srv.when_awake(deliver))

    def closed(self, conn: P.Conn, cut: bool) -> None:
        """The client closed ``conn``: the server notices after a round trip (a partition:
        when the keepalive gives up; a frozen server: once it thaws)."""
        srv, sess = conn.server, conn.session
        if not sess.alive:
            return
        delay = 20.0 if self.partitioned(conn.proc.host, srv.name) else self.latency()
        self.sched.call_at(
            self.sched.now + delay, lambda: srv.when_awake(lambda: srv.disconnect(sess))
        )

    def cut(self, conn: P.Conn, fn: Any, frozen: bool) -> None:
        """The deadline cut a call: a frozen server still runs it once it thaws (it was
        sent), then finds the connection gone."""
        srv, sess = conn.server, conn.session
        if frozen:

            def late() -> None:
                if sess.alive and srv.up:
                    with contextlib.suppress(Exception):
                        fn(srv, sess)

            srv.held.append(late)
        self.closed(conn, cut=True)

    def step_crash(self) -> None:
        """Crash the calling process at this step (a round trip's start or end), rarely."""
        if not self.faults_on or self.frng.random() > self.crash_p:
            return
        proc = S.current_proc()
        if proc is None:
            return
        co = proc.data.get("coord")
        self.note(f"FAULT crash {proc.name} at a step")
        self.stats.faults += 1
        self.stats.fault_kinds["crash-at-step"] += 1
        self._crash(proc)
        if co is not None and not co.twin:
            r = self.frng.random()
            later = 0.2 + r * 8 if r < 0.7 else 10 + r * 30
            self.sched.call_at(self.sched.now + later, lambda: self._restart(co))
            if later > 10:
                self._on_call(co.node)
        raise S.SimCrash()

    def _fsync_crash(self, where: str) -> None:
        if not self.faults_on or self.frng.random() > 0.0005:
            return
        proc = S.current_proc()
        if proc is None:
            return
        self.note(f"FAULT crash {proc.name} between a log write and its fsync")
        self.stats.faults += 1
        self.stats.fault_kinds["crash-at-fsync"] += 1
        self._crash(proc)
        raise S.SimCrash()

    # -- processes ----------------------------------------------------------------------------
    def start(
        self, node: str, log_dir: Path, *, twin: bool = False, load: bool = True
    ) -> Coordinator:
        c = Coordinator(self, node, log_dir, twin, load)
        self.coords.append(c)
        self.sched.spawn(c.main, c.proc, f"{c.proc.name}/main")
        return c

    def _crash(self, proc: S.Proc) -> None:
        proc.alive = False
        patches.DISK.crash(proc, self.frng)
        for conn in proc.data.get("conns", ()):
            sess = conn.session
            if not sess.alive:
                continue
            r = self.frng.random()
            delay = self.frng.uniform(0.001, 0.5) if r < 0.8 else self.frng.uniform(5, 30)
            srv = conn.server
            self.sched.call_at(
                self.sched.now + delay,
                lambda srv=srv, sess=sess: srv.when_awake(lambda: srv.disconnect(sess)),
            )
        self.sched.kill(proc)

    def live(self, load_only: bool = False) -> list[Coordinator]:
        return [
            c
            for c in self.coords
            if c.proc.alive and c.ctx is not None and (c.load or not load_only)
        ]

    # -- faults --------------------------------------------------------------------------------
    KINDS = (
        "crash",
        "pause",
        "identity-cut",
        "twin",
        "server-restart",
        "freeze",
        "partition",
        "recover",
        "resolve",
    )

    def plan_faults(self) -> list[tuple[float, str, tuple[Any, ...]]]:
        cfg = self.cfg
        if cfg.schedule is not None:
            return list(cfg.schedule)
        rng = self.frng
        kinds = [k for k in self.KINDS if cfg.kinds is None or k in cfg.kinds]
        out: list[tuple[float, str, tuple[Any, ...]]] = []
        t = 2.0
        while kinds:
            t += rng.expovariate(cfg.fault_rate)
            if t >= cfg.duration:
                break
            kind = rng.choice(kinds)
            out.append((t, kind, (rng.random(), rng.random(), rng.random())))
            if cfg.max_faults is not None and len(out) >= cfg.max_faults:
                break
        return out

    def inject(self, kind: str, args: tuple[Any, ...]) -> None:
        if not self.faults_on:
            return
        a, b, c = args
        sched = self.sched
        names = sorted(self.servers)
        coords = self.live()
        self.stats.fault_kinds[kind] += 1
        self.stats.faults += kind not in ("recover", "resolve")
        if kind == "crash" and coords:
            co = coords[int(a * len(coords))]
            self.note(f"FAULT crash {co.proc.name}")
            self._crash(co.proc)
            if not co.twin:  # back soon, or (a host down a while) much later
                later = 0.2 + b * 8 if c < 0.7 else 10 + b * 30
                sched.call_at(sched.now + later, lambda: self._restart(co))
                if later > 10:
                    self._on_call(co.node)
        elif kind == "pause" and coords:
            co = coords[int(a * len(coords))]
            co.paused_until = max(co.paused_until, sched.now + 1 + b * 15)
            co.proc.paused_until = co.paused_until
            self.note(f"FAULT pause {co.proc.name} until {co.paused_until:.3f}")
        elif kind == "identity-cut" and coords:
            co = coords[int(a * len(coords))]
            self._cut_identity(co, b)
            if c < 0.5 and not co.twin:  # and a twin tries to start in the window
                self.note(f"FAULT twin of {co.node} starts")
                self.start(co.node, self.twin_dir, twin=True)
        elif kind == "twin" and coords:
            co = coords[int(a * len(coords))]
            self.note(f"FAULT twin of {co.node} starts")
            self.start(co.node, self.twin_dir, twin=True)
        elif kind == "server-restart":
            srv = self.servers[names[int(a * len(names))]]
            if srv.up:
                self.note(f"FAULT restart server {srv.name}")
                srv.up = False
                srv.restart()
                srv.change.wake_all()

                def back(srv: Server = srv) -> None:
                    srv.up = True
                    srv.change.wake_all()

                sched.call_at(sched.now + 0.5 + b * 5, back)
        elif kind == "freeze":
            srv = self.servers[names[int(a * len(names))]]
            if not srv.frozen and srv.up:
                self.note(f"FAULT freeze server {srv.name}")
                srv.frozen = True
                sched.call_at(sched.now + 1 + b * 20, lambda srv=srv: self._thaw(srv))
        elif kind == "partition" and coords:
            co = coords[int(a * len(coords))]
            srv = self.servers[names[int(b * len(names))]]
            pair = (co.proc.host, srv.name)
            if pair not in self.partitions:
                self.note(f"FAULT partition {pair[0]} from {pair[1]}")
                self.partitions.add(pair)
                length = 1 + c * 25
                sched.call_at(sched.now + length, lambda pair=pair, srv=srv: self._heal(pair, srv))
                if length > 15:  # the server's keepalive gives up on that host's sessions
                    sched.call_at(
                        sched.now + 15, lambda pair=pair, srv=srv: self._drop_host(pair, srv)
                    )
        elif kind == "recover" and coords:
            co = coords[int(a * len(coords))]
            ctx = co.ctx

            def op() -> None:
                self.note(f"OPERATOR recover on {co.proc.name}")
                with contextlib.suppress(XatmError):
                    run_pass(ctx, actor="operator")

            sched.spawn(op, co.proc, f"{co.proc.name}/operator")
        elif kind == "resolve" and coords:
            co = coords[int(a * len(coords))]
            self._operator_resolve(co, b, c)

    def _restart(self, co: Coordinator) -> None:
        if self.faults_on and not self.stop_load:
            self.note(f"restart {co.node}")
            self.start(co.node, co.log_dir, twin=co.twin, load=co.load)

    def _cut_identity(self, co: Coordinator, b: float) -> None:
        ctx = co.ctx
        if ctx is None:
            return
        locks = list({id(x): x for x in ctx.identity._locks.values()}.values())
        for lock in locks:
            conn = lock.conn
            if conn is not None and conn.session.alive:
                self.note(f"FAULT identity session of {co.proc.name} on {conn.server.name} cut")
                conn.server.disconnect(conn.session)

    def _thaw(self, srv: Server) -> None:
        srv.frozen = False
        self.note(f"thaw server {srv.name}")
        held, srv.held = srv.held, []
        for fn in held:
            fn()
        srv.change.wake_all()

    def _heal(self, pair: tuple[str, str], srv: Server) -> None:
        self.partitions.discard(pair)
        self.note(f"heal {pair[0]} - {pair[1]}")
        srv.change.wake_all()

    def _drop_host(self, pair: tuple[str, str], srv: Server) -> None:
        if pair in self.partitions:
            for sess in list(srv.sessions.values()):
                if sess.host == pair[0]:
                    srv.disconnect(sess)

    def _on_call(self, node: str) -> None:
        """A host is down for a while: the on-call engineer resolves its in-doubt
        transactions by hand from another host, a moment later."""
        args = (self.frng.random(), self.frng.random(), self.frng.random())

        def act() -> None:
            coords = [c for c in self.live() if c.node != node]
            if coords:
                co = coords[int(args[0] * len(coords))]
                self._operator_resolve(co, args[1], args[2], node=node)

        self.sched.call_at(self.sched.now + 0.3 + args[0] * 2.5, act)

    def _operator_resolve(
        self, co: Coordinator, b: float, c: float, node: str | None = None
    ) -> None:
        """An operator resolves one in-doubt transaction by hand: without --force first;
        sometimes insisting with --force (that gtrid may then split: exempt)."""
        # what `xatm indoubt` shows: branches prepared for a while
        now = self.sched.now
        prepared = sorted(
            {
                raw
                for srv in self.servers.values()
                for raw, txn in srv.prepared.items()
                if raw != self.foreign.get(srv.name)
                and (
                    now - txn.at > 1.0
                    if node is None
                    else txn.gtrid is not None and f".{node}." in txn.gtrid
                )
            }
        )
        if not prepared:
            return
        from xatm.core.xid import Xid

        xid = Xid.from_pg_gid(prepared[int(b * len(prepared))])
        if xid is None:
            return
        gtrid = xid.gtrid
        outcome = "commit" if c < 0.5 else "rollback"
        force = c < 0.1 or c > 0.9
        ctx = co.ctx

        def op() -> None:
            self.note(f"OPERATOR {outcome} {gtrid} on {co.proc.name}")
            try:
                resolve(ctx, gtrid, outcome, actor="operator")
                self.note(f"OPERATOR {outcome} {gtrid}: done")
                return
            except ResolutionRefused as e:
                self.note(f"OPERATOR {outcome} {gtrid}: refused ({str(e)[:80]})")
            except XatmError as e:
                self.note(f"OPERATOR {outcome} {gtrid}: {type(e).__name__}")
                return
            if not force:
                return
            self.exempt.add(gtrid)  # the operator overrides the rule: a split is theirs
            self.note(f"OPERATOR {outcome} --force {gtrid}")
            # the operator's latest forced outcome is the one that holds from now on
            forced = self.forced[gtrid] = self.forced.get(gtrid, 0) + 1
            self.overruled.discard(gtrid)
            with contextlib.suppress(XatmError):
                res = resolve(ctx, gtrid, outcome, force=True, actor="operator")
                if res.overruled and res.owner == "dead" and self.forced[gtrid] == forced:
                    # a rollback that overruled COMMIT holds: nothing commits it any more
                    self.overruled.add(gtrid)
                    self.note(f"OPERATOR rollback --force {gtrid}: COMMIT overruled")

        self.sched.spawn(op, co.proc, f"{co.proc.name}/operator")

    # -- the run -------------------------------------------------------------------------------
    def paused(self) -> None:
        pass

    def run(self) -> None:
        cfg = self.cfg
        sched = self.sched
        for node in self.nodes:
            self.start(node, self.main_dir)
        t = 5.0
        while t < cfg.duration:  # an operator looks at `xatm indoubt` now and then
            t += 1.0 + self.frng.random() * 4
            args = (self.frng.random(), self.frng.random(), self.frng.random())
            sched.call_at(t, lambda args=args: self.inject("resolve", args))
        for t, kind, args in self.plan_faults():
            sched.call_at(t, lambda kind=kind, args=args: self.inject(kind, args))
        self._loop(cfg.duration)
        # the faults stop; the load stops; then every process dies and each log directory's
        # nodes are started again, one group at a time, to recover
        self.faults_on = False
        self.stop_load = True
        for srv in self.servers.values():
            if srv.frozen:
                self._thaw(srv)
            if not srv.up:
                srv.up = True
                srv.change.wake_all()
        for pair in list(self.partitions):
            self._heal(pair, self.servers[pair[1]])
        self._loop(sched.now + 3 * cfg.timeout)
        self.note("faults over: every process is stopped; recovery groups start")
        for co in list(self.coords):
            if co.proc.alive:
                self._crash(co.proc)
        self.stats.faults -= 0
        groups = [self.main_dir]
        if (self.twin_dir).exists():
            groups.append(self.twin_dir)
        for _ in range(2):
            for d in groups:
                started = [self.start(n, d, load=False) for n in self._nodes_in(d)]
                self._loop(sched.now + cfg.recover_for)
                for co in started:
                    if co.proc.alive:
                        self._crash(co.proc)
                self._loop(sched.now + 1.0)
            if not self._left() and not self._unfinished_sagas():
                break
        self.check_end()

    def _unfinished_sagas(self) -> bool:
        """A saga of one group may wait for a row that a branch of the other group held until
        that group's turn (its compensation then stuck, retried every STUCK_RETRY): each
        group gets another turn then."""
        return any(
            d.exists() and FileSagaStore(d).records() for d in (self.main_dir, self.twin_dir)
        )

    def _nodes_in(self, d: Path) -> list[str]:
        if not d.exists():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "lock").exists())

    def _left(self) -> list[tuple[str, str]]:
        return [
            (srv.name, raw)
            for srv in self.servers.values()
            for raw in sorted(srv.prepared)
            if raw != self.foreign.get(srv.name)
        ]

    def _loop(self, until: float) -> None:
        sched = self.sched

        def stop() -> bool:
            return bool(self.violations) and self.cfg.stop_at_first

        while True:
            sched.run(until, stop=stop)
            if self.violations and self.cfg.stop_at_first:
                kind, detail, _, _ = self.violations[0]
                raise Violation(f"{kind}: {detail}")
            if sched.now >= until:
                return

    def check_end(self) -> None:
        for name, raw in self._left():
            self.violation("liveness", f"{raw} still prepared on {name} after recovery")
        for srv in self.servers.values():
            if self.foreign[srv.name] not in srv.prepared:
                self.violation(
                    "foreign-touched", f"the foreign prepared transaction on {srv.name} is gone"
                )
        for gtrid in sorted(self.acked_set - self.exempt):
            d = self.outcomes.get(gtrid, {})
            if not d or any(o != "C" for o in d.values()):
                self.violation("ack-lost", f"{gtrid} acknowledged; branches: {sorted(d.items())}")
        self.check_sagas()
        total = sum(sum(srv.rows["acct"].values()) for srv in self.servers.values())
        if not self.exempt and total != 1000 * self.cfg.accounts * len(self.servers):
            self.violation("conservation", f"the balances sum to {total}")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Result:
    seed: int
    ok: bool
    tx: int
    committed: int
    faults: int
    steps: int
    vtime: float
    violation: str | None
    violation_steps: int | None
    trace: list[str]
    kinds: dict[str, int]
    sagas: int = 0


def run_seed(cfg: Config) -> Result:
    world = World(cfg)
    violation = None
    vsteps = None
    try:
        with contextlib.suppress(Violation):
            world.run()
        if world.violations:
            kind, detail, steps, _ = world.violations[0]
            violation = f"{kind}: {detail}"
            vsteps = steps
    finally:
        world.close()
    trace = _short_trace(world, violation)
    return Result(
        cfg.seed,
        violation is None,
        world.stats.tx,
        world.stats.committed,
        world.stats.faults,
        world.sched.steps,
        world.sched.now,
        violation,
        vsteps,
        trace,
        dict(world.stats.fault_kinds),
        world.stats.sagas,
    )


def _short_trace(world: World, violation: str | None) -> list[str]:
    if violation is None:
        return []
    import re

    m = re.search(r"xatm\.[\w.-]+", violation)
    gtrid = m.group(0) if m else None
    out = []
    for e in world.events:
        if (
            "FAULT" in e
            or "OPERATOR" in e
            or "VIOLATION" in e
            or "crash" in e
            or "restart" in e
            or (gtrid and gtrid in e)
            or "started" in e
            or "refused" in e
        ):
            out.append(e)
    return out[-60:]


def _env_check() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        raise RuntimeError("run the simulator with PYTHONHASHSEED=0 (tests/sim/run.py does)")
