"""MySQL / MariaDB participant: branches as native XA transactions, via mysql-connector.

No Python MySQL driver has DB-API ``tpc_*`` methods, so the ``XA`` statements are sent here,
always with the XID as hex literals (``Xid.to_mysql``). Connections run in autocommit mode:
``XA START`` opens the branch and the application's statements run inside it.

Facts handled here (see ../shared/reference/xa-gotchas.md):

* XA errors come as ``IntegrityError``/``DatabaseError``: the code branches on ``errno``;
* a deadlock or lock-wait timeout makes the branch rollback-only (1613/1614, 1402): it is
  rolled back and votes no;
* while the preparing session is connected only it may commit (MariaDB): phase 2 runs on
  the same connection, and a connection that fails in phase 2 is closed, so that recovery
  can finish the branch from another session;
* ``XA RECOVER`` lists every application's prepared XIDs: the caller filters.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import mysql.connector
from mysql.connector import errors as myerrors

from ._participant import (
    BranchVotedNo,
    Cursor,
    PhaseTwo,
    Prepared,
    PreparedBranch,
    Statement,
    Vote,
)
from ._urls import DEFAULT_CONNECT_TIMEOUT, Kind, ResourceSpec, redact
from ._xid import Xid
from .errors import ResourceUnavailable

XAER_NOTA = 1397
XAER_RMERR = 1401
#: client-side errnos that mean the connection is gone
_CONNECTION_ERRNOS = frozenset({2002, 2003, 2006, 2013, 2055, 4031, 1927, 1053})
_BOOL_OPTIONS = frozenset({"ssl_disabled", "use_pure", "ssl_verify_cert", "ssl_verify_identity"})


def _option(key: str, value: str) -> object:
    if key in _BOOL_OPTIONS:
        return value.lower() in ("1", "true", "yes", "on")
    if value.isdigit():
        return int(value)
    return value


class MySQLParticipant:
    """A MySQL or MariaDB database taking part in global transactions."""

    def __init__(self, name: str, spec: ResourceSpec) -> None:
        self.name = name
        self.spec = spec
        self._kwargs: dict[str, Any] = {
            "host": spec.host,
            "port": spec.port,
            "user": spec.user or "",
            "password": spec.password or "",
            "connection_timeout": DEFAULT_CONNECT_TIMEOUT,
            "autocommit": True,
        }
        if spec.database:
            self._kwargs["database"] = spec.database
        for key, value in spec.options:
            self._kwargs[key] = _option(key, value)

    @property
    def kind(self) -> Kind:
        return "mysql"

    # -- connections -----------------------------------------------------------------------
    def connect(self) -> Any:
        try:
            return mysql.connector.connect(**self._kwargs)
        except (myerrors.Error, OSError) as e:
            raise ResourceUnavailable(
                f"cannot connect to resource {self.name!r} ({self.spec.redacted()}): "
                f"{redact(str(e)).strip()}",
                resource=self.name,
            ) from None

    def ping(self, conn: Any) -> bool:
        try:
            conn.ping(reconnect=False)
        except (myerrors.Error, OSError):
            return False
        return True

    def is_idle(self, conn: Any) -> bool:
        # No round trip here: connections are only given back after a clean end, and the
        # pool pings those that sat idle for a while.
        return getattr(conn, "_socket", True) is not None and not conn.unread_result

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing must never raise
            conn.close()

    def is_connection_error(self, exc: BaseException) -> bool:
        if isinstance(exc, myerrors.InterfaceError | myerrors.OperationalError | OSError):
            return True
        return isinstance(exc, myerrors.Error) and exc.errno in _CONNECTION_ERRNOS

    def _run(self, conn: Any, statement: str) -> None:
        """Send statements that return no rows (``;``-separated: one round trip)."""
        if ";" in statement:
            for _ in conn.cmd_query_iter(statement):
                pass
        else:
            conn.cmd_query(statement)

    # -- the branch ------------------------------------------------------------------------
    def begin(self, conn: Any, xid: Xid) -> None:
        self._run(conn, f"XA START {xid.to_mysql()}")

    def execute(self, conn: Any, query: Any, params: Sequence[Any] | Any = None) -> Cursor:
        cur = conn.cursor(buffered=True)
        cur.execute(query, params)
        return cur

    def prepare(self, conn: Any, xid: Xid) -> Prepared:
        x = xid.to_mysql()
        try:
            self._run(conn, f"XA END {x}; XA PREPARE {x}")
        except myerrors.Error as e:
            if not self.is_connection_error(e):
                self._rollback_quietly(conn, xid)
            raise BranchVotedNo(f"XA PREPARE failed: {_describe(e)}", e) from e
        # a read-only XA branch cannot be told apart here: it is prepared like any other
        return Prepared(Vote.PREPARED)

    def start_prepare(self, conn: Any, xid: Xid) -> Callable[[], Prepared]:
        """No asynchronous sending here: prepares now, and the call returns the vote."""
        vote = self.prepare(conn, xid)
        return lambda: vote

    def start_commit_prepared(self, conn: Any, xid: Xid) -> Callable[[], PhaseTwo]:
        result = self.commit_prepared(conn, xid)
        return lambda: result

    def commit_one_phase(self, conn: Any, xid: Xid, before: Sequence[Statement] = ()) -> None:
        x = xid.to_mysql()
        try:
            for query, params in before:
                self.execute(conn, query, params).close()
            self._run(conn, f"XA END {x}; XA COMMIT {x} ONE PHASE")
        except myerrors.Error as e:
            if self.is_connection_error(e):
                raise  # the outcome is unknown
            self._rollback_quietly(conn, xid)
            raise BranchVotedNo(f"the one-phase commit failed: {_describe(e)}", e) from e

    def commit_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return self._finish(conn, "COMMIT", xid)

    def rollback_prepared(self, conn: Any, xid: Xid) -> PhaseTwo:
        return self._finish(conn, "ROLLBACK", xid)

    def _finish(self, conn: Any, verb: str, xid: Xid) -> PhaseTwo:
        try:
            self._run(conn, f"XA {verb} {xid.to_mysql()}")
        except myerrors.Error as e:
            if e.errno == XAER_NOTA:
                return PhaseTwo.NOT_FOUND
            raise
        return PhaseTwo.DONE

    def rollback_active(self, conn: Any, xid: Xid) -> None:
        if conn.unread_result:
            conn.consume_results()
        try:
            self._run(conn, f"XA END {xid.to_mysql()}")
        except myerrors.Error as e:
            if self.is_connection_error(e):
                raise
            # already IDLE, or rollback-only after a deadlock: XA ROLLBACK still applies
        self._run(conn, f"XA ROLLBACK {xid.to_mysql()}")

    def _rollback_quietly(self, conn: Any, xid: Xid) -> None:
        with contextlib.suppress(myerrors.Error):
            self._run(conn, f"XA ROLLBACK {xid.to_mysql()}")

    # -- recovery and fitness --------------------------------------------------------------
    def recover(self, conn: Any) -> list[PreparedBranch]:
        cur = conn.cursor()
        try:
            cur.execute("XA RECOVER")
            rows = cur.fetchall()
        finally:
            cur.close()
        found = []
        for format_id, glen, blen, data in rows:
            raw = bytes(data) if not isinstance(data, str) else data.encode("latin-1")
            xid = Xid.from_mysql(int(format_id), int(glen), int(blen), raw)
            found.append(PreparedBranch(xid, f"{format_id}:{raw.hex()}:{glen}:{blen}"))
        return found

    def check(self, conn: Any) -> list[str]:
        problems = []
        cur = conn.cursor()
        try:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
            version = str(row[0]) if row else ""
            numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
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
            except myerrors.Error as e:
                if e.errno != XAER_RMERR:
                    raise
                problems.append(
                    "this user may not run XA RECOVER, so recovery cannot see prepared"
                    " branches: GRANT XA_RECOVER_ADMIN ON *.* TO the user"
                )
        finally:
            cur.close()
        return problems


def _describe(e: myerrors.Error) -> str:
    return redact(str(e).strip()) or type(e).__name__


#: errnos worth retrying: lock wait timeout, deadlock, and the XA rollback-only states they
#: leave (XA_RBTIMEOUT, XA_RBDEADLOCK)
_TRANSIENT_ERRNOS = frozenset({1205, 1213, 1613, 1614})


def is_transient_error(exc: BaseException) -> bool:
    """True if ``exc`` is a mysql-connector error worth retrying (lost connection, deadlock,
    lock wait timeout); used by saga steps (``xatm._saga_runner``)."""
    if isinstance(exc, myerrors.InterfaceError | myerrors.OperationalError):
        return True
    return isinstance(exc, myerrors.Error) and (
        exc.errno in _CONNECTION_ERRNOS or exc.errno in _TRANSIENT_ERRNOS
    )
