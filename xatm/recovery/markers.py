"""Recovery's side of commit markers: find, fence and delete the decision rows.

A transaction on the commit-marker path (``xatm.participants.marker``) keeps its COMMIT decision as
a row of ``xatm_decisions`` inside one of its resources, committed in one phase with that branch's
own work. Recovery does not need to know which resources are marker resources: any resource
whose ``xatm_decisions`` table exists may hold rows, and is read.

Presuming abort needs more than "no row is visible": the coordinator may have sent the
marker branch's commit just before it died, and the server may still be executing it (an
uncommitted row is invisible), or its statements may even still sit unread in the server's
socket. :func:`probe_row` decides that with a *fence*: it inserts an abort row with the same
gtrid and commits it. The insert waits for any uncommitted insert of that key to end; a
duplicate-key error then means a row is there (the coordinator's decision row: COMMIT; or an
earlier fence: abort); success means the transaction is aborted for good, since a decision
row arriving later fails on the duplicate key and its branch rolls back. Abort rows are not
decisions (``xatm.participants.marker.read`` skips them) and are deleted after
``xatm.participants.marker.ABORT_ROW_AGE`` seconds. A dry run probes without committing (no fence).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from xatm.core import deadline as _deadline
from xatm.core.participant import Participant, Statement
from xatm.core.records import LogRecord
from xatm.participants import marker as _marker

#: seconds the probe waits for an uncommitted decision row before it gives up (unknown)
PROBE_LOCK_WAIT = 5

Probe = Literal["row", "no-row", "no-table"]


def has_table(participant: Participant, conn: Any) -> bool:
    """Does the resource have an ``xatm_decisions`` table?"""
    return participant.table_exists(conn, _marker.TABLE)


def read_rows(participant: Participant, conn: Any) -> dict[str, LogRecord] | None:
    """The decision rows of a resource, or None if it has no ``xatm_decisions`` table."""
    if not has_table(participant, conn):
        return None
    try:
        return _marker.read(participant, conn)
    except Exception as e:
        if participant.is_missing_table(e):
            return None
        raise


def probe_row(participant: Participant, gtrid: str, *, fence: bool = True) -> Probe:
    """Is the decision row of ``gtrid`` committed on this resource? Waits out an insert in
    flight and, with ``fence``, leaves a committed abort row behind when there is none (see
    the module docstring). Raises on a connection error or a lock wait that outlasts
    :data:`PROBE_LOCK_WAIT` (the answer is then unknown)."""
    with _session(participant, "a decision-row probe") as conn:
        try:
            _write(participant, conn, (_INSERT, (gtrid, _marker.ABORT_PAYLOAD, time.time())), fence)
        except Exception as e:
            if participant.is_duplicate_key(e):
                cur = participant.execute(conn, _PAYLOAD, (gtrid,))
                try:
                    return _existing(cur.fetchall())
                finally:
                    cur.close()
            if participant.is_missing_table(e):
                return "no-table"
            raise
        return "no-row"


def overrule_row(participant: Participant, gtrid: str) -> None:
    """Turn the decision row of ``gtrid`` on this resource, if there is one, into an abort
    row, committed (an operator rolls the transaction back by hand although the row decided
    COMMIT: a heuristic outcome): recovery then rolls back the branches left. Raises on a
    connection error or a lock wait that outlasts :data:`PROBE_LOCK_WAIT`; a resource
    without the table holds no row."""
    with _session(participant, "a decision row overruled") as conn:
        try:
            _write(participant, conn, (_OVERRULE, (_marker.ABORT_PAYLOAD, time.time(), gtrid)))
        except Exception as e:
            if not participant.is_missing_table(e):
                raise


@contextlib.contextmanager
def _session(participant: Participant, what: str) -> Iterator[Any]:
    """A connection of its own (its session settings stay there), every call on it bounded
    by :data:`PROBE_LOCK_WAIT` and the deadline's grace; closed afterwards."""
    conn = participant.connect()
    try:
        with _deadline.bounded(participant, conn, PROBE_LOCK_WAIT + _deadline.GRACE, what):
            yield conn
    finally:
        participant.close(conn)


def _write(participant: Participant, conn: Any, statement: Statement, commit: bool = True) -> None:
    """``statement`` in a local transaction of its own, its lock waits bounded."""
    participant.local_transaction(conn, [statement], lock_wait=PROBE_LOCK_WAIT, commit=commit)


_INSERT = f"INSERT INTO {_marker.TABLE} (gtrid, branches, created_at) VALUES (%s, %s, %s)"
_PAYLOAD = f"SELECT branches FROM {_marker.TABLE} WHERE gtrid = %s"
_OVERRULE = f"UPDATE {_marker.TABLE} SET branches = %s, created_at = %s WHERE gtrid = %s"


def _existing(rows: list[Any]) -> Probe:
    """A row is there: the coordinator's decision, or an earlier fence (abort)."""
    if rows and json.loads(rows[0][0]).get("abort"):
        return "no-row"
    return "row"


def delete_old_fences(participant: Participant, conn: Any) -> None:
    """Delete abort rows older than ``xatm.participants.marker.ABORT_ROW_AGE``."""
    participant.execute(
        conn,
        f"DELETE FROM {_marker.TABLE} WHERE branches = %s AND created_at < %s",
        (_marker.ABORT_PAYLOAD, time.time() - _marker.ABORT_ROW_AGE),
    ).close()


def delete_row(participant: Participant, conn: Any, gtrid: str) -> None:
    """Delete the decision row of ``gtrid`` (every branch of it is finished)."""
    participant.execute(conn, *_marker.delete_statement([gtrid])).close()
