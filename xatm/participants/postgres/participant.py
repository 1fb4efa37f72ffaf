"""PostgreSQL participant: branches as native prepared transactions, through psycopg 3.

Connections run in autocommit mode and the branch is opened with an explicit ``BEGIN``, so
``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` (which may not run inside a transaction block)
can follow on the same connection without switching modes.

The branch's operations (begin, prepare, one-phase commit, commit and rollback prepared,
rollback of an active branch) are written once, without I/O, in
``xatm.participants.postgres.operations``: the methods here run them with the sync runner
(``xatm.participants.runner``: ``run``, and ``start`` for the pipelined ``start_prepare`` /
``start_commit_prepared``), the asyncio participant with the asyncio one.

Facts handled in those operations and their ``statements`` (numbered and sourced in
docs/protocol.md, section 11):

* the gid is a string literal in the grammar: it is sent quoted (``gid_literal``, which
  refuses any gid that is not of the base64 shape xatm writes, so nothing in it needs
  escaping), by the sync and the asyncio participant alike;
* ``PREPARE TRANSACTION`` in a failed transaction does not raise, it answers ``ROLLBACK``:
  the command tag is checked, and a failed transaction votes no without asking;
* ``COMMIT PREPARED`` of an unknown gid is SQLSTATE 42704 (``PhaseTwo.NOT_FOUND``);
* ``pg_prepared_xacts`` lists every database of the cluster: only the connected one counts.

**Bounded waits.** A backend waiting for a row lock does not notice that its client died,
and a prepared branch holds its locks until recovery settles it: waits that nothing bounds
pile up until the server refuses every connection, recovery's too. So every branch starts
with ``BEGIN; SET LOCAL lock_timeout = <T>; SET LOCAL statement_timeout = <2T>`` (one
round trip, as a plain ``BEGIN`` is), T being the time the transaction has left; and every
connection xatm opens gets the same settings, from the manager's timeout, by one ``SET``
when it is opened (not in the startup packet, which some connection poolers refuse), for
the statements outside a branch (phase 2, recovery), never below
:data:`SESSION_WAIT_FLOOR` (5 s). A URL whose ``options`` sets either one
(``?options=-c%20lock_timeout%3D5s``; ``0`` turns it off) overrides xatm's value, at
connect and at BEGIN. Those are the server's bounds; a server that stops answering is the
client's business (``xatm.core.deadline``, which finds a connection's socket with
:func:`socket_of`), with TCP keepalives and ``tcp_user_timeout`` for a dead peer
(:func:`dead_peer_settings`).

**Failover detection.** The same round trip, once per new connection, reads the server's
timeline (the first 8 hex digits of ``pg_walfile_name(pg_current_wal_lsn())``: a promoted
standby starts a new one; NULL on a standby) and its next transaction id
(``pg_snapshot_xmax(pg_current_snapshot())``), both readable without privileges, and hands
them to the manager's failover watch (``xatm.node.failover``, the ``watch`` attribute) before the
connection is used. Where the server refuses that query (a function revoked, a PostgreSQL
flavour without WAL files), the connection is set up without it and detection is off for
the resource (a warning says so once).
"""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from xatm.core import deadline as _deadline
from xatm.core.participant import (
    CANNOT_TELL,
    Cursor,
    ErrorKind,
    Finding,
    Finished,
    PhaseTwo,
    Prepared,
    PreparedBranch,
    Statement,
)
from xatm.core.urls import DEFAULT_CONNECT_TIMEOUT, Kind, ResourceSpec, pg_settings_in, redact
from xatm.core.xid import Xid
from xatm.errors import ResourceUnavailable
from xatm.participants.postgres import health as _health
from xatm.participants.postgres import operations
from xatm.participants.postgres.executors import SYNC
from xatm.participants.postgres.statements import describe, is_connection_error
from xatm.participants.runner import run, start

logger = logging.getLogger("xatm")

#: ``pg_xact_status`` of a transaction id not assigned yet on this server
INVALID_PARAMETER_VALUE = "22023"
#: where ``adopt`` notes the isolation level it set on a pooled connection
_ISOLATION_KEY = "xatm.isolation"
#: where ``adopt`` notes that it told the failover watch the connection's state
_STATE_KEY = "xatm.state"
UNIQUE_VIOLATION = "23505"
UNDEFINED_TABLE = "42P01"
#: what a CREATE TABLE IF NOT EXISTS may answer when another session created the table
#: between its check and its own insert into the catalog: the catalog's unique index (once
#: the other session commits), or the table or its row type found as it checks again
_CREATED_MEANWHILE = frozenset({UNIQUE_VIOLATION, "42P07", "42710"})


#: the least bound of a session's waits outside a branch (phase 2, recovery, inspection):
#: a manager with a tiny transaction timeout must not make its COMMIT PREPARED or its
#: recovery statements fail under load (they wait for no row lock a client holds)
SESSION_WAIT_FLOOR = 5.0


def dead_peer_settings(timeout: float | None) -> dict[str, str]:
    """libpq settings that notice a dead peer (a host gone, a path cut) on a connection:
    TCP keepalives on an idle one, and ``tcp_user_timeout`` for data the peer never
    acknowledges, at twice the transaction ``timeout`` plus the connect timeout. (A server
    that is alive but silent acknowledges everything: ``xatm.core.deadline`` ends those calls.)"""
    backstop = 2 * (30.0 if timeout is None else timeout) + DEFAULT_CONNECT_TIMEOUT
    return {
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": str(math.ceil(backstop * 1000)),
    }


def socket_of(conn: Any) -> int | None:
    """The socket of a psycopg connection, sync or asyncio (None once it is closed)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


#: the server's timeline (hex text; NULL on a standby) and next transaction id, read with
#: the session set-up of every new connection (failover detection)
SERVER_STATE = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL"
    " ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END,"
    " pg_snapshot_xmax(pg_current_snapshot())::text"
)

#: what the failover watch makes of a connection's state: nothing new, or a timeline not
#: recorded yet (the first one seen, or another one: a promotion, a restore)
Change = Literal["same", "timeline"]


class Watch(Protocol):
    """The failover watch a participant reports each new connection's state to
    (``xatm.node.failover.FailoverWatch``)."""

    def changed(self, resource: str, timeline: int, next_xid: int | None) -> Change: ...

    def record(
        self, resource: str, timeline: int, next_xid: int | None, bound: int | None
    ) -> None: ...


def server_state(row: Any) -> tuple[int | None, int | None]:
    """(timeline, next transaction id) from a :data:`SERVER_STATE` row."""
    if row is None:
        return None, None
    timeline = int(str(row[0]), 16) if row[0] is not None else None
    next_xid = int(str(row[1])) if row[1] is not None else None
    return timeline, next_xid


#: the latest checkpoint's timeline and next transaction id (``epoch:xid``)
CHECKPOINT = "SELECT timeline_id, next_xid FROM pg_control_checkpoint()"


def promotion_bound(row: Any, timeline: int) -> int | None:
    """From a :data:`CHECKPOINT` row: the next transaction id of a checkpoint made on
    ``timeline`` (the new one), which is at least the next transaction id at the promotion;
    None if the latest checkpoint is older than the promotion."""
    if row is None or row[0] is None or int(row[0]) != timeline:
        return None
    epoch, _, xid = str(row[1]).partition(":")
    return (int(epoch) << 32) | int(xid) if xid else int(epoch)


#: the status of each of a list of transaction ids (as text), without the error
#: "transaction ID ... is in the future" for one not assigned yet
XACT_STATUSES = (
    "SELECT x, CASE WHEN x::xid8 < pg_snapshot_xmax(pg_current_snapshot())"
    " THEN pg_xact_status(x::xid8) ELSE 'future' END FROM unnest(%s::text[]) AS x"
)


def wait_bounds(timeout: float) -> dict[str, str]:
    """The session settings that bound the waits of a transaction with ``timeout``
    seconds: no lock wait outlasts it, and no statement outlasts twice that."""
    ms = max(1, math.ceil(timeout * 1000))
    return {"lock_timeout": f"{ms}ms", "statement_timeout": f"{2 * ms}ms"}


class PostgresParticipant:
    """A PostgreSQL database taking part in global transactions.

    ``timeout``: the manager's transaction timeout, which bounds the waits of every session
    this participant opens (see the module docstring); None leaves the sessions as the
    server and the URL set them."""

    def __init__(self, name: str, spec: ResourceSpec, *, timeout: float | None = None) -> None:
        self.name = name
        self.spec = spec
        options = dict(spec.options)
        options.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))
        options.setdefault("application_name", "xatm")
        for key, value in dead_peer_settings(timeout).items():
            options.setdefault(key, value)
        #: settings the URL's own ``options`` sets: xatm leaves those alone
        self._user_settings = pg_settings_in(options.get("options", ""))
        #: sent once on each new connection (a SET, not the startup packet's ``options``,
        #: which some connection poolers refuse)
        self._session_bounds = (
            "" if timeout is None else self._set(max(timeout, SESSION_WAIT_FLOOR), local=False)
        )
        #: told the state of every new connection (set by the manager: ``xatm.node.failover``)
        self.watch: Watch | None = None
        #: the server answered the state query (False once it refused it: detection off)
        self.reads_state = True
        self._kwargs: dict[str, Any] = {
            "host": spec.host,
            "port": spec.port,
            "user": spec.user,
            "password": spec.password,
            "dbname": spec.database,
            **options,
        }

    @property
    def kind(self) -> Kind:
        return "postgresql"

    # -- connections -----------------------------------------------------------------------
    def _set(self, timeout: float, *, local: bool) -> str:
        """``SET [LOCAL]`` statements bounding waits by ``timeout`` (not those the URL's
        ``options`` sets), ``;``-separated, each with a leading ``; ``."""
        scope = " LOCAL" if local else ""
        return "".join(
            f"; SET{scope} {key} = '{value}'"
            for key, value in wait_bounds(timeout).items()
            if key not in self._user_settings
        )

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``connect`` (sync or async), autocommit on."""
        return {"autocommit": True, **self._kwargs}

    @property
    def session_setup(self) -> str:
        """The statement to send once on each new connection: the server's state
        (:data:`SERVER_STATE`, first) and the session's wait bounds."""
        if not self.reads_state:
            return self._session_bounds[2:]
        return SERVER_STATE + self._session_bounds

    def unavailable(self, e: BaseException) -> ResourceUnavailable:
        """The error for a connection attempt that failed with ``e`` (password-free)."""
        return ResourceUnavailable(
            f"cannot connect to resource {self.name!r} ({self.spec.redacted()}): "
            f"{redact(str(e)).strip()}",
            resource=self.name,
        )

    def state_refused(self, e: psycopg.Error) -> bool:
        """The state query failed with ``e`` for a reason of the server's (not a lost
        connection): set up without it from now on, and say so once. True if so."""
        if self.is_connection_error(e) or not self.reads_state:
            return False
        self.reads_state = False
        logger.warning(
            "resource %r: the server refuses to tell its timeline (%s): failover detection"
            " is off for it",
            self.name,
            redact(describe(e)),
        )
        return True

    def observe(self, conn: psycopg.Connection[Any], row: Any) -> None:
        """Tell the watch a new connection's state (:data:`SERVER_STATE` row)."""
        watch = self.watch
        timeline, next_xid = server_state(row)
        if watch is None or timeline is None:
            return
        if watch.changed(self.name, timeline, next_xid) == "same":
            return
        bound = None
        try:
            bound = promotion_bound(conn.execute(CHECKPOINT).fetchone(), timeline)
        except psycopg.Error as e:
            if self.is_connection_error(e):
                raise
        watch.record(self.name, timeline, next_xid, bound)

    def connect(self) -> psycopg.Connection[Any]:
        conn = None
        try:
            with _deadline.waiting(self, "a connect"):  # bounded by connect_timeout
                conn = psycopg.connect(**self.connect_kwargs)
            setup = self.session_setup
            if setup:
                with _deadline.bounded(self, conn, _deadline.GRACE, "the session set-up"):
                    try:
                        cur = conn.execute(setup)  # one round trip, once per connection
                    except psycopg.Error as e:
                        if not self.state_refused(e):
                            raise
                        if self.session_setup:
                            conn.execute(self.session_setup)
                    else:
                        if self.reads_state:
                            self.observe(conn, cur.fetchone())
        except psycopg.Error as e:
            if conn is not None:
                self.close(conn)
            raise self.unavailable(e) from None
        except BaseException:
            if conn is not None:
                self.close(conn)
            raise
        return conn

    def socket_of(self, conn: Any) -> int | None:
        return socket_of(conn)

    def ping(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def is_idle(self, conn: psycopg.Connection[Any]) -> bool:
        return not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE

    def close(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(Exception):  # closing must never raise
            conn.close()

    def is_connection_error(self, exc: BaseException) -> bool:
        return is_connection_error(exc)

    # -- the branch ------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> ErrorKind:
        """What ``exc`` is (``classify_error``)."""
        return classify_error(exc)

    def is_duplicate_key(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error) and exc.sqlstate == UNIQUE_VIOLATION

    def is_missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error) and exc.sqlstate == UNDEFINED_TABLE

    def is_xid_in_use(self, exc: BaseException) -> bool:
        return False  # a branch's gid is only named at PREPARE TRANSACTION

    def driver_info(self, conn: psycopg.Connection[Any]) -> str:
        impl = getattr(psycopg.pq, "__impl__", "?")
        return f"psycopg {psycopg.__version__} ({type(conn).__name__}, {impl} libpq wrapper)"

    def begin_statement(self, timeout: float | None) -> str:
        """``BEGIN`` and the branch's wait bounds: no parameters, one simple query."""
        return "BEGIN" if timeout is None else "BEGIN" + self._set(timeout, local=True)

    def begin(self, conn: psycopg.Connection[Any], xid: Xid, timeout: float | None = None) -> None:
        run(SYNC, conn, operations.begin(self.begin_statement(timeout)))

    def begin_with(
        self, conn: psycopg.Connection[Any], xid: Xid, timeout: float | None, insert: str
    ) -> bool:
        return run(SYNC, conn, operations.begin_with(self.begin_statement(timeout), insert))

    def execute(
        self, conn: psycopg.Connection[Any], query: Any, params: Sequence[Any] | Any = None
    ) -> Cursor:
        return conn.execute(query, params)

    def prepare(self, conn: psycopg.Connection[Any], xid: Xid) -> Prepared:
        return run(SYNC, conn, operations.prepare(xid))

    def start_prepare(self, conn: psycopg.Connection[Any], xid: Xid) -> Callable[[], Prepared]:
        """Send the prepare without waiting (pipeline mode); the returned call waits for
        the answer. Meanwhile the caller can work on other branches."""
        return start(SYNC, conn, operations.prepare(xid))

    def commit_one_phase(
        self, conn: psycopg.Connection[Any], xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        run(SYNC, conn, operations.commit_one_phase(before))

    def commit_prepared(self, conn: psycopg.Connection[Any], xid: Xid) -> PhaseTwo:
        return run(SYNC, conn, operations.finish("COMMIT", xid))

    def start_commit_prepared(
        self, conn: psycopg.Connection[Any], xid: Xid
    ) -> Callable[[], PhaseTwo]:
        """Send COMMIT PREPARED without waiting; the returned call waits for the answer."""
        return start(SYNC, conn, operations.finish("COMMIT", xid))

    def rollback_prepared(self, conn: psycopg.Connection[Any], xid: Xid) -> PhaseTwo:
        return run(SYNC, conn, operations.finish("ROLLBACK", xid))

    def rollback_active(self, conn: psycopg.Connection[Any], xid: Xid) -> None:
        run(SYNC, conn, operations.rollback_active())

    # -- recovery and fitness --------------------------------------------------------------
    def recover(self, conn: psycopg.Connection[Any]) -> list[PreparedBranch]:
        rows = conn.execute(
            "SELECT gid, extract(epoch FROM prepared)::float8, owner::text"
            " FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall()
        return [
            PreparedBranch(Xid.from_pg_gid(gid), gid, float(at), owner) for gid, at, owner in rows
        ]

    def adopt(self, conn: psycopg.Connection[Any], info: dict[str, Any]) -> bool:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            conn.rollback()  # an engine's pool does not reset on return: do it here
        autocommit = bool(conn.autocommit)
        if not autocommit:
            conn.autocommit = True  # client-side only: no round trip
        if self.watch is not None and self.reads_state and _STATE_KEY not in info:
            # an engine's connection: xatm sent no session set-up, so ask once here
            info[_STATE_KEY] = True
            try:
                row = conn.execute(SERVER_STATE).fetchone()
            except psycopg.Error as e:
                if not self.state_refused(e):
                    raise
            else:
                self.observe(conn, row)
        level = conn.isolation_level
        if level is not None and info.get(_ISOLATION_KEY) != level:
            # psycopg applies an engine's isolation_level to the transactions it begins
            # itself; xatm's explicit BEGIN takes the session default: make it the same
            # (once per connection; harmless to psycopg's own, explicit, BEGINs)
            words = str(level.name).replace("_", " ")
            conn.execute(f"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL {words}")
            info[_ISOLATION_KEY] = level
        return autocommit

    def set_autocommit(self, conn: psycopg.Connection[Any], on: bool) -> None:
        conn.autocommit = on

    def scalar(self, conn: psycopg.Connection[Any], sql: str) -> Any:
        return _health.scalar(conn, sql)

    def server_version(self, conn: psycopg.Connection[Any]) -> str:
        return str(_health.scalar(conn, "SELECT version()")).split(" on ")[0]

    def two_phase_detail(self, conn: psycopg.Connection[Any]) -> str:
        slots = _health.scalar(conn, "SHOW max_prepared_transactions")
        return f"max_prepared_transactions = {slots}"

    def wait_findings(self, conn: psycopg.Connection[Any], timeout: float | None) -> list[Finding]:
        return [*_health.wait_findings(conn), *_health.replication_findings(conn)]

    def check(self, conn: psycopg.Connection[Any]) -> list[str]:
        problems = []
        row = conn.execute("SELECT current_setting('max_prepared_transactions')::int").fetchone()
        if row is None or row[0] <= 0:
            problems.append(
                "max_prepared_transactions is 0, so prepared transactions are disabled: set"
                " max_prepared_transactions in postgresql.conf (for example to the value of"
                " max_connections) and restart the server"
            )
        return problems

    # -- tables of xatm's own (commit-marker rows), in the adapter's dialect --------------
    #: the ``xatm_decisions`` table (xatm.participants.marker)
    marker_ddl = (
        "CREATE TABLE IF NOT EXISTS xatm_decisions ("
        " gtrid VARCHAR(64) PRIMARY KEY,"
        " branches TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL)"
    )

    def table_exists(self, conn: psycopg.Connection[Any], table: str) -> bool:
        """Asked of the catalog, so a missing table logs no error on the server."""
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        return bool(row and row[0])

    def create_table(self, conn: psycopg.Connection[Any], ddl: str) -> None:
        """``ddl`` once more if another session created the table meanwhile: IF NOT EXISTS
        is checked before the catalog's insert, so the sessions that lost the race fail;
        once the winner committed, the table is there and the statement is a no-op."""
        try:
            conn.execute(ddl)
        except psycopg.Error as e:
            if e.sqlstate not in _CREATED_MEANWHILE:
                raise
            conn.execute(ddl)

    def local_transaction(
        self,
        conn: psycopg.Connection[Any],
        statements: Sequence[Statement],
        *,
        lock_wait: float,
        commit: bool,
    ) -> None:
        """Run ``statements`` in one local transaction whose lock waits last at most
        ``lock_wait`` seconds, then commit (or roll back); rolled back if one fails."""
        conn.execute("BEGIN")
        try:
            conn.execute(f"SET LOCAL lock_timeout = '{max(1, int(lock_wait * 1000))}ms'")
            for query, params in statements:
                conn.execute(query, params)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT" if commit else "ROLLBACK")

    # -- node identity and what phase 2 / recovery need to know ---------------------------
    #: a commit/rollback of a listed gid that answers "unknown gid" means it is gone
    nota_may_be_held = False
    #: pipeline mode: prepare and commit are sent, and their answers read later
    sends_without_waiting = True
    #: the decision row and COMMIT go in one pipeline
    marker_in_one_round_trip = True

    def take_identity(self, conn: psycopg.Connection[Any], node_id: str) -> bool:
        """Take the session advisory lock of ``node_id`` (this database) without waiting."""
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (IDENTITY_LOCK_SPACE, identity_key(node_id))
        ).fetchone()
        return bool(row and row[0])

    def identity_holder(self, conn: psycopg.Connection[Any], node_id: str) -> int | None:
        """The backend pid of the session holding ``node_id``'s advisory lock in this
        database, or None."""
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory'"
            " AND classid = %s AND objid = %s AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " LIMIT 1",
            (IDENTITY_LOCK_SPACE, identity_key(node_id) & 0xFFFFFFFF),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def identity_session(self, conn: psycopg.Connection[Any]) -> tuple[str, int]:
        """Where an advisory lock lives (the server, by its start time and port, and the
        database) and this session's backend pid."""
        row = conn.execute(
            "SELECT pg_postmaster_start_time()::text || ':' || current_setting('port')"
            " || '/' || current_database(), pg_backend_pid()"
        ).fetchone()
        assert row is not None
        return str(row[0]), int(row[1])

    def verify_finished(
        self, conn: psycopg.Connection[Any], txid: int | None
    ) -> tuple[Finished, str]:
        """What became of a branch no longer prepared, from ``pg_xact_status`` of its logged
        server transaction id."""
        if txid is None:
            return "unknown", CANNOT_TELL + ": no transaction id was logged"
        try:
            row = conn.execute(
                "SELECT pg_xact_status(%s::text::xid8)", (str(int(txid)),)
            ).fetchone()
        except psycopg.Error as e:
            if self.is_connection_error(e):
                raise
            if e.sqlstate == INVALID_PARAMETER_VALUE and "future" in str(e):
                return "aborted", (
                    f"lost: PostgreSQL transaction {txid} was never assigned on this server's"
                    " history (a failover or a restore lost it)"
                )
            return "unknown", f"{CANNOT_TELL}: pg_xact_status failed: {redact(describe(e))}"
        status = None if row is None else row[0]
        if status == "committed":
            return "committed", f"committed (PostgreSQL transaction {txid})"
        if status == "aborted":
            return "aborted", f"rolled back (PostgreSQL transaction {txid} aborted)"
        if status == "in progress":
            return "in progress", f"PostgreSQL transaction {txid} is still in progress"
        return "unknown", f"{CANNOT_TELL}: the status of transaction {txid} is no longer kept"

    def xact_statuses(
        self, conn: psycopg.Connection[Any], txids: Iterable[int]
    ) -> dict[int, str | None]:
        """``pg_xact_status`` of each of ``txids``: ``committed``, ``aborted``, ``in
        progress``, ``future`` (not assigned yet here), or None (no longer kept)."""
        wanted = sorted({int(t) for t in txids})
        if not wanted:
            return {}
        rows = conn.execute(XACT_STATUSES, ([str(t) for t in wanted],)).fetchall()
        return {int(x): (None if status is None else str(status)) for x, status in rows}

    def branch_locks(
        self, conn: psycopg.Connection[Any], branch: PreparedBranch
    ) -> tuple[int | None, tuple[str, ...]]:
        """How many locks a prepared branch holds, and on which relations."""
        try:
            row = conn.execute(_LOCKS, (branch.raw,)).fetchone()
        except psycopg.Error:  # informative only: never fail a listing over it
            return None, ()
        if row is None:
            return None, ()
        return int(row[0]), tuple(r for r in str(row[1]).split(",") if r)


#: advisory lock class id (two-int form) of node identity locks on resources
IDENTITY_LOCK_SPACE = 0x786E


def identity_key(node_id: str) -> int:
    """The signed 32-bit advisory-lock key of ``node_id``."""
    key = zlib.crc32(node_id.encode("ascii"))
    return key - (1 << 32) if key >= 1 << 31 else key


_LOCKS = (
    "SELECT count(*), coalesce(string_agg(DISTINCT l.relation::regclass::text, ','), '')"
    " FROM pg_locks l WHERE l.pid IS NULL AND l.virtualtransaction = ("
    "  SELECT t.virtualtransaction FROM pg_locks t JOIN pg_prepared_xacts p"
    "  ON t.locktype = 'transactionid' AND t.transactionid = p.transaction"
    "  WHERE p.gid = %s AND p.database = current_database() LIMIT 1)"
)


#: what a SQLSTATE means: serialization failure, deadlock, lock not available (lock_timeout),
#: query canceled (statement_timeout)
_KIND_OF_SQLSTATE = {
    "40001": ErrorKind.SERIALIZATION,
    "40P01": ErrorKind.DEADLOCK,
    "55P03": ErrorKind.LOCK_TIMEOUT,
    "57014": ErrorKind.CANCELLED,
}


def classify_error(exc: BaseException) -> ErrorKind:
    """What ``exc`` is if it is a psycopg error (a lost connection, a deadlock, a
    serialization failure, a lock timeout, a cancelled statement); ``OTHER`` otherwise."""
    if not isinstance(exc, psycopg.Error):
        return ErrorKind.OTHER
    kind = _KIND_OF_SQLSTATE.get(exc.sqlstate or "")
    if kind is not None:
        return kind
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ErrorKind.GONE
    return ErrorKind.OTHER
