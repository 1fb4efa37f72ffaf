"""Simulated participants: xatm's Participant interface over the in-memory servers and network.

One :class:`SimParticipant` per resource per simulated process. Every call is a round trip
(:func:`rpc`): the request travels (the greenlet parks; a crash of the process here may still
let the request reach the server, as bytes already sent do), the server runs it atomically
(or it waits for a row lock, or for a frozen or partitioned server), the answer travels back.
A call that waits past the deadline xatm armed for its connection (``xatm.core.deadline``) is cut
there, as the watchdog does: the connection fails, and a frozen server still runs what it was
sent once it thaws.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from tests.sim import sched as S
from tests.sim.servers import ACCT, DEC, Blocked, ConnLost, DBError, Server, Session
from xatm.core import deadline as _deadline
from xatm.core.participant import (
    CANNOT_TELL,
    BranchVotedNo,
    ErrorKind,
    Finding,
    PhaseTwo,
    Prepared,
    PreparedBranch,
    Vote,
)
from xatm.core.urls import ResourceSpec
from xatm.core.xid import Xid
from xatm.errors import ResourceUnavailable
from xatm.sagas import barrier as _barrier

CONNECT_TIMEOUT = 5.0  # xatm.core.urls.DEFAULT_CONNECT_TIMEOUT

UPDATE = "UPDATE acct SET bal = bal + %s WHERE id = %s"
MARKER_DDL = "CREATE TABLE IF NOT EXISTS xatm_decisions (sim)"
_INSERT_DEC = f"INSERT INTO {DEC} (gtrid, branches, created_at) VALUES (%s, %s, %s)"
_SELECT_ALL = f"SELECT gtrid, branches, created_at FROM {DEC}"
_SELECT_ONE = f"SELECT branches FROM {DEC} WHERE gtrid = %s"
_DELETE_IN = f"DELETE FROM {DEC} WHERE gtrid IN ("
_DELETE_OLD = f"DELETE FROM {DEC} WHERE branches = %s AND created_at < %s"
_BARRIER_INSERTS = frozenset(_barrier._INSERT.values())
_BARRIER_SELECT = _barrier._SELECT
#: a barrier row written into its statement, sent with the begin (``begin_with``)
_BARRIER_RIDING = re.compile(
    r"INSERT INTO xatm_barrier .* VALUES \('([^']*)', '([^']*)', '([^']*)', "
)
EFFECT = "UPDATE sagafx SET n = n + 1 WHERE k = %s"  # a saga step's work (tests.sim.world)


class Conn:
    __slots__ = ("closed", "in_xa", "proc", "server", "session")

    def __init__(self, proc: S.Proc, server: Server, session: Session) -> None:
        self.proc = proc
        self.server = server
        self.session = session
        self.closed = False
        self.in_xa = False


class Cursor:
    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int = -1) -> None:
        self._rows = rows
        self.rowcount = rowcount if rowcount >= 0 else len(rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    def close(self) -> None:
        pass


def _raw(xid: Xid) -> str:
    return xid.to_pg_gid()


def rpc(conn: Conn, fn: Callable[[Server, Session], Any]) -> Any:
    """One round trip on ``conn``: ``fn`` runs on the server when the request arrives."""
    world = WORLD
    sched = S.SCHED
    proc = conn.proc
    if not proc.alive:
        raise S.SimCrash()
    if conn.closed:
        raise ConnLost("the connection is closed")
    server = conn.server
    session = conn.session
    world.step_crash()
    try:
        sched.sleep(world.latency())
    except S.SimCrash:
        world.orphan(conn, fn)  # the request was on the wire: it may still arrive
        raise
    started = sched.now
    lock_limit = float("inf")
    while True:
        if not session.alive or not server.up:
            conn.closed = True
            raise ConnLost("server closed the connection unexpectedly")
        on_lock = False
        if server.frozen or world.partitioned(proc.host, server.name):
            q = server.change
        else:
            try:
                result = fn(server, session)
                break
            except Blocked as b:
                q = server.lockq.get(b.key)
                if q is None:
                    q = server.lockq[b.key] = S.WaitQ()
                on_lock = True
                if lock_limit == float("inf"):
                    lock_limit = sched.now + session.lock_wait
                elif sched.now >= lock_limit - 1e-9:
                    server._fail(session)
                    raise DBError("locktimeout", "lock wait timeout exceeded") from None
        # blocked: until the server answers, a lock wait times out, the call's deadline
        # (xatm.core.deadline: the watchdog cuts it) or the driver's backstop
        watch = _deadline._armed.get(id(conn))
        watch_limit = float("inf")
        if watch is not None and watch.busy and not watch.done:
            watch_limit = watch.deadline - 1000.0  # time.monotonic() is 1000 + now
        backstop_limit = started + world.backstop
        cut_at = min(watch_limit, backstop_limit)
        if sched.now >= cut_at - 1e-9:
            if watch_limit <= backstop_limit:
                assert watch is not None
                watch.fired = True  # what the watchdog does before it cuts the socket
            else:
                world.violation(
                    "wait-bound",
                    f"a call to {server.name} waited {sched.now - started:.1f} s with no"
                    " deadline armed on its connection (only the driver's backstop ended it)",
                )
            conn.closed = True
            world.cut(conn, fn, frozen=server.frozen)
            raise ConnLost("the connection was cut: no answer in time")
        sched.wait(q, (min(cut_at, lock_limit) if on_lock else cut_at) - sched.now)
    sched.sleep(world.latency())
    world.step_crash()
    return result


class SimParticipant:
    """xatm's Participant protocol for one simulated resource, in one simulated process."""

    def __init__(self, name: str, server: Server, proc: S.Proc) -> None:
        self.name = name
        self.server = server
        self.proc = proc
        kind = "postgresql" if server.kind == "pg" else "mysql"
        port = 5432 if kind == "postgresql" else 3306
        self.spec = ResourceSpec(kind, server.host, port, "app", None, "bank")
        self._kind = kind
        pg = server.kind == "pg"
        self.nota_may_be_held = not pg
        self.sends_without_waiting = pg
        self.marker_in_one_round_trip = pg
        self.marker_ddl = MARKER_DDL

    @property
    def kind(self) -> Any:
        return self._kind

    # -- connections -------------------------------------------------------------------------
    def connect(self) -> Conn:
        world = WORLD
        sched = S.SCHED
        proc = self.proc
        if not proc.alive:
            raise S.SimCrash()
        server = self.server
        started = sched.now
        sched.sleep(world.latency())
        while True:
            if not server.up:
                raise ResourceUnavailable(
                    f"cannot connect to resource {self.name!r}: connection refused",
                    resource=self.name,
                )
            if not (server.frozen or world.partitioned(proc.host, server.name)):
                break
            left = started + CONNECT_TIMEOUT - sched.now
            if left <= 0:
                raise ResourceUnavailable(
                    f"cannot connect to resource {self.name!r}: timeout expired",
                    resource=self.name,
                )
            sched.wait(server.change, left)
        session = server.open_session(proc.host)
        conn = Conn(proc, server, session)
        proc.data.setdefault("conns", {})[conn] = None
        sched.sleep(world.latency())
        return conn

    def ping(self, conn: Conn) -> bool:
        try:
            rpc(conn, lambda srv, s: None)
        except (ConnLost, DBError):
            return False
        return True

    def is_idle(self, conn: Conn) -> bool:
        return (
            not conn.closed and conn.session.alive and conn.session.txn is None and not conn.in_xa
        )

    def close(self, conn: Conn) -> None:
        if conn.closed:
            WORLD.closed(conn, cut=False)
            return
        conn.closed = True
        if self.proc.alive:
            WORLD.closed(conn, cut=False)

    def is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnLost)

    def socket_of(self, conn: Conn) -> int | None:
        return None if conn.closed else 1

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnLost):
            return ErrorKind.GONE
        if isinstance(exc, DBError) and exc.code == "locktimeout":
            return ErrorKind.LOCK_TIMEOUT
        return ErrorKind.OTHER

    def is_duplicate_key(self, exc: BaseException) -> bool:
        return isinstance(exc, DBError) and exc.code == "dup"

    def is_xid_in_use(self, exc: BaseException) -> bool:
        return False  # the simulated servers end a lost session's branch at once

    def is_missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, DBError) and exc.code == "notable"

    def driver_info(self, conn: Conn) -> str:
        return "simulated"

    # -- the branch --------------------------------------------------------------------------
    def begin(self, conn: Conn, xid: Xid, timeout: float | None = None) -> None:
        raw, gtrid, res = _raw(xid), xid.gtrid, self.name
        conn.in_xa = self.server.xa
        rpc(conn, lambda srv, s: srv.begin(s, raw, gtrid, res, timeout))

    def begin_with(self, conn: Conn, xid: Xid, timeout: float | None, insert: str) -> bool:
        """The begin, then the barrier row's insert (one round trip for the real
        participants; two calls here, a crash may fall between them)."""
        self.begin(conn, xid, timeout)
        found = _BARRIER_RIDING.match(insert)
        assert found is not None, insert
        key = (found[1], found[2], found[3])
        return bool(rpc(conn, lambda srv, s: srv.insert_barrier(s, key)) == 1)

    def execute(self, conn: Conn, sql: Any, params: Sequence[Any] | Any = None) -> Cursor:
        p = tuple(params or ())
        if sql == UPDATE:
            delta, key = p
            return Cursor([], rpc(conn, lambda srv, s: srv.add(s, key, delta)))
        if sql in _BARRIER_INSERTS:
            key = (str(p[0]), str(p[1]), str(p[2]))
            return Cursor([], rpc(conn, lambda srv, s: srv.insert_barrier(s, key)))
        if sql == _BARRIER_SELECT:
            return Cursor(rpc(conn, lambda srv, s: srv.barrier_ops(s, p[0], p[1])))
        if sql == EFFECT:
            return Cursor([], rpc(conn, lambda srv, s: srv.effect(s, p[0])))
        if sql == _SELECT_ALL:
            return Cursor(rpc(conn, lambda srv, s: srv.select_dec(s, None)))
        if sql == _SELECT_ONE:
            return Cursor(rpc(conn, lambda srv, s: srv.select_dec(s, p[0])))
        if sql == MARKER_DDL:
            rpc(conn, lambda srv, s: srv.create_dec(s))
            return Cursor([])
        if sql == _INSERT_DEC:
            return Cursor([], self._auto(conn, lambda srv, s: srv.insert_dec(s, *p)))
        if isinstance(sql, str) and sql.startswith(_DELETE_IN):
            return Cursor([], self._auto(conn, lambda srv, s: srv.delete_dec(s, list(p))))
        if sql == _DELETE_OLD:
            rpc(conn, lambda srv, s: srv.delete_old_fences(s, p[0], p[1]))
            return Cursor([])
        raise DBError("syntax", f"the simulator does not know this statement: {sql!r}")

    def _auto(self, conn: Conn, fn: Callable[[Server, Session], Any]) -> Any:
        """A statement in the session's transaction, or (none open) autocommitted."""

        def run(srv: Server, s: Session) -> Any:
            if s.txn is not None:
                return fn(srv, s)
            srv.begin(s, None, None, self.name, None)
            try:
                out = fn(srv, s)
            except Blocked:
                srv.rollback_active(s)
                raise
            except DBError:
                srv.rollback_active(s)
                raise
            srv.commit_one_phase(s)
            return out

        return rpc(conn, run)

    def prepare(self, conn: Conn, xid: Xid) -> Prepared:
        try:
            txid = rpc(conn, lambda srv, s: srv.prepare(s))
        except DBError as e:
            if self.server.xa:
                conn.in_xa = False
            raise BranchVotedNo(f"PREPARE failed: {e}", e) from e
        if self.server.kind == "pg":
            if txid is None:
                return Prepared(Vote.READ_ONLY)
            return Prepared(Vote.PREPARED, txid)
        if self.server.kind == "mysql8":
            conn.in_xa = False  # detached at prepare: the session is free again
        return Prepared(Vote.PREPARED)

    def start_prepare(self, conn: Conn, xid: Xid) -> Callable[[], Prepared]:
        vote = self.prepare(conn, xid)
        return lambda: vote

    def start_commit_prepared(self, conn: Conn, xid: Xid) -> Callable[[], PhaseTwo]:
        result = self.commit_prepared(conn, xid)
        return lambda: result

    def commit_one_phase(self, conn: Conn, xid: Xid, before: Sequence[Any] = ()) -> None:
        pg = self.server.kind == "pg"

        def statements(srv: Server, s: Session) -> None:
            for q, p in before:
                if q == _INSERT_DEC:
                    srv.insert_dec(s, *p)
                elif isinstance(q, str) and q.startswith(_DELETE_IN):
                    srv.delete_dec(s, list(p))
                else:
                    raise DBError("syntax", f"unknown statement {q!r}")

        def rollback(srv: Server, s: Session) -> None:
            srv.rollback_active(s)

        try:
            if pg:  # the statements and the COMMIT in one round trip

                def all_of(srv: Server, s: Session) -> None:
                    try:
                        statements(srv, s)
                    except DBError:
                        srv.rollback_active(s)
                        raise
                    srv.commit_one_phase(s)

                rpc(conn, all_of)
            else:  # each statement its own round trip, then XA END + XA COMMIT ONE PHASE
                try:
                    for q, p in before:
                        one = ((q, p),)
                        rpc(conn, lambda srv, s, one=one: _run_before(srv, s, one))
                except DBError:
                    rpc(conn, rollback)
                    raise
                rpc(conn, lambda srv, s: srv.commit_one_phase(s))
        except DBError as e:
            conn.in_xa = False
            raise BranchVotedNo(f"the one-phase commit failed: {e}", e) from e
        conn.in_xa = False

    def commit_prepared(self, conn: Conn, xid: Xid) -> PhaseTwo:
        return self._finish(conn, xid, True)

    def rollback_prepared(self, conn: Conn, xid: Xid) -> PhaseTwo:
        return self._finish(conn, xid, False)

    def _finish(self, conn: Conn, xid: Xid, commit: bool) -> PhaseTwo:
        raw = _raw(xid)
        WORLD.check_foreign(self.server, raw)
        found = rpc(conn, lambda srv, s: srv.finish_prepared(s, raw, commit))
        if not found:
            return PhaseTwo.NOT_FOUND
        conn.in_xa = False
        return PhaseTwo.DONE

    def rollback_active(self, conn: Conn, xid: Xid) -> None:
        rpc(conn, lambda srv, s: srv.rollback_active(s))
        conn.in_xa = False

    # -- recovery and fitness ----------------------------------------------------------------
    def recover(self, conn: Conn) -> list[PreparedBranch]:
        rows = rpc(conn, lambda srv, s: srv.recover(s))
        return [PreparedBranch(Xid.from_pg_gid(raw), raw, None, owner) for raw, _, owner in rows]

    def adopt(self, conn: Conn, info: dict[str, Any]) -> bool:
        raise NotImplementedError

    def set_autocommit(self, conn: Conn, on: bool) -> None:
        raise NotImplementedError

    def scalar(self, conn: Conn, sql: str) -> Any:
        return None

    def server_version(self, conn: Conn) -> str:
        return f"simulated {self.server.kind}"

    def two_phase_detail(self, conn: Conn) -> str:
        return "simulated"

    def wait_findings(self, conn: Conn, timeout: float | None) -> list[Finding]:
        return []

    def check(self, conn: Conn) -> list[str]:
        return []

    def create_table(self, conn: Conn, ddl: str) -> None:
        self.execute(conn, ddl)

    def table_exists(self, conn: Conn, table: str) -> bool:
        return bool(rpc(conn, lambda srv, s: srv.has_dec if table == DEC else table == ACCT))

    def local_transaction(
        self, conn: Conn, statements: Sequence[Any], *, lock_wait: float, commit: bool
    ) -> None:
        name = self.name

        def begin(srv: Server, s: Session) -> None:
            srv.begin(s, None, None, name, None)
            s.lock_wait = lock_wait

        rpc(conn, begin)
        try:
            for q, p in statements:
                one = ((q, p),)
                rpc(conn, lambda srv, s, one=one: _run_before(srv, s, one))
        except S.SimCrash:
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                rpc(conn, lambda srv, s: srv.rollback_active(s))
            raise
        if commit:
            rpc(conn, lambda srv, s: srv.commit_one_phase(s))
        else:
            rpc(conn, lambda srv, s: srv.rollback_active(s))

    def take_identity(self, conn: Conn, node_id: str) -> bool:
        name = f"xatm:node:{node_id}"
        return bool(rpc(conn, lambda srv, s: srv.take_lock(s, name)))

    def identity_holder(self, conn: Conn, node_id: str) -> int | None:
        name = f"xatm:node:{node_id}"
        holder: int | None = rpc(conn, lambda srv, s: srv.lock_holder(s, name))
        return holder

    def identity_session(self, conn: Conn) -> tuple[str, int]:
        srv = self.server
        place = f"{srv.name}@{srv.epoch}/bank" if srv.kind == "pg" else f"{srv.host}:3306"
        rpc(conn, lambda srv, s: None)
        return place, conn.session.id

    def verify_finished(self, conn: Conn, txid: int | None) -> tuple[Any, str]:
        if self.server.kind != "pg":
            return "unknown", CANNOT_TELL
        if txid is None:
            return "unknown", CANNOT_TELL + ": no transaction id was logged"
        status = rpc(conn, lambda srv, s: srv.xact_status(s, txid))
        if status == "committed":
            return "committed", f"committed (PostgreSQL transaction {txid})"
        if status in ("aborted", "future"):
            return "aborted", f"rolled back (PostgreSQL transaction {txid} {status})"
        if status == "in progress":
            return "in progress", f"PostgreSQL transaction {txid} is still in progress"
        return "unknown", CANNOT_TELL

    def branch_locks(
        self, conn: Conn, branch: PreparedBranch
    ) -> tuple[int | None, tuple[str, ...]]:
        return None, ()


def _run_before(srv: Server, s: Session, statements: Sequence[Any]) -> None:
    for q, p in statements:
        if q == _INSERT_DEC:
            srv.insert_dec(s, *p)
        elif isinstance(q, str) and q.startswith(_DELETE_IN):
            srv.delete_dec(s, list(p))
        else:
            raise DBError("syntax", f"unknown statement {q!r}")


WORLD: Any = None  # the world of the run in progress (tests.sim.world sets it)
