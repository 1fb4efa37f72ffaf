"""In-memory database servers with the two-phase-commit semantics xatm's adapters rely on.

* PostgreSQL (``pg``): ``PREPARE TRANSACTION`` detaches the branch from its session; prepared
  branches survive disconnects and restarts; ``pg_prepared_xacts`` lists them all; every
  writing transaction gets a txid whose status (``pg_xact_status``) is kept; session
  advisory locks per database; a failed statement aborts the transaction; lock waits bounded
  by the branch's ``lock_timeout``.
* MariaDB (``maria``): ``XA PREPARE`` leaves the branch attached to its session until that
  session disconnects: another session's ``XA COMMIT`` / ``XA ROLLBACK`` answers XAER_NOTA
  meanwhile; ``XA RECOVER`` is server-wide and lists attached branches too; an unprepared XA
  branch is rolled back at disconnect; ``GET_LOCK`` per server; no status of finished XA.
* MySQL 8 (``mysql8``): as MariaDB, but the branch is detached at prepare
  (``xa_detach_on_prepare``): any session may finish it at once.

Rows have locks; a statement that meets a lock held by another transaction raises
:class:`Blocked` and the network layer waits (a lock wait). Every commit or rollback of an
xatm branch is reported to the world's ledger (atomicity is checked there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.sim import sched as S

ACCT = "acct"
DEC = "xatm_decisions"
BAR = "xatm_barrier"
FX = "sagafx"  # how often each saga step's action / compensation took effect


class DBError(Exception):
    """A server's error answer (the connection is fine)."""

    def __init__(self, code: str, msg: str = "") -> None:
        super().__init__(f"{code}: {msg}" if msg else code)
        self.code = code


class ConnLost(Exception):
    """The connection is gone (reset, refused, cut by a deadline, closed)."""


class Blocked(Exception):
    """A row lock held by another transaction: wait, then run the statement again."""

    def __init__(self, key: tuple[str, Any]) -> None:
        self.key = key


class Txn:
    __slots__ = ("at", "gtrid", "locks", "owner", "raw", "res", "state", "txid", "writes")

    def __init__(self, raw: str | None, gtrid: str | None, res: str) -> None:
        self.raw = raw  # the gid / XID as the server shows it (None: a local transaction)
        self.gtrid = gtrid  # the xatm gtrid (None: not an xatm branch)
        self.res = res
        self.writes: dict[tuple[str, Any], Any] = {}  # key -> new value (None: deleted)
        self.locks: set[tuple[str, Any]] = set()
        self.txid: int | None = None
        self.state = "active"  # active | failed | prepared
        self.owner: int | None = None  # the session a prepared XA branch is attached to
        self.at = 0.0  # when it was prepared (virtual seconds)


class Session:
    __slots__ = ("alive", "host", "id", "lock_wait", "txn")

    def __init__(self, sid: int, host: str) -> None:
        self.id = sid
        self.host = host
        self.alive = True
        self.txn: Txn | None = None
        self.lock_wait = 5.0


class Server:
    def __init__(self, world: Any, name: str, kind: str, host: str, accounts: int) -> None:
        self.world = world
        self.name = name  # the resource name (one resource per server)
        self.kind = kind
        self.host = host
        self.up = True
        self.frozen = False
        self.epoch = 1  # bumped at each restart (PostgreSQL's postmaster start time)
        self.rows: dict[str, dict[Any, Any]] = {ACCT: {i: 1000 for i in range(accounts)}}
        self.has_dec = False
        self.locks: dict[tuple[str, Any], Txn] = {}
        self.lockq: dict[tuple[str, Any], S.WaitQ] = {}
        self.change = S.WaitQ()  # woken when the server thaws or comes back
        self.prepared: dict[str, Txn] = {}
        self.sessions: dict[int, Session] = {}
        self._next_session = 100
        self._next_txid = 1000
        self.xact: dict[int, str] = {}
        self.adv: dict[str, int] = {}  # identity lock name -> session id
        #: what a frozen server will do once it thaws, in order (requests it was sent,
        #: disconnects it has not noticed yet)
        self.held: list[Callable[[], Any]] = []
        self.lock_wait_default = 5.0  # innodb_lock_wait_timeout (MariaDB / MySQL)

    def when_awake(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` now, or (a frozen server) once it thaws."""
        if self.frozen:
            self.held.append(fn)
        else:
            fn()

    @property
    def xa(self) -> bool:
        return self.kind != "pg"

    # -- sessions ----------------------------------------------------------------------------
    def open_session(self, host: str) -> Session:
        self._next_session += 1
        s = Session(self._next_session, host)
        s.lock_wait = self.lock_wait_default
        self.sessions[s.id] = s
        return s

    def disconnect(self, s: Session) -> None:
        """The server notices the session is gone: its unprepared work is rolled back, its
        session locks released; a MariaDB branch attached to it is detached (stays prepared)."""
        if not s.alive:
            return
        s.alive = False
        self.sessions.pop(s.id, None)
        txn = s.txn
        s.txn = None
        if txn is not None and txn.state != "prepared":
            self._finish(txn, commit=False)
        for t in self.prepared.values():
            if t.owner == s.id:
                t.owner = None
        for name in [n for n, sid in self.adv.items() if sid == s.id]:
            del self.adv[name]

    def restart(self) -> None:
        """Crash: every session goes; prepared branches stay (detached)."""
        for s in list(self.sessions.values()):
            self.disconnect(s)
        self.held.clear()
        self.epoch += 1

    # -- locks and data ----------------------------------------------------------------------
    def _lock(self, txn: Txn, key: tuple[str, Any]) -> None:
        holder = self.locks.get(key)
        if holder is None:
            self.locks[key] = txn
            txn.locks.add(key)
        elif holder is not txn:
            raise Blocked(key)

    def _release(self, txn: Txn) -> None:
        for key in txn.locks:
            if self.locks.get(key) is txn:
                del self.locks[key]
                q = self.lockq.get(key)
                if q is not None and q.tasks:
                    q.wake_all()
        txn.locks.clear()

    def _finish(self, txn: Txn, commit: bool) -> None:
        if commit:
            for (table, key), value in txn.writes.items():
                rows = self.rows.setdefault(table, {})
                if value is None:
                    rows.pop(key, None)
                else:
                    rows[key] = value
                if table == FX and value > 1:
                    self.world.saga_twice(self.name, key, value)
        if txn.txid is not None:
            self.xact[txn.txid] = "committed" if commit else "aborted"
        self._release(txn)
        if txn.raw is not None:
            self.prepared.pop(txn.raw, None)
        if txn.gtrid is not None:
            self.world.outcome(txn.gtrid, self.name, "C" if commit else "R", txn)

    def _value(self, txn: Txn | None, table: str, key: Any) -> Any:
        if txn is not None and (table, key) in txn.writes:
            return txn.writes[(table, key)]
        return self.rows.get(table, {}).get(key)

    def _write(self, txn: Txn, table: str, key: Any, value: Any) -> None:
        if self.kind == "pg" and txn.txid is None:
            self._next_txid += 1
            txn.txid = self._next_txid
            self.xact[txn.txid] = "in progress"
        txn.writes[(table, key)] = value

    def _active(self, s: Session) -> Txn:
        txn = s.txn
        if txn is None:
            raise DBError("notx", "no transaction in progress")
        if txn.state == "failed":
            raise DBError("aborted", "current transaction is aborted")
        if txn.state == "prepared":
            raise DBError("xaer_rmfail", "the branch is prepared")
        return txn

    def _fail(self, s: Session) -> None:
        """A statement failed: PostgreSQL aborts the transaction; InnoDB only the statement."""
        if self.kind == "pg" and s.txn is not None and s.txn.state == "active":
            s.txn.state = "failed"

    # -- statements (each runs atomically at delivery; Blocked: wait and run again) ----------
    def begin(
        self, s: Session, raw: str | None, gtrid: str | None, res: str, lock_wait: float | None
    ) -> None:
        if s.txn is not None:
            raise DBError("xaer_outside" if self.xa else "intx", "a transaction is in progress")
        if raw is not None and self.xa and (raw in self.prepared):
            raise DBError("xaer_dupid", "the XID already exists")
        s.txn = Txn(raw, gtrid, res)
        if lock_wait is not None and self.kind == "pg":
            s.lock_wait = lock_wait

    def add(self, s: Session, key: Any, delta: int) -> int:
        txn = self._active(s)
        k = (ACCT, key)
        try:
            self._lock(txn, k)
        except Blocked:
            raise
        value = self._value(txn, ACCT, key)
        if value is None:
            return 0
        self._write(txn, ACCT, key, value + delta)
        return 1

    def insert_dec(self, s: Session, gtrid: str, payload: str, created: float) -> None:
        if not self.has_dec:
            self._fail(s)
            raise DBError("notable", "relation xatm_decisions does not exist")
        txn = self._active(s)
        k = (DEC, gtrid)
        holder = self.locks.get(k)
        if holder is not None and holder is not txn:
            raise Blocked(k)
        if self._value(txn, DEC, gtrid) is not None:
            self._fail(s)
            raise DBError("dup", "duplicate key value violates unique constraint")
        self._lock(txn, k)
        self._write(txn, DEC, gtrid, (payload, created))

    def delete_dec(self, s: Session, gtrids: list[str]) -> int:
        if not self.has_dec:
            self._fail(s)
            raise DBError("notable", "relation xatm_decisions does not exist")
        txn = s.txn
        n = 0
        for g in gtrids:
            if self._value(txn, DEC, g) is None:
                continue
            k = (DEC, g)
            if txn is None:
                holder = self.locks.get(k)
                if holder is not None:
                    raise Blocked(k)
                self.rows[DEC].pop(g, None)
            else:
                self._active(s)
                self._lock(txn, k)
                self._write(txn, DEC, g, None)
            n += 1
        return n

    def delete_old_fences(self, s: Session, payload: str, before: float) -> None:
        if not self.has_dec:
            raise DBError("notable", "relation xatm_decisions does not exist")
        rows = self.rows[DEC]
        for g, (p, created) in list(rows.items()):
            if p == payload and created < before and (DEC, g) not in self.locks:
                del rows[g]

    def select_dec(self, s: Session, gtrid: str | None) -> list[tuple[Any, ...]]:
        if not self.has_dec:
            self._fail(s)
            raise DBError("notable", "relation xatm_decisions does not exist")
        rows = self.rows[DEC]
        if gtrid is None:
            return [(g, p, c) for g, (p, c) in sorted(rows.items())]
        found = self._value(s.txn, DEC, gtrid)
        return [] if found is None else [(found[0],)]

    def create_dec(self, s: Session) -> None:
        if not self.has_dec:
            self.has_dec = True
            self.rows.setdefault(DEC, {})

    def insert_barrier(self, s: Session, key: tuple[str, str, str]) -> int:
        """``INSERT ... ON CONFLICT DO NOTHING`` / ``INSERT IGNORE`` of a barrier row:
        1 row, or 0 if it exists (waits for another transaction's uncommitted insert)."""
        txn = self._active(s)
        k = (BAR, key)
        holder = self.locks.get(k)
        if holder is not None and holder is not txn:
            raise Blocked(k)
        if self._value(txn, BAR, key) is not None:
            return 0
        self._lock(txn, k)
        self._write(txn, BAR, key, 1)
        return 1

    def barrier_ops(self, s: Session, saga_id: str, step: str) -> list[tuple[str]]:
        txn = s.txn
        return [
            (op,)
            for op in ("action", "compensation")
            if self._value(txn, BAR, (saga_id, step, op)) is not None
        ]

    def effect(self, s: Session, key: str) -> int:
        """A saga step's own work: count it (checked at commit: at most once)."""
        txn = self._active(s)
        self._lock(txn, (FX, key))
        self._write(txn, FX, key, (self._value(txn, FX, key) or 0) + 1)
        return 1

    def prepare(self, s: Session) -> int | None:
        """PREPARE / XA END + XA PREPARE. Returns the PostgreSQL txid (None: read-only)."""
        txn = s.txn
        if txn is None:
            raise DBError("notx", "no transaction in progress")
        if txn.state == "failed":
            s.txn = None
            self._finish(txn, commit=False)
            raise DBError("rolledback", "the transaction was aborted: PREPARE rolled it back")
        if txn.state == "prepared":
            raise DBError("xaer_rmfail", "already prepared")
        assert txn.raw is not None
        if self.kind == "pg" and not txn.writes:
            s.txn = None
            self._finish(txn, commit=True)  # read-only: committed, nothing to do
            return None
        txn.state = "prepared"
        txn.at = S.SCHED.now
        self.prepared[txn.raw] = txn
        if self.kind == "maria":
            txn.owner = s.id  # attached until this session goes
            s.txn = txn  # the session stays in the XA branch
        else:
            s.txn = None  # PostgreSQL, MySQL 8: detached
        return txn.txid

    def finish_prepared(self, s: Session, raw: str, commit: bool) -> bool:
        """COMMIT / ROLLBACK PREPARED, XA COMMIT / XA ROLLBACK: False if not found (XAER_NOTA)."""
        txn = self.prepared.get(raw)
        if txn is None:
            if self.kind == "pg" and s.txn is not None and s.txn.state != "prepared":
                pass
            return False
        if self.kind == "maria" and txn.owner is not None and txn.owner != s.id:
            owner = self.sessions.get(txn.owner)
            if owner is not None and owner.alive:
                return False  # XAER_NOTA: the branch is attached to another session
        if s.txn is txn:
            s.txn = None
        self._finish(txn, commit)
        return True

    def commit_one_phase(self, s: Session) -> None:
        txn = s.txn
        if txn is None:
            raise DBError("notx", "no transaction in progress")
        s.txn = None
        if txn.state == "failed":
            self._finish(txn, commit=False)
            raise DBError("rolledback", "the transaction was aborted: COMMIT rolled it back")
        self._finish(txn, commit=True)

    def rollback_active(self, s: Session) -> None:
        txn = s.txn
        if txn is None:
            return
        if txn.state == "prepared":
            raise DBError("xaer_rmfail", "the branch is prepared")
        s.txn = None
        self._finish(txn, commit=False)

    def recover(self, s: Session) -> list[tuple[str, float, str]]:
        return [(raw, 0.0, "app") for raw in sorted(self.prepared)]

    def take_lock(self, s: Session, name: str) -> bool:
        holder = self.adv.get(name)
        if holder is None or holder not in self.sessions:
            self.adv[name] = s.id
            return True
        return holder == s.id

    def lock_holder(self, s: Session, name: str) -> int | None:
        holder = self.adv.get(name)
        return holder if holder in self.sessions else None

    def xact_status(self, s: Session, txid: int) -> str | None:
        if txid > self._next_txid:
            return "future"
        return self.xact.get(txid)
