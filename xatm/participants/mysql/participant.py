"""MySQL / MariaDB participant: branches as native XA transactions, through any MySQL driver.

No Python MySQL driver has DB-API ``tpc_*`` methods, so xatm sends the ``XA`` statements itself,
always with the XID as hex literals (``Xid.to_mysql``). Connections run in autocommit mode:
``XA START`` opens the branch and the application's statements run inside it. What differs
between the drivers (mysql-connector pure or C extension, PyMySQL, mysqlclient) lives in
``xatm.participants.mysql.drivers``; this adapter is the same for all of them. The branch's
operations (begin, prepare, one-phase commit, commit and rollback prepared, rollback of an
active branch, the quiet rollback after a "no") are written once, without I/O, in
``xatm.participants.mysql.operations``: the methods here run them with the sync runner
(``xatm.participants.runner``), the asyncio participant with the asyncio one.

Facts handled here and in those operations (numbered and sourced in docs/protocol.md,
section 11):

* errors are told apart by their MySQL error number, never by exception class or SQLSTATE
  (the drivers disagree on both);
* a deadlock or lock-wait timeout makes the branch rollback-only (1613/1614, 1402): it is
  rolled back and votes no;
* while the preparing session is connected only it may commit (MariaDB): phase 2 runs on
  the same connection, and a connection that fails in phase 2 is closed, so that recovery
  can finish the branch from another session;
* a connection is pooled again only when its XA state is known to be idle (no branch
  ACTIVE, IDLE or PREPARED on it): one whose rollback failed is closed, since a branch left
  ACTIVE keeps its row locks and makes the next ``XA START`` fail with 1399;
* rolling back a branch that the server already rolled back (a read-only MariaDB branch
  rolled back from another session, or a deadlock victim) answers an XA_RB* error: that
  branch is rolled back, which is what was asked;
* an error answering ``XA COMMIT ... ONE PHASE`` is a certain "no" only when it says the
  branch was rolled back or the statement was refused in the branch's state
  (``one_phase_refused``); any other (the query interrupted, 1317; XAER_RMERR, 1401: the
  engines' commit failed after it began) leaves the outcome unknown: the connection is
  closed, and the transaction is in doubt;
* ``XA RECOVER`` lists every application's prepared XIDs: the caller filters. Its ``data``
  column comes as bytes, bytearray or str depending on the driver and server.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

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
from xatm.core.urls import DEFAULT_CONNECT_TIMEOUT, Kind, ResourceSpec, redact
from xatm.core.xid import Xid
from xatm.errors import ConfigurationError, ResourceUnavailable
from xatm.participants.mysql import health as _health
from xatm.participants.mysql import operations
from xatm.participants.mysql.drivers import DRIVERS, MySQLDriver, by_name, for_connection
from xatm.participants.mysql.executors import SyncExecutor, XAConnections
from xatm.participants.mysql.statements import ER_DUP_ENTRY, XAER_DUPID, describe
from xatm.participants.runner import run

#: where ``adopt`` keeps a pooled connection's own autocommit setting
_AUTOCOMMIT_KEY = "xatm.autocommit"
XAER_RMERR = 1401
ER_NO_SUCH_TABLE = 1146


class MySQLParticipant:
    """A MySQL or MariaDB database taking part in global transactions."""

    db_system = "mysql"  # "mariadb" once check() has seen the server's version (for tracing)

    def __init__(self, name: str, spec: ResourceSpec, *, timeout: float | None = None) -> None:
        self.name = name
        self.spec = spec
        self.driver: MySQLDriver = by_name(spec.driver)
        self.driver.module  # noqa: B018 -- a missing driver is a ConfigurationError now
        self._errors = self.driver.errors()
        self._errors_or_os: tuple[type[BaseException], ...] = (*self._errors, OSError)
        self._kwargs = self.driver.connect_kwargs(
            host=spec.host,
            port=spec.port,
            user=spec.user or "",
            password=spec.password or "",
            database=spec.database,
            timeout=DEFAULT_CONNECT_TIMEOUT,
            options=spec.options,
        )
        # the driver's own read/write timeouts, where it has them (PyMySQL, mysqlclient): a
        # backstop for a dead peer, at twice the transaction timeout plus the connect
        # timeout (a URL's own values win); xatm.core.deadline bounds each call more closely
        self._backstop = 2 * (30.0 if timeout is None else timeout) + DEFAULT_CONNECT_TIMEOUT
        #: connections whose XA state is not known to be idle: never pooled
        self._in_xa = XAConnections()
        self._executor = SyncExecutor(self.driver, self._in_xa)

    @property
    def kind(self) -> Kind:
        return "mysql"

    # -- connections -----------------------------------------------------------------------
    def connect(self) -> Any:
        try:
            with _deadline.waiting(self, "a connect"):  # bounded by the connect timeout
                return self.driver.connect(self._kwargs, self._backstop)
        except ImportError as e:  # use_pure=false where mysql-connector's C extension fails
            raise ConfigurationError(
                f"resource {self.name!r} ({self.spec.redacted()}): the driver cannot load"
                f" what the URL asks for: {redact(str(e)).strip()}"
            ) from None
        except self._errors_or_os as e:
            raise ResourceUnavailable(
                f"cannot connect to resource {self.name!r} ({self.spec.redacted()}): "
                f"{describe(self.driver, e)}",
                resource=self.name,
            ) from None

    def ping(self, conn: Any) -> bool:
        try:
            self.driver.ping(conn)
        except self._errors_or_os:
            return False
        return True

    def is_idle(self, conn: Any) -> bool:
        # No round trip here: the XA state is tracked, and the pool pings connections that
        # sat idle for a while.
        if conn in self._in_xa:
            return False
        return self.driver.is_open(conn) and not self.driver.has_unread(conn)

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing must never raise
            conn.close()

    def is_connection_error(self, exc: BaseException) -> bool:
        return self.driver.is_connection_error(exc)

    def socket_of(self, conn: Any) -> int | None:
        return for_connection(conn).socket_of(conn)

    def classify(self, exc: BaseException) -> ErrorKind:
        """What ``exc`` is (``classify_error``: any loaded MySQL driver's error)."""
        return classify_error(exc)

    def is_duplicate_key(self, exc: BaseException) -> bool:
        """``exc`` is a unique-key violation (MySQL error 1062)."""
        return isinstance(exc, self._errors) and self.driver.errno(exc) in ER_DUP_ENTRY

    def is_xid_in_use(self, exc: BaseException) -> bool:
        """``exc`` is XAER_DUPID (1440): an XA START found its xid held by another session."""
        return isinstance(exc, self._errors) and self.driver.errno(exc) == XAER_DUPID

    def is_missing_table(self, exc: BaseException) -> bool:
        """``exc`` says a table does not exist (MySQL error 1146)."""
        return isinstance(exc, self._errors) and self.driver.errno(exc) == ER_NO_SUCH_TABLE

    def driver_info(self, conn: Any) -> str:
        """The driver and connection class in use (for ``doctor``)."""
        return self.driver.describe(conn)

    def _errno(self, exc: BaseException) -> int | None:
        return self.driver.errno(exc)

    # -- the branch ------------------------------------------------------------------------
    def begin(self, conn: Any, xid: Xid, timeout: float | None = None) -> None:
        run(self._executor, conn, operations.begin(xid))

    def begin_with(self, conn: Any, xid: Xid, timeout: float | None, insert: str) -> bool:
        return run(self._executor, conn, operations.begin_with(self.driver, xid, insert))

    def execute(self, conn: Any, query: Any, params: Sequence[Any] | Any = None) -> Cursor:
        cur = self.driver.cursor(conn)
        cur.execute(query, params)
        return cur

    def prepare(self, conn: Any, xid: Xid) -> Prepared:
        return run(self._executor, conn, operations.prepare(self.driver, xid))

    def start_prepare(self, conn: Any, xid: Xid) -> Callable[[], Prepared]:
        """No asynchronous sending here: prepares now, and the call returns the vote."""
        vote = self.prepare(conn, xid)
        return lambda: vote

    def start_commit_prepared(self, conn: Any, xid: Xid) -> Callable[[], PhaseTwo]:
        result = self.commit_prepared(conn, xid)
        return lambda: result

    def commit_one_phase(self, conn: Any, xid: Xid, before: Sequence[Statement] = ()) -> None:
        run(self._executor, conn, operations.commit_one_phase(self.driver, xid, before))

    def commit_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return run(self._executor, conn, operations.finish(self.driver, "COMMIT", xid))

    def rollback_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return run(self._executor, conn, operations.finish(self.driver, "ROLLBACK", xid))

    def rollback_active(self, conn: Any, xid: Xid) -> None:
        run(self._executor, conn, operations.rollback_active(self.driver, xid))

    def unavailable(self, e: BaseException) -> ResourceUnavailable:
        """The error for a connection attempt that failed with ``e`` (password-free)."""
        return ResourceUnavailable(
            f"cannot connect to resource {self.name!r} ({self.spec.redacted()}): "
            f"{describe(self.driver, e)}",
            resource=self.name,
        )

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """The driver's connection keyword arguments (autocommit on)."""
        return dict(self._kwargs)

    # -- recovery and fitness --------------------------------------------------------------
    def recover(self, conn: Any) -> list[PreparedBranch]:
        cur = self.driver.cursor(conn)
        try:
            cur.execute("XA RECOVER")
            rows = cur.fetchall()
        finally:
            cur.close()
        found = []
        for row in rows:
            format_id, glen, blen = (_integer(v) for v in row[:3])
            raw = _raw_bytes(row[3])
            xid = Xid.from_mysql(format_id, glen, blen, raw)
            found.append(PreparedBranch(xid, f"{format_id}:{raw.hex()}:{glen}:{blen}"))
        return found

    def adopt(self, conn: Any, info: dict[str, Any]) -> bool:
        driver = for_connection(conn)
        if _AUTOCOMMIT_KEY not in info:
            info[_AUTOCOMMIT_KEY] = driver.get_autocommit(conn)  # once per connection
        autocommit = bool(info[_AUTOCOMMIT_KEY])
        driver.consume(conn)
        if driver.in_transaction(conn):  # an engine's pool does not reset on return
            conn.rollback()  # (mysql-connector, PyMySQL: known without a round trip)
        if not autocommit:
            driver.set_autocommit(conn, True)
        return autocommit

    def set_autocommit(self, conn: Any, on: bool) -> None:
        for_connection(conn).set_autocommit(conn, on)

    def scalar(self, conn: Any, sql: str) -> Any:
        return _health.scalar(conn, sql)

    def server_version(self, conn: Any) -> str:
        return str(_health.scalar(conn, "SELECT version()"))

    def two_phase_detail(self, conn: Any) -> str:
        return "prepared XA survives disconnect; XA RECOVER allowed"

    def wait_findings(self, conn: Any, timeout: float | None) -> list[Finding]:
        return _health.wait_findings(conn, timeout)

    def check(self, conn: Any) -> list[str]:
        problems = []
        cur = self.driver.cursor(conn)
        try:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
            version = str(row[0]) if row else ""
            numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
            self.db_system = "mariadb" if "mariadb" in version.lower() else "mysql"
            if "mariadb" in version.lower():
                if numbers < (10, 5):
                    problems.append(
                        f"MariaDB {version} rolls prepared XA transactions back when their"
                        " connection drops: upgrade to MariaDB 10.5 or newer"
                    )
            else:
                if numbers < (5, 7, 7):
                    problems.append(
                        f"MySQL {version} rolls prepared XA transactions back when their"
                        " connection drops: upgrade to MySQL 5.7.7 or newer"
                    )
            # MySQL has it; MariaDB has none so far: asked of both, in case it ever does
            cur.execute("SHOW VARIABLES LIKE 'legacy_xa_rollback_at_disconnect'")
            legacy = cur.fetchone()
            if legacy and str(legacy[1]).upper() in ("ON", "1"):
                problems.append(
                    "legacy_xa_rollback_at_disconnect is ON, so prepared XA transactions"
                    " are rolled back when their connection drops: set it OFF"
                )
            try:
                cur.execute("XA RECOVER")
                cur.fetchall()
            except self._errors as e:
                if self._errno(e) != XAER_RMERR:
                    raise
                problems.append(
                    "this user may not run XA RECOVER, so recovery cannot see prepared"
                    " branches: GRANT XA_RECOVER_ADMIN ON *.* TO the user"
                )
        finally:
            cur.close()
        return problems

    # -- tables of xatm's own (commit-marker rows), in the adapter's dialect --------------
    #: the ``xatm_decisions`` table (xatm.participants.marker)
    marker_ddl = (
        "CREATE TABLE IF NOT EXISTS xatm_decisions ("
        " gtrid VARCHAR(64) CHARACTER SET ascii PRIMARY KEY,"
        " branches TEXT NOT NULL,"
        " created_at DOUBLE NOT NULL) ENGINE=InnoDB"
    )

    def table_exists(self, conn: Any, table: str) -> bool:
        """Asked of the catalog, so a missing table logs no error on the server."""
        count = self._scalar(
            conn,
            "SELECT COUNT(*) FROM information_schema.tables"
            " WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
        return bool(count and int(count))

    def create_table(self, conn: Any, ddl: str) -> None:
        """MySQL's metadata lock makes concurrent creators wait for each other."""
        self.execute(conn, ddl).close()

    def local_transaction(
        self, conn: Any, statements: Sequence[Statement], *, lock_wait: float, commit: bool
    ) -> None:
        """Run ``statements`` in one local transaction whose lock waits last at most
        ``lock_wait`` seconds (a whole second at least: InnoDB counts in seconds), then
        commit (or roll back); rolled back if one fails."""
        cur = self.driver.cursor(conn)
        try:
            cur.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(lock_wait))}")
            cur.execute("START TRANSACTION")
            try:
                for query, params in statements:
                    cur.execute(query, params)
            except BaseException:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    # -- node identity and what phase 2 / recovery need to know ---------------------------
    #: MariaDB (and MySQL before 8.0.29) answer XAER_NOTA to another session while the
    #: preparing session is still connected
    nota_may_be_held = True
    #: each XA statement waits for its answer
    sends_without_waiting = False
    #: the marker statements take a round trip each before the commit
    marker_in_one_round_trip = False

    def _scalar(self, conn: Any, query: str, params: tuple[Any, ...]) -> Any:
        cur = self.driver.cursor(conn)
        try:
            cur.execute(query, params)
            row = cur.fetchone()
        finally:
            cur.close()
        return None if row is None else row[0]

    def take_identity(self, conn: Any, node_id: str) -> bool:
        """``GET_LOCK`` of the node's name: server-wide, like ``XA RECOVER``."""
        return bool(self._scalar(conn, "SELECT GET_LOCK(%s, 0)", (identity_name(node_id),)))

    def identity_holder(self, conn: Any, node_id: str) -> int | None:
        """The connection id of the session holding the node's ``GET_LOCK``, or None."""
        holder = self._scalar(conn, "SELECT IS_USED_LOCK(%s)", (identity_name(node_id),))
        return None if holder is None else _integer(holder)

    def identity_session(self, conn: Any) -> tuple[str, int]:
        """Where a ``GET_LOCK`` lives (the server: its host name and port; the lock is
        server-wide) and this session's connection id."""
        cur = self.driver.cursor(conn)
        try:
            cur.execute("SELECT CONCAT(@@hostname, ':', @@port), CONNECTION_ID()")
            row = cur.fetchone()
        finally:
            cur.close()
        assert row is not None
        where = row[0].decode() if isinstance(row[0], bytes | bytearray) else str(row[0])
        return where, _integer(row[1])

    def verify_finished(self, conn: Any, txid: int | None) -> tuple[Finished, str]:
        """MySQL keeps no status of finished XA transactions: nothing can be told."""
        return "unknown", CANNOT_TELL

    def branch_locks(self, conn: Any, branch: PreparedBranch) -> tuple[int | None, tuple[str, ...]]:
        """Not known for XA branches (no per-XID lock view)."""
        return None, ()


def identity_name(node_id: str) -> str:
    """The ``GET_LOCK`` name of a node's identity (at most 64 characters)."""
    return f"xatm:node:{node_id}"


def _integer(value: Any) -> int:
    """A number column of ``XA RECOVER``, whatever type the driver made of it."""
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii")
    return int(value)


def _raw_bytes(value: Any) -> bytes:
    """The ``data`` column of ``XA RECOVER`` as the bytes the server holds (a driver that
    decodes it to text did so from a single-byte or UTF-8 charset)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    text = str(value)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


#: what a MySQL error number means: lock wait timeout and deadlock, and the XA rollback-only
#: states they leave (XA_RBTIMEOUT, XA_RBDEADLOCK)
_KIND_OF_ERRNO = {
    1205: ErrorKind.LOCK_TIMEOUT,
    1213: ErrorKind.DEADLOCK,
    1613: ErrorKind.LOCK_TIMEOUT,
    1614: ErrorKind.DEADLOCK,
}


def classify_error(exc: BaseException) -> ErrorKind:
    """What ``exc`` is if it is a MySQL driver's error (a lost connection, a deadlock, a
    lock wait timeout), whichever driver raised it; ``OTHER`` otherwise. Only drivers already
    loaded are asked."""
    for driver in DRIVERS.values():
        if driver.module_name not in sys.modules:
            continue
        if isinstance(exc, driver.errors()):
            if driver.is_connection_error(exc):
                return ErrorKind.GONE
            return _KIND_OF_ERRNO.get(driver.errno(exc) or 0, ErrorKind.OTHER)
    return ErrorKind.OTHER
