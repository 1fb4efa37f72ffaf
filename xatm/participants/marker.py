"""Commit markers: the global decision written inside one participant's own transaction.

The "last resource" / commit-marker optimisation (Narayana's commit-markable resource,
Citus's pg_dist_transaction). When a resource is switched on for it (``commit_marker``),
a transaction with several writing branches may pick one such branch as its *marker
branch*: the other branches are prepared, then the marker branch inserts a row into its own
``xatm_decisions`` table and commits in one phase. That local commit *is* the COMMIT
decision: atomic with the marker branch's own work, durable in that database, and visible
to recovery afterwards (row present: commit the other branches; row absent and the owner
dead: roll them back). It saves one prepare, one commit-prepared and the coordinator log's
fsync.

Rows are deleted lazily: finished gtrids are removed in batches by later marker
transactions on the same resource, and by recovery once every branch is gone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from xatm.core.participant import Connection, Participant, Statement
from xatm.core.records import LogRecord

TABLE = "xatm_decisions"
#: the payload of a row that recovery commits to *abort* a transaction (a fence: the
#: coordinator's own decision row, should it still come, then fails on the duplicate key)
ABORT_PAYLOAD = '{"abort":1}'
#: seconds an abort row is kept; long after any statement a dead coordinator left in flight
ABORT_ROW_AGE = 3600.0
#: finished gtrids deleted per marker transaction, at most
DELETE_BATCH = 64
#: deletes wait until this many finished gtrids have accumulated (one statement for many)
DELETE_AFTER = 32


def ensure_table(participant: Participant, conn: Connection) -> None:
    """Create the marker table if it does not exist (outside any branch)."""
    participant.create_table(conn, participant.marker_ddl)


def statements(
    gtrid: str | None,
    branches: Sequence[str],
    txids: Mapping[str, int],
    finished: Sequence[str] = (),
) -> list[Statement]:
    """What the marker branch runs before its commit: the decision row (if ``gtrid``) and
    the deletion of the rows of ``finished`` transactions."""
    out: list[Statement] = []
    if gtrid is not None:
        payload = json.dumps({"b": list(branches), "x": dict(txids)}, separators=(",", ":"))
        out.append(
            (
                f"INSERT INTO {TABLE} (gtrid, branches, created_at) VALUES (%s, %s, %s)",
                (gtrid, payload, time.time()),
            )
        )
    if finished:
        out.append(delete_statement(finished))
    return out


def delete_statement(gtrids: Sequence[str]) -> Statement:
    """Delete the rows of ``gtrids`` (their transactions are over)."""
    marks = ", ".join(["%s"] * len(gtrids))
    return f"DELETE FROM {TABLE} WHERE gtrid IN ({marks})", tuple(gtrids)


def read(participant: Participant, conn: Connection) -> dict[str, LogRecord]:
    """Every decision row of the resource, as COMMIT records."""
    cur: Any = participant.execute(conn, f"SELECT gtrid, branches, created_at FROM {TABLE}")
    try:
        rows = cur.fetchall()
    finally:
        cur.close()
    out = {}
    for gtrid, payload, created in rows:
        body = json.loads(payload)
        if body.get("abort"):
            continue  # a fence left by recovery: this transaction is aborted
        out[str(gtrid)] = LogRecord(
            "COMMIT",
            str(gtrid),
            tuple(str(b) for b in body.get("b", ())),
            float(created),
            {str(k): int(v) for k, v in body.get("x", {}).items()},
        )
    return out
