"""The shared coordinator log: decisions kept in a PostgreSQL database.

Several coordinator processes, on any number of hosts, share one log; any surviving host
can finish a dead host's transactions. Layout, in its own schema (default ``xatm``)::

    <schema>.meta       (key text primary key, value text)       -- schema_version,
                                                                 -- decision_horizon
    <schema>.decisions  (gtrid    varchar(64) primary key,
                         node_id  varchar(30),
                         decision char(1)  'C' commit | 'A' abort,
                         branches text     JSON [resource, ...],
                         txids    text     JSON {resource: PostgreSQL txid},
                         decided_by text   e.g. "coordinator" or "sweeper@host-2",
                         created_at timestamptz, ended_at timestamptz)
    <schema>.timelines  (node_id, resource, body text JSON)       -- xatm.log.timelines

**Fencing without clocks.** The coordinator's COMMIT and a sweeper's ABORT for one gtrid are
both ``INSERT ... ON CONFLICT (gtrid) DO NOTHING``: the first to land wins and the other
side reads the winner and obeys it. So a sweeper may abort any undecided transaction (for
example one older than its timeout, whose coordinator may be paused or partitioned away),
and a coordinator that resumes later finds the ABORT and rolls back instead of committing.

**Node identity and liveness.** Each coordinator holds a session-level advisory lock on its
node_id for as long as its log is open: two live processes cannot share a node_id, and a
free lock proves the node has no live session (its undecided transactions may be aborted
at once; fencing keeps even a wrong guess safe).

**Retention.** An ended COMMIT row is kept for ``retain`` seconds after its decision (a
PostgreSQL failover can bring a branch back prepared after its END: recovery must still find
its COMMIT, ``xatm.node.failover``); ``prune`` deletes older ones and raises
``meta.decision_horizon`` in the same transaction: every COMMIT decided after the horizon
is still in the table.

**Group commit.** Concurrent ``log_commit`` calls are batched by a leader into one
multi-row INSERT and one commit (one WAL flush for the batch). ``log_end`` is lazy: ENDs
are written with the next batch or on ``flush``. Ended COMMIT rows and old ABORT rows are
pruned by ``prune`` (ended COMMITs once out of the retention window).

**Bounded waits.** Every log session sets ``lock_timeout`` (:data:`LOCK_TIMEOUT`),
``statement_timeout`` (:data:`STATEMENT_TIMEOUT`) and ``idle_in_transaction_session_timeout``
(:data:`IDLE_IN_TRANSACTION_TIMEOUT`) when it connects, unless the log URL's ``options`` sets
them. A sweeper's
conditional ABORT that meets a COMMIT row still being inserted (a coordinator frozen inside
a group-commit batch) gives up after ``lock_timeout`` and answers ``"busy"``: recovery leaves
that gtrid for a later pass instead of waiting while it holds the fleet's sweeper lock. The
server ends a batch left open longer than ``idle_in_transaction_session_timeout`` (rolling
it back, and releasing the frozen coordinator's node lock). ENDs skip rows locked by
someone else (``SKIP LOCKED``): an END is never worth a wait, a later pass writes it.
Those settings are enforced by the server, which a silent server (stopped, or a path that
drops everything without closing) does not do: every call on a log session also runs under
a client-side deadline (``xatm.core.deadline``), which cuts its connection. A COMMIT batch
is bounded by the earliest deadline of the transactions in it plus the grace of a phase-2
call (they are then in doubt, as when the write fails); a point read or write by
:data:`POINT_BOUND`, a scan by :data:`SCAN_BOUND`. A cut session is replaced by the next
call; the writer's, which holds the node lock, takes the lock again or stays broken.

**Migrations.** ``meta.schema_version`` records the layout version. Opening a log creates
the schema on first use (under an advisory lock) and upgrades older versions step by step;
a newer version than this code knows is refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

import psycopg
from psycopg import sql

from xatm.core import deadline as _deadline
from xatm.core import events as _events
from xatm.core import failpoint as _failpoint
from xatm.core.records import LogRecord
from xatm.core.urls import ResourceSpec, parse_url, pg_settings_in, redact
from xatm.core.xid import validate_node_id
from xatm.errors import ConfigurationError, LogError, LogLocked
from xatm.log.audit import AuditEntry
from xatm.log.base import DecisionNotLogged
from xatm.participants.postgres.participant import SERVER_STATE, server_state, socket_of

logger = logging.getLogger("xatm.log")

SCHEMA_VERSION = 3
#: seconds between two prunes of finished decisions by recovery passes
PRUNE_EVERY = 60.0
#: an ABORT row fences a late COMMIT of a paused coordinator: keep it at least this long
MIN_ABORT_AGE = 86400.0
_MIGRATION_LOCK = 0x78617401  # advisory lock key while creating / migrating the schema
_NODE_LOCK_SPACE = 0x7861  # advisory lock class id (two-int form) for node identity
_SWEEP_LOCK = 0x78617402  # advisory lock key held by the sweeper that is resolving
#: seconds a log statement waits for a lock: the log's rows are locked only for the moment
#: of a write, so a longer wait means a writer that froze (or a sweeper racing a COMMIT)
LOCK_TIMEOUT = 1.0
#: seconds any log statement may run
STATEMENT_TIMEOUT = 30.0
#: seconds a log session may sit inside an open transaction (a batch takes milliseconds)
IDLE_IN_TRANSACTION_TIMEOUT = 10.0
#: seconds the schema check at start may wait for another process's migration
MIGRATION_LOCK_WAIT = 60.0
#: SQLSTATEs of a statement that gave up waiting: lock_timeout, statement_timeout
_GAVE_UP = frozenset({"55P03", "57014"})
#: the client-side bound of a point read or write on the log (it waits for a lock at most
#: LOCK_TIMEOUT on the server), and of a scan or a prune (STATEMENT_TIMEOUT): past it, the
#: server is taken to be silent and the call is cut
POINT_BOUND = LOCK_TIMEOUT + _deadline.GRACE
SCAN_BOUND = STATEMENT_TIMEOUT + _deadline.GRACE


class _Sockets:
    """The shared log's sessions, as a deadline sees them (``xatm.core.deadline.Sockets``)."""

    name = "shared log"

    def socket_of(self, conn: Any) -> int | None:
        return socket_of(conn)


_SOCKETS = _Sockets()

#: the ``meta`` key of each timeline of the log's own database that a session found, with
#: when it was first found (the server's clock, epoch seconds): a key added once one was
#: there is a failover of the log's database (or a restore), which may have lost decisions
TIMELINE_KEY = "log_timeline:"


def bounded(conn: psycopg.Connection[Any], what: str, seconds: float) -> _deadline.until:
    """``with bounded(conn, what, seconds):``: a call on the shared log's ``conn`` that its
    server has not answered ``seconds`` from now is cut (every log session's calls run so)."""
    return _deadline.bounded(_SOCKETS, conn, seconds, what)


Abort = Literal["C", "A", "busy"]

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE SCHEMA IF NOT EXISTS {schema}",
        "CREATE TABLE IF NOT EXISTS {schema}.meta (key text PRIMARY KEY, value text NOT NULL)",
        "CREATE TABLE IF NOT EXISTS {schema}.decisions ("
        " gtrid varchar(64) PRIMARY KEY,"
        " node_id varchar(30) NOT NULL,"
        " decision char(1) NOT NULL CHECK (decision IN ('C', 'A')),"
        " branches text NOT NULL DEFAULT '[]',"
        " txids text NOT NULL DEFAULT '{{}}',"
        " decided_by text NOT NULL DEFAULT 'coordinator',"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " ended_at timestamptz)",
        "CREATE INDEX IF NOT EXISTS decisions_open ON {schema}.decisions (decision)"
        " WHERE ended_at IS NULL",
        "CREATE TABLE IF NOT EXISTS {schema}.audit ("
        " id bigserial PRIMARY KEY, at double precision NOT NULL, gtrid varchar(64) NOT NULL,"
        " resource text NOT NULL, branch text NOT NULL, action text NOT NULL,"
        " reason text NOT NULL, outcome text NOT NULL, actor text NOT NULL,"
        " node text NOT NULL)",
        "CREATE INDEX IF NOT EXISTS audit_gtrid ON {schema}.audit (gtrid)",
    ],
    # sagas: one row per saga, its state a JSON document (xatm.log.saga_state)
    2: [
        "CREATE TABLE IF NOT EXISTS {schema}.sagas ("
        " saga_id varchar(64) PRIMARY KEY,"
        " name varchar(30) NOT NULL,"
        " key_hash varchar(64),"
        " node_id varchar(30) NOT NULL,"
        " state varchar(16) NOT NULL,"
        " body text NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " updated_at timestamptz NOT NULL DEFAULT now())",
        "CREATE UNIQUE INDEX IF NOT EXISTS sagas_key ON {schema}.sagas (name, key_hash)",
        "CREATE INDEX IF NOT EXISTS sagas_open ON {schema}.sagas (state)"
        " WHERE state IN ('running', 'compensating')",
    ],
    # failover detection: each node's last timeline seen per resource (xatm.log.timelines),
    # and the horizon of retained decisions (ended COMMITs pruned before version 3 were
    # not recorded: the horizon starts at the migration)
    3: [
        "CREATE TABLE IF NOT EXISTS {schema}.timelines ("
        " node_id varchar(30) NOT NULL,"
        " resource text NOT NULL,"
        " body text NOT NULL,"
        " PRIMARY KEY (node_id, resource))",
        "INSERT INTO {schema}.meta VALUES ('decision_horizon',"
        " extract(epoch FROM now())::text) ON CONFLICT (key) DO NOTHING",
    ],
}


F = TypeVar("F", bound=Callable[..., Any])


def _log_errors(method: F) -> F:
    """Report a database error of the shared log as LogError (the log, not a resource,
    failed), with the password redacted."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except psycopg.Error as e:
            raise LogError(f"the shared log failed: {redact(str(e)).strip()}") from None

    return cast(F, wrapper)


class DecisionFenced(DecisionNotLogged):
    """The COMMIT lost the race: an ABORT for the same gtrid was logged first."""


def _node_key(node_id: str) -> int:
    """A stable 32-bit key for the advisory lock of ``node_id``."""
    import zlib

    return zlib.crc32(node_id.encode("ascii")) & 0x7FFFFFFF


def connect(
    spec: ResourceSpec, application_name: str, within: float | None = None
) -> psycopg.Connection[Any]:
    """A connection to the shared log's database, autocommit, with its waits bounded
    (``lock_timeout``, ``statement_timeout``, ``idle_in_transaction_session_timeout``, by one
    ``SET``, unless the URL's ``options`` sets them); LogError (redacted) if it fails. Every
    connection of the shared log (decisions, audit, sagas) is made here. ``within``: the
    seconds the connect and its set-up may take at most (a caller's bound)."""
    options: dict[str, Any] = dict(spec.options)
    options.setdefault("connect_timeout", "5")
    if within is not None:  # a caller's bound: libpq counts whole seconds, 2 at least
        with contextlib.suppress(ValueError):
            usual = float(options["connect_timeout"])
            within = min(within, usual) if usual > 0 else within
        options["connect_timeout"] = str(max(2, int(within)))
    options.setdefault("application_name", application_name)
    given = pg_settings_in(options.get("options", ""))
    bounds = {
        "lock_timeout": _ms(LOCK_TIMEOUT),
        "statement_timeout": _ms(STATEMENT_TIMEOUT),
        "idle_in_transaction_session_timeout": _ms(IDLE_IN_TRANSACTION_TIMEOUT),
    }
    setup = "; ".join(f"SET {k} = '{v}'" for k, v in bounds.items() if k not in given)
    conn = None
    try:
        conn = psycopg.connect(
            host=spec.host,
            port=spec.port,
            user=spec.user,
            password=spec.password,
            dbname=spec.database,
            autocommit=True,
            **options,
        )
        if setup:  # a SET, not startup options: some connection poolers refuse those
            with bounded(conn, "a session set-up", min(POINT_BOUND, within or POINT_BOUND)):
                conn.execute(setup)
    except psycopg.Error as e:
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        raise LogError(
            f"cannot connect to the shared log {spec.redacted()}: {redact(str(e)).strip()}"
        ) from None
    return conn


def cut_while_idle(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle session of the shared log was closed while it sat unused (its server
    restarted or failed over, an administrator or an idle timeout ended it): its socket has
    something to read although nothing was asked. One poll that does not wait, before a
    session is used again, so that a cut is found before a write is sent on it, not by the
    write (whose outcome would then be unknown). A path that went silent is not seen here:
    the calls' deadlines bound it. Something else on the socket (a notice) is taken for a
    cut too: the session is replaced, which costs a connect."""
    if conn.closed or conn.broken:
        return True
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


class PostgresLog:
    """A coordinator log shared by many coordinators, in one PostgreSQL database."""

    def __init__(
        self,
        url: str | ResourceSpec,
        node_id: str,
        *,
        schema: str = "xatm",
        hold_node_lock: bool = True,
    ) -> None:
        self._node_id = validate_node_id(node_id)
        self.spec = url if isinstance(url, ResourceSpec) else parse_url(url)
        if self.spec.kind != "postgresql":
            raise ConfigurationError(
                f"a shared log must be a PostgreSQL URL, got {self.spec.redacted()}"
            )
        if not schema.isidentifier():
            raise ConfigurationError(f"log schema must be an identifier, got {schema!r}")
        self.schema = schema
        self._ident = sql.Identifier(schema)
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[int, LogRecord, float | None]] = []
        self._ends: list[str] = []
        self._results: dict[int, BaseException | None] = {}
        self._seq = 0
        self._flushing = False
        self._read_lock = threading.Lock()
        self.forces = 0
        self.forced_records = 0
        self._last_prune = -PRUNE_EVERY
        self.hold_node_lock = hold_node_lock
        #: the timeline this process's sessions found the log's database on, and when it was
        #: first found (the server's clock, epoch seconds)
        self._timeline: tuple[int, float] | None = None
        self._writer = connect(self.spec, "xatm-log")
        self._reader_conn = connect(self.spec, "xatm-log")
        with bounded(self._writer, "the schema check", MIGRATION_LOCK_WAIT + SCAN_BOUND):
            self._migrate(self._writer)
        self._note_timeline(self._writer)
        if hold_node_lock:
            self._lock_node(self._writer)

    # -- connections and schema -------------------------------------------------------------
    @property
    def _reader(self) -> psycopg.Connection[Any]:
        """The connection for reads and recovery's writes (callers hold ``_read_lock``);
        replaced by a new one once it broke (a restarted server costs one failed call)."""
        if cut_while_idle(self._reader_conn):
            with contextlib.suppress(psycopg.Error):
                self._reader_conn.close()
            self._reader_conn = self._connect()
        return self._reader_conn

    @contextlib.contextmanager
    def _reading(
        self, what: str, seconds: float = POINT_BOUND
    ) -> Iterator[psycopg.Connection[Any]]:
        """The reader connection, ``_read_lock`` held, its calls bounded by ``seconds``."""
        with self._read_lock:
            conn = self._reader
            with bounded(conn, what, seconds):
                yield conn

    def _connect(self, within: float | None = None) -> psycopg.Connection[Any]:
        """A session that replaces a broken one, its timeline noted (the two of the start
        are made by ``__init__``, before the schema is there)."""
        start = time.monotonic()
        conn = connect(self.spec, "xatm-log", within)
        left = POINT_BOUND if within is None else within - (time.monotonic() - start)
        try:
            self._note_timeline(conn, max(0.1, min(POINT_BOUND, left)))
        except LogError:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise
        return conn

    @_log_errors
    def _note_timeline(self, conn: psycopg.Connection[Any], seconds: float = POINT_BOUND) -> None:
        """Record the timeline a new session finds the log's database on. One not recorded
        yet, when another one is, means the database failed over (or was restored): the
        decisions its old primary acknowledged and never passed on are gone, so recovery
        leaves the transactions begun before it in doubt (:meth:`log_switches`). A timeline
        this process found before is recorded again first if the new primary lacks it (its
        row had not reached the standby, as right after the log's first start): else the
        new one would pass for the first, and the failover for none."""
        # a timeline's key, and when it was first found (None: now, the server's clock):
        # (added, how many were there, when this one was first found)
        note = self._q(
            "WITH added AS (INSERT INTO {schema}.meta"
            " VALUES (%s, coalesce(%s, extract(epoch FROM now())::text))"
            " ON CONFLICT (key) DO NOTHING RETURNING value)"
            " SELECT (SELECT count(*) FROM added),"
            " (SELECT count(*) FROM {schema}.meta WHERE key LIKE %s),"
            " coalesce((SELECT value FROM added), (SELECT value FROM {schema}.meta WHERE key = %s))"
        )
        with bounded(conn, "a check of the log's timeline", seconds):
            timeline, _ = server_state(conn.execute(SERVER_STATE).fetchone())
            if timeline is None:  # a standby: nothing can be written there anyway
                return
            before = self._timeline
            if before is not None and before[0] != timeline:
                old = _timeline_key(before[0])
                conn.execute(note, (old, repr(before[1]), f"{TIMELINE_KEY}%", old))
            key = _timeline_key(timeline)
            row = conn.execute(note, (key, None, f"{TIMELINE_KEY}%", key)).fetchone()
        if row is not None and (before is None or before[0] != timeline):
            self._timeline = (timeline, float(row[2]))
        if row is not None and row[0] and row[1]:
            logger.critical(
                "FAILOVER: the shared log's database %s failed over or was restored (it is on"
                " a new timeline, %d): the decisions its previous primary acknowledged but"
                " never passed on are lost."
                " Transactions begun before now that are still prepared are left in doubt"
                " for an operator (`xatm indoubt`, then `xatm resolve`); the previous"
                " primary's decisions table, if it can still be read, says what they were",
                self.spec.redacted(),
                timeline,
            )

    @_log_errors
    def log_switches(self) -> tuple[float, ...]:
        """When each new timeline of the log's database was first found, the first one
        recorded excepted (epoch seconds, the server's clock): the failovers of the log."""
        with self._reading("a read of the log's timelines") as conn:
            rows = conn.execute(
                self._q("SELECT value FROM {schema}.meta WHERE key LIKE %s"),
                (f"{TIMELINE_KEY}%",),
            ).fetchall()
        seen = sorted(float(value) for (value,) in rows)
        return tuple(seen[1:])

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._ident)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        try:
            # many processes starting at once queue here for a moment: wait longer than for
            # a row, then go back to the session's own setting
            row = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
            conn.execute(f"SET lock_timeout = '{_ms(MIGRATION_LOCK_WAIT)}'")
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (row[0] if row else "0",))
        except psycopg.Error as e:
            raise LogError(f"cannot set up the shared log schema: {redact(str(e))}") from None
        try:
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.meta",)
            ).fetchone()
            version = 0
            if exists and exists[0]:
                row = conn.execute(
                    self._q("SELECT value FROM {schema}.meta WHERE key = 'schema_version'")
                ).fetchone()
                version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise LogError(
                    f"the shared log schema {self.schema!r} is at version {version}, newer"
                    f" than this xatm understands ({SCHEMA_VERSION}): upgrade xatm"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                with conn.transaction():
                    for statement in _MIGRATIONS[step]:
                        conn.execute(self._q(statement))
                    conn.execute(
                        self._q(
                            "INSERT INTO {schema}.meta VALUES ('schema_version', %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                        ),
                        (str(step),),
                    )
        except psycopg.Error as e:
            raise LogError(f"cannot set up the shared log schema: {redact(str(e))}") from None
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))

    def _lock_node(self, conn: psycopg.Connection[Any], within: float = POINT_BOUND) -> None:
        with bounded(conn, "the node lock", within):
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)",
                (_NODE_LOCK_SPACE, _node_key(self._node_id)),
            ).fetchone()
        if not row or not row[0]:
            raise LogLocked(
                f"node_id {self._node_id!r} is in use by another live coordinator of the"
                " shared log; every coordinator process needs its own node_id"
            )

    @_log_errors
    def node_alive(self, node_id: str) -> bool:
        """True if some session holds ``node_id``'s advisory lock (its coordinator lives)."""
        with self._reading("a node's liveness check") as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s AND objid = %s AND objsubid = 2 AND granted)",
                (_NODE_LOCK_SPACE, _node_key(node_id)),
            ).fetchone()
        return bool(row and row[0])

    # -- CoordinatorLog ---------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self._node_id

    def log_commit(
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int] | None = None,
        deadline: float | None = None,
    ) -> None:
        record = LogRecord("COMMIT", gtrid, tuple(branches), time.time(), dict(txids or {}))
        with self._cond:
            self._seq += 1
            seq = self._seq
            self._queue.append((seq, record, deadline))
            while seq not in self._results:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                batch, self._queue = self._queue, []
                ends, self._ends = self._ends, []
                self._cond.release()
                try:
                    outcome = self._write_batch(batch, ends)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                self._results.update(outcome)
                self._cond.notify_all()
            error = self._results.pop(seq)
        if error is not None:
            raise error

    def _write_batch(
        self, batch: list[tuple[int, LogRecord, float | None]], ends: list[str]
    ) -> dict[int, BaseException | None]:
        """Insert a batch of COMMITs; the result of each by sequence number. Bounded by the
        earliest deadline of its transactions plus the grace of a phase-2 call."""
        now = time.monotonic()
        bound = min((d for _, _, d in batch if d is not None), default=None)
        until = (
            now + POINT_BOUND if bound is None else min(bound + _deadline.GRACE, now + SCAN_BOUND)
        )
        if cut_while_idle(self._writer):
            with contextlib.suppress(psycopg.Error):
                self._writer.close()  # its node lock is gone with it, or goes now
            self._reconnect_writer(until)
            if self._writer.closed or self._writer.broken:
                refused = DecisionNotLogged(
                    f"the shared log {self.spec.redacted()} cannot be reached; nothing was logged"
                )
                return {seq: refused for seq, _, _ in batch}
        rows = [
            (r.gtrid, self._node_id, json.dumps(list(r.branches)), json.dumps(dict(r.txids)))
            for _, r, _ in batch
        ]
        committing = False
        try:
            with (
                _deadline.until(_SOCKETS, self._writer, until, "a COMMIT batch"),
                self._writer.transaction(),
            ):
                cur = self._writer.cursor()
                values = sql.SQL(", ").join(sql.SQL("(%s, %s, 'C', %s, %s)") for _ in rows)
                cur.execute(
                    self._q(
                        "INSERT INTO {schema}.decisions"
                        " (gtrid, node_id, decision, branches, txids) VALUES "
                    ).as_string(self._writer)
                    + values.as_string(self._writer)
                    + " ON CONFLICT (gtrid) DO NOTHING RETURNING gtrid",
                    [v for row in rows for v in row],
                )
                won = {r[0] for r in cur.fetchall()}
                lost = [g for g, *_ in rows if g not in won]
                existing: dict[str, str] = {}
                if lost:
                    existing = dict(
                        self._writer.execute(
                            self._q(
                                "SELECT gtrid, decision FROM {schema}.decisions"
                                " WHERE gtrid = ANY(%s)"
                            ),
                            (lost,),
                        ).fetchall()
                    )
                if ends:
                    self._end_rows(self._writer, ends)
                _failpoint.hit("commit_batch_open")  # inserted, not committed yet
                committing = True  # leaving the block sends the COMMIT
        except psycopg.Error as e:
            failure = LogError(f"writing to the shared log failed: {redact(str(e)).strip()}")
            if not committing or not (self._writer.closed or self._writer.broken):
                # the batch was rolled back, or its COMMIT never sent: nothing of it is logged
                failure = DecisionNotLogged(str(failure))
            # A broken writer is replaced by the next batch, not here: this batch's waiters
            # are told now, not after a connect to a server that may not answer
            return {seq: failure for seq, _, _ in batch}
        self.forces += 1
        self.forced_records += len(batch)
        _events.log_forced(self._node_id)
        out: dict[int, BaseException | None] = {}
        for seq, record, _ in batch:
            if record.gtrid in won or existing.get(record.gtrid) == "C":
                out[seq] = None
            else:
                out[seq] = DecisionFenced(
                    f"transaction {record.gtrid} was aborted by recovery before its commit"
                    " decision could be logged"
                )
        return out

    def _reconnect_writer(self, until: float) -> None:
        """A new writer session (with the node lock), by ``until`` (``time.monotonic()``):
        not tried when less than libpq's shortest connect timeout is left."""
        within = until - time.monotonic()
        if within < 2:
            return
        try:
            fresh = self._connect(within)
        except LogError as e:
            logger.warning("shared log: reconnect failed: %s", e)
            return
        if self.hold_node_lock:
            try:
                self._lock_node(fresh, max(0.1, until - time.monotonic()))
            except (LogError, psycopg.Error) as e:
                # without its node lock this process must not decide: stay broken
                logger.error("shared log: reconnected, but %s", e)
                with contextlib.suppress(psycopg.Error):
                    fresh.close()
                return
        old, self._writer = self._writer, fresh
        with contextlib.suppress(psycopg.Error):
            old.close()

    def _end_rows(self, conn: psycopg.Connection[Any], gtrids: list[str]) -> None:
        conn.execute(
            self._q(
                "UPDATE {schema}.decisions SET ended_at = now() WHERE gtrid IN"
                " (SELECT gtrid FROM {schema}.decisions WHERE gtrid = ANY(%s)"
                " AND ended_at IS NULL FOR UPDATE SKIP LOCKED)"
            ),
            (gtrids,),
        )

    def log_end(self, gtrid: str) -> None:
        with self._cond:
            self._ends.append(gtrid)
            flush_now = len(self._ends) >= 256
        if flush_now:
            self.flush()

    @_log_errors
    def log_overrule(self, gtrid: str, by: str) -> None:
        """The COMMIT row of ``gtrid`` becomes an ABORT row (an operator rolls it back by
        hand: a heuristic outcome), committed before this returns: no longer pending, nor
        retained; recovery rolls back what is left."""
        with self._reading("an overrule") as conn:
            conn.execute(
                self._q(
                    "UPDATE {schema}.decisions SET decision = 'A', decided_by = %s,"
                    " ended_at = NULL WHERE gtrid = %s AND decision = 'C'"
                ),
                (by, gtrid),
            )

    @_log_errors
    def log_abort(self, gtrid: str, by: str) -> Abort:
        """Try to log ABORT for ``gtrid``; return the decision that holds ('C' or 'A'), or
        ``"busy"`` when the write gave up waiting (another session is inserting a decision
        for ``gtrid`` and has not committed: a COMMIT batch still open, perhaps of a frozen
        coordinator). Nothing was written then; ask again later."""
        from xatm.core.xid import parse_gtrid

        node, _ = parse_gtrid(gtrid)
        with self._reading("an ABORT") as conn:
            try:
                row = conn.execute(
                    self._q(
                        "INSERT INTO {schema}.decisions (gtrid, node_id, decision, decided_by)"
                        " VALUES (%s, %s, 'A', %s) ON CONFLICT (gtrid) DO NOTHING"
                        " RETURNING decision"
                    ),
                    (gtrid, node, by),
                ).fetchone()
            except psycopg.Error as e:
                if e.sqlstate in _GAVE_UP and not conn.broken:
                    logger.info("shared log: the ABORT of %s waited too long: %s", gtrid, e)
                    return "busy"
                raise
            if row is not None:
                return "A"
            got = conn.execute(
                self._q("SELECT decision FROM {schema}.decisions WHERE gtrid = %s"), (gtrid,)
            ).fetchone()
        return "C" if got and got[0] == "C" else "A"

    @_log_errors
    def decisions(self, gtrids: Sequence[str]) -> dict[str, LogRecord | str]:
        """The logged decision of each of ``gtrids`` that has one: a COMMIT record, or 'A'."""
        if not gtrids:
            return {}
        with self._reading("a read of decisions", SCAN_BOUND) as conn:
            rows = conn.execute(
                self._q(
                    "SELECT gtrid, decision, branches, txids,"
                    " extract(epoch FROM created_at)::float8"
                    " FROM {schema}.decisions WHERE gtrid = ANY(%s)"
                ),
                (list(gtrids),),
            ).fetchall()
        return {g: (_record(g, b, x, t) if d == "C" else "A") for g, d, b, x, t in rows}

    @_log_errors
    def pending(self, all_nodes: bool = False) -> Mapping[str, LogRecord]:
        """COMMIT decisions not yet ended (this node's, or every node's)."""
        query = (
            "SELECT gtrid, branches, txids, extract(epoch FROM created_at)::float8"
            " FROM {schema}.decisions WHERE decision = 'C' AND ended_at IS NULL"
        )
        params: tuple[Any, ...] = ()
        if not all_nodes:
            query += " AND node_id = %s"
            params = (self._node_id,)
        with self._reading("a read of pending decisions", SCAN_BOUND) as conn:
            rows = conn.execute(self._q(query), params).fetchall()
        return {g: _record(g, b, x, t) for g, b, x, t in rows}

    def flush(self) -> None:
        with self._cond:
            ends, self._ends = self._ends, []
        if ends:
            with self._reading("a batch of ENDs") as conn:
                try:
                    self._end_rows(conn, ends)
                except psycopg.Error as e:
                    logger.warning("shared log: could not record %d ENDs: %s", len(ends), e)

    @_log_errors
    def prune(self, abort_age: float = 86400.0, retain: float = 0.0) -> int:
        """Delete ended COMMIT rows decided more than ``retain`` seconds ago, and ABORT rows
        older than ``abort_age`` seconds; the horizon is raised in the same transaction."""
        with self._reading("a prune", SCAN_BOUND) as conn:
            with conn.transaction():
                rows = conn.execute(
                    self._q(
                        "DELETE FROM {schema}.decisions WHERE (decision = 'C' AND ended_at IS"
                        " NOT NULL AND created_at < now() - %s * interval '1 second')"
                        " OR (decision = 'A' AND created_at < now() - %s * interval '1 second')"
                        " RETURNING decision, extract(epoch FROM created_at)::float8"
                    ),
                    (retain, abort_age),
                ).fetchall()
                newest = max((float(t) for d, t in rows if d == "C"), default=None)
                if newest is not None:
                    conn.execute(
                        self._q(
                            "INSERT INTO {schema}.meta VALUES ('decision_horizon', %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = GREATEST("
                            "{schema}.meta.value::float8, EXCLUDED.value::float8)::text"
                        ),
                        (repr(newest),),
                    )
            return len(rows)

    def maybe_prune(self, abort_age: float, every: float = PRUNE_EVERY, retain: float = 0.0) -> int:
        """``prune`` at most once per ``every`` seconds (recovery calls this each pass)."""
        now = time.monotonic()
        if now - self._last_prune < every:
            return 0
        self._last_prune = now
        try:
            return self.prune(abort_age, retain)
        except (psycopg.Error, LogError) as e:  # prune reports psycopg's errors as LogError
            logger.warning("shared log: pruning failed: %s", redact(str(e)))
            return 0

    @_log_errors
    def horizon(self) -> float:
        """The time since which every COMMIT decision is still in the table."""
        with self._reading("a read of the horizon") as conn:
            row = conn.execute(
                self._q("SELECT value FROM {schema}.meta WHERE key = 'decision_horizon'")
            ).fetchone()
        return float(row[0]) if row else 0.0

    @_log_errors
    def decided_between(self, node: str, start: float, end: float) -> list[LogRecord]:
        """``node``'s COMMIT decisions (pending or ended) made in ``[start, end)``."""
        with self._reading("a read of decisions", SCAN_BOUND) as conn:
            rows = conn.execute(
                self._q(
                    "SELECT gtrid, branches, txids, extract(epoch FROM created_at)::float8"
                    " FROM {schema}.decisions WHERE node_id = %s AND decision = 'C'"
                    " AND created_at >= to_timestamp(%s) AND created_at < to_timestamp(%s)"
                    " ORDER BY created_at"
                ),
                (node, start, end),
            ).fetchall()
        return [_record(g, b, x, t) for g, b, x, t in rows]

    # -- each node's view of its resources' timelines (xatm.log.timelines) -----------------
    @_log_errors
    def timelines(self, node: str | None = None) -> list[tuple[str, str, str]]:
        """(node, resource, body) of ``node``'s recorded timelines (every node's if None)."""
        query = "SELECT node_id, resource, body FROM {schema}.timelines"
        params: tuple[Any, ...] = ()
        if node is not None:
            query += " WHERE node_id = %s"
            params = (node,)
        with self._reading("a read of timelines", SCAN_BOUND) as conn:
            rows = conn.execute(self._q(query), params).fetchall()
        return [(str(n), str(r), str(b)) for n, r, b in rows]

    @_log_errors
    def save_timeline(self, node: str, resource: str, body: str) -> None:
        """Record ``node``'s view of one resource's timeline (committed when this returns)."""
        with self._reading("a timeline") as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.timelines VALUES (%s, %s, %s)"
                    " ON CONFLICT (node_id, resource) DO UPDATE SET body = EXCLUDED.body"
                ),
                (node, resource, body),
            )

    @_log_errors
    def try_sweep_lock(self) -> bool:
        """Take the fleet-wide sweeper lock (session level) if free: one resolver at a time."""
        with self._reading("the sweeper lock") as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SWEEP_LOCK,)).fetchone()
        return bool(row and row[0])

    def release_sweep_lock(self) -> None:
        with (
            contextlib.suppress(psycopg.Error, LogError),
            self._reading("the sweeper lock") as conn,
        ):
            # a lost session has released the lock already
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SWEEP_LOCK,))

    # -- the audit trail, shared like the decisions ---------------------------------------
    def audit(self, entry: AuditEntry) -> None:
        """Append one audit entry (see ``xatm.log.audit``); failures are logged, not raised."""
        try:
            with self._reading("an audit entry") as conn:
                conn.execute(
                    self._q(
                        "INSERT INTO {schema}.audit (at, gtrid, resource, branch, action,"
                        " reason, outcome, actor, node) VALUES"
                        " (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ),
                    (
                        entry.at,
                        entry.gtrid,
                        entry.resource,
                        entry.branch,
                        entry.action,
                        entry.reason,
                        entry.outcome,
                        entry.actor,
                        entry.node,
                    ),
                )
        except psycopg.Error as e:
            logger.error("cannot write the audit trail to the shared log: %s", redact(str(e)))

    @_log_errors
    def read_audit(self, gtrid: str | None = None) -> list[AuditEntry]:
        query = (
            "SELECT at, gtrid, resource, branch, action, reason, outcome, actor, node"
            " FROM {schema}.audit"
        )
        params: tuple[Any, ...] = ()
        if gtrid is not None:
            query += " WHERE gtrid = %s"
            params = (gtrid,)
        with self._reading("a read of the audit trail", SCAN_BOUND) as conn:
            rows = conn.execute(self._q(query + " ORDER BY at, id"), params).fetchall()
        return [AuditEntry(float(r[0]), *(str(v) for v in r[1:])) for r in rows]

    def close(self) -> None:
        self.flush()
        for conn in (self._writer, self._reader_conn):
            with contextlib.suppress(psycopg.Error), bounded(conn, "a close", POINT_BOUND):
                # release the node lock (writer) and the sweeper lock (reader) now, not
                # when the server notices that the session has ended
                conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(psycopg.Error):
                conn.close()


def _timeline_key(timeline: int) -> str:
    return f"{TIMELINE_KEY}{timeline:08X}"


def _ms(seconds: float) -> str:
    """A PostgreSQL duration setting, in whole milliseconds (at least 1)."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def _record(gtrid: str, branches: str, txids: str, at: float) -> LogRecord:
    return LogRecord(
        "COMMIT",
        gtrid,
        tuple(json.loads(branches)),
        float(at),
        {str(k): int(v) for k, v in json.loads(txids).items()},
    )
