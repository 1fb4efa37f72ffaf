"""Recovery's side of commit markers: find, fence and delete the decision rows.

A transaction on the commit-marker path (``xatm._marker``) keeps its COMMIT decision as a row
of ``xatm_decisions`` inside one of its resources, committed in one phase with that branch's
own work. Recovery does not need to know which resources are marker resources: any resource
whose ``xatm_decisions`` table exists may hold rows, and is read.

Presuming abort needs more than "no row is visible": the coordinator may have sent the
marker branch's commit just before it died, and the server may still be executing it (an
uncommitted row is invisible). :func:`probe_row` settles that: it inserts a row with the
same gtrid in a transaction of its own and rolls it back. The insert waits for any
uncommitted insert of that key to end; a duplicate-key error then means the row is
committed (the transaction is decided COMMIT), success means it is not and will not be (the
statements a dead coordinator sent are already being executed by then).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from . import _marker
from ._participant import Participant
from ._records import LogRecord

_NO_TABLE = frozenset({"42P01", 1146})  # undefined table: PostgreSQL SQLSTATE, MySQL errno
_DUPLICATE = frozenset({"23505", 1062})  # unique violation
#: seconds the probe waits for an uncommitted decision row before it gives up (unknown)
PROBE_LOCK_WAIT = 5

Probe = Literal["row", "no-row", "no-table"]


def _code(e: BaseException) -> object:
    return getattr(e, "sqlstate", None) or getattr(e, "errno", None)


def has_table(participant: Participant, conn: Any) -> bool:
    """Does the resource have an ``xatm_decisions`` table (asked of the catalog, so a
    missing table logs no error on the server)?"""
    if participant.kind == "postgresql":
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_marker.TABLE,)).fetchone()
        return bool(row and row[0])
    cur = conn.cursor()
    try:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.tables"
            " WHERE table_schema = DATABASE() AND table_name = %s",
            (_marker.TABLE,),
        )
        row = cur.fetchone()
    finally:
        cur.close()
    return bool(row and int(row[0]))


def read_rows(participant: Participant, conn: Any) -> dict[str, LogRecord] | None:
    """The decision rows of a resource, or None if it has no ``xatm_decisions`` table."""
    if not has_table(participant, conn):
        return None
    try:
        return _marker.read(participant, conn)
    except Exception as e:
        if _code(e) in _NO_TABLE:
            return None
        raise


def probe_row(participant: Participant, gtrid: str) -> Probe:
    """Is the decision row of ``gtrid`` committed on this resource? Waits out an insert in
    flight (see the module docstring). Raises on a connection error or a lock wait that
    outlasts :data:`PROBE_LOCK_WAIT` (the answer is then unknown)."""
    conn = participant.connect()  # its own connection: session settings stay here
    try:
        if participant.kind == "postgresql":
            return _probe_pg(conn, gtrid)
        return _probe_mysql(conn, gtrid)
    finally:
        participant.close(conn)


_INSERT = (
    f"INSERT INTO {_marker.TABLE} (gtrid, branches, created_at) VALUES (%s, '{{\"probe\":1}}', 0)"
)


def _probe_pg(conn: Any, gtrid: str) -> Probe:
    conn.execute("BEGIN")
    try:
        conn.execute(f"SET LOCAL lock_timeout = '{int(PROBE_LOCK_WAIT)}s'")
        conn.execute(_INSERT, (gtrid,))
    except Exception as e:
        code = _code(e)
        if code in _DUPLICATE:
            return "row"
        if code in _NO_TABLE:
            return "no-table"
        raise
    finally:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
    return "no-row"


def _probe_mysql(conn: Any, gtrid: str) -> Probe:
    cur = conn.cursor()
    try:
        cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(PROBE_LOCK_WAIT)}")
        cur.execute("START TRANSACTION")
        try:
            cur.execute(_INSERT, (gtrid,))
        except Exception as e:
            code = _code(e)
            if code in _DUPLICATE:
                return "row"
            if code in _NO_TABLE:
                return "no-table"
            raise
        finally:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
        return "no-row"
    finally:
        with contextlib.suppress(Exception):
            cur.close()


def delete_row(participant: Participant, conn: Any, gtrid: str) -> None:
    """Delete the decision row of ``gtrid`` (every branch of it is finished)."""
    participant.execute(conn, *_marker.delete_statement([gtrid])).close()
