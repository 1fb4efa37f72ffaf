"""PostgreSQL participant: branches as native prepared transactions, through psycopg 3.

Connections run in autocommit mode and the branch is opened with an explicit ``BEGIN``, so
``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` (which may not run inside a transaction block)
can follow on the same connection without switching modes.

Facts handled here (see ../shared/reference/xa-gotchas.md):

* the gid is a string literal in the grammar: it is sent with ``psycopg.sql.Literal``;
* ``PREPARE TRANSACTION`` in a failed transaction does not raise, it answers ``ROLLBACK``:
  the command tag is checked, and a failed transaction votes no without asking;
* ``COMMIT PREPARED`` of an unknown gid is SQLSTATE 42704 (``PhaseTwo.NOT_FOUND``);
* ``pg_prepared_xacts`` lists every database of the cluster: only the connected one counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

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

UNDEFINED_OBJECT = "42704"


class PostgresParticipant:
    """A PostgreSQL database taking part in global transactions."""

    def __init__(self, name: str, spec: ResourceSpec) -> None:
        self.name = name
        self.spec = spec
        options = dict(spec.options)
        options.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))
        options.setdefault("application_name", "xatm")
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
    def connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(autocommit=True, **self._kwargs)
        except psycopg.Error as e:
            raise ResourceUnavailable(
                f"cannot connect to resource {self.name!r} ({self.spec.redacted()}): "
                f"{redact(str(e)).strip()}",
                resource=self.name,
            ) from None

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
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    # -- the branch ------------------------------------------------------------------------
    def begin(self, conn: psycopg.Connection[Any], xid: Xid) -> None:
        conn.execute("BEGIN")

    def execute(
        self, conn: psycopg.Connection[Any], query: Any, params: Sequence[Any] | Any = None
    ) -> Cursor:
        return conn.execute(query, params)

    def prepare(self, conn: psycopg.Connection[Any], xid: Xid) -> Prepared:
        self._check_open(conn)
        gid = sql.Literal(xid.to_pg_gid())
        try:
            # one round trip, simple protocol: the branch's transaction id (NULL if it wrote
            # nothing) and the prepare itself
            cur = conn.execute(
                sql.SQL(
                    "SELECT pg_current_xact_id_if_assigned()::text; PREPARE TRANSACTION {}"
                ).format(gid)
            )
            row = cur.fetchone()
            cur.nextset()
        except psycopg.Error as e:
            raise BranchVotedNo(f"PREPARE TRANSACTION failed: {_describe(e)}", e) from e
        return self._vote(conn, gid, cur.statusmessage, row)

    def _check_open(self, conn: psycopg.Connection[Any]) -> None:
        status = conn.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise BranchVotedNo("the branch's transaction had already failed")
        if status != TransactionStatus.INTRANS:
            raise BranchVotedNo(
                f"the branch's transaction is not open (status {status.name}): it was ended"
                " outside xatm, by a commit or rollback on the raw connection"
            )

    def _vote(
        self, conn: psycopg.Connection[Any], gid: sql.Literal, tag: str | None, row: Any
    ) -> Prepared:
        """The vote, from PREPARE's command tag and the branch's transaction id."""
        if tag != "PREPARE TRANSACTION":
            raise BranchVotedNo(
                f"the server rolled the branch back instead of preparing it (command tag {tag!r})"
            )
        if row is None or row[0] is None:
            # Read-only: nothing to commit, whatever the decision. Finish it now; if that
            # fails it is an ordinary prepared branch (presumed abort: harmless).
            try:
                conn.execute(sql.SQL("COMMIT PREPARED {}").format(gid))
            except psycopg.Error:
                return Prepared(Vote.PREPARED)
            return Prepared(Vote.READ_ONLY)
        return Prepared(Vote.PREPARED, int(row[0]))

    def start_prepare(self, conn: psycopg.Connection[Any], xid: Xid) -> Callable[[], Prepared]:
        """Send the prepare without waiting (pipeline mode); the returned call waits for
        the answer. Meanwhile the caller can work on other branches."""
        self._check_open(conn)
        gid = sql.Literal(xid.to_pg_gid())
        # the transaction id query and the prepare, both on the wire before this returns
        pipeline = conn.pipeline()
        try:
            pipeline.__enter__()
            ids = conn.execute("SELECT pg_current_xact_id_if_assigned()::text")
            cur = conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(gid))
        except BaseException as e:
            _leave(pipeline, e)
            if isinstance(e, psycopg.Error):
                raise BranchVotedNo(f"PREPARE TRANSACTION failed: {_describe(e)}", e) from e
            raise

        def finish() -> Prepared:
            try:
                pipeline.__exit__(None, None, None)
                row = ids.fetchone()
            except psycopg.Error as e:
                raise BranchVotedNo(f"PREPARE TRANSACTION failed: {_describe(e)}", e) from e
            return self._vote(conn, gid, cur.statusmessage, row)

        return finish

    def commit_one_phase(
        self, conn: psycopg.Connection[Any], xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        status = conn.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise BranchVotedNo("the branch's transaction had already failed")
        if status != TransactionStatus.INTRANS:
            raise BranchVotedNo("the branch's transaction was ended outside xatm")
        try:
            if before:
                with conn.pipeline():  # the statements and the commit: one round trip
                    for query, params in before:
                        conn.execute(query, params)
                    cur = conn.execute("COMMIT")
            else:
                cur = conn.execute("COMMIT")
        except psycopg.Error as e:
            if self.is_connection_error(e):
                raise
            with contextlib.suppress(psycopg.Error):
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
            raise BranchVotedNo(f"the commit failed: {_describe(e)}", e) from e
        if cur.statusmessage != "COMMIT":
            raise BranchVotedNo(f"the server answered {cur.statusmessage!r} to COMMIT")

    def commit_prepared(self, conn: psycopg.Connection[Any], xid: Xid) -> PhaseTwo:
        return self._finish(conn, "COMMIT PREPARED {}", xid)

    def start_commit_prepared(
        self, conn: psycopg.Connection[Any], xid: Xid
    ) -> Callable[[], PhaseTwo]:
        """Send COMMIT PREPARED without waiting; the returned call waits for the answer."""
        pipeline = conn.pipeline()
        try:
            pipeline.__enter__()
            conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(xid.to_pg_gid())))
        except BaseException as e:
            _leave(pipeline, e)
            raise

        def finish() -> PhaseTwo:
            try:
                pipeline.__exit__(None, None, None)
            except psycopg.Error as e:
                if e.sqlstate == UNDEFINED_OBJECT:
                    return PhaseTwo.NOT_FOUND
                raise
            return PhaseTwo.DONE

        return finish

    def rollback_prepared(self, conn: psycopg.Connection[Any], xid: Xid) -> PhaseTwo:
        return self._finish(conn, "ROLLBACK PREPARED {}", xid)

    def _finish(self, conn: psycopg.Connection[Any], stmt: str, xid: Xid) -> PhaseTwo:
        try:
            conn.execute(sql.SQL(stmt).format(sql.Literal(xid.to_pg_gid())))
        except psycopg.Error as e:
            if e.sqlstate == UNDEFINED_OBJECT:
                return PhaseTwo.NOT_FOUND
            raise
        return PhaseTwo.DONE

    def rollback_active(self, conn: psycopg.Connection[Any], xid: Xid) -> None:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    # -- recovery and fitness --------------------------------------------------------------
    def recover(self, conn: psycopg.Connection[Any]) -> list[PreparedBranch]:
        rows = conn.execute(
            "SELECT gid, extract(epoch FROM prepared)::float8, owner::text"
            " FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall()
        return [
            PreparedBranch(Xid.from_pg_gid(gid), gid, float(at), owner) for gid, at, owner in rows
        ]

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


def _leave(pipeline: Any, error: BaseException) -> None:
    """Leave a pipeline block after ``error``, as ``with`` would."""
    with contextlib.suppress(Exception):
        pipeline.__exit__(type(error), error, error.__traceback__)


def _describe(e: psycopg.Error) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{e.sqlstate} {text}" if e.sqlstate else text


#: SQLSTATEs of errors that a retry may not meet again: serialization failure, deadlock,
#: lock not available (lock_timeout), query canceled (statement_timeout)
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


def is_transient_error(exc: BaseException) -> bool:
    """True if ``exc`` is a psycopg error worth retrying (lost connection, deadlock,
    serialization failure, lock timeout); used by saga steps (``xatm._saga_runner``)."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(exc, psycopg.Error) and exc.sqlstate in _TRANSIENT_SQLSTATES
