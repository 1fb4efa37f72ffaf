"""The sub-transaction barrier: each saga step and compensation takes effect at most once.

dtm's barrier, in each resource a step writes to: a table ``xatm_barrier`` keyed by
(saga_id, step, op), where op is ``action`` or ``compensation``. The barrier rows are
inserted *in the step's own transaction*, before the step's own work, with an insert that
does nothing on a duplicate key (PostgreSQL ``ON CONFLICT DO NOTHING``, MySQL/MariaDB
``INSERT IGNORE``); they commit or roll back with it (atomically across resources for a
step with several, one XA transaction). So:

* **action**: insert (action). 1 row: first time, run the body. 0 rows: the action
  committed before (a retry after a lost answer, or recovery re-running it: *duplicate*,
  skip) or its compensation came first (*hanging*: the compensation's row, see below, is
  there; skip, and the saga must compensate).
* **compensation**: insert (action) first, then (compensation). The action insert taking
  1 row means the action never committed: *empty compensation*, done without running the
  body, and that row now blocks a late action. The compensation insert taking 0 rows is a
  *duplicate*: skip. Otherwise run the body.

An insert of a key that another open transaction has just inserted waits for that one to
end, so two runs of one step cannot both pass. In a saga step's transaction
(``SagaTransaction``) the action's row of a resource not enlisted yet rides in the round trip
of its branch's begin (``SagaTransaction.begin_with``; on MySQL/MariaDB as a plain INSERT,
whose duplicate key fails that statement alone, the branch going on). The per-kind SQL lives
in these tables of statements (like the commit-marker table's, ``xatm.participants.marker``);
the table is created on the resource's first use by a saga, on a connection of its own (DDL
cannot run inside XA).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from xatm.core import deadline as _deadline
from xatm.core.deadline import STEP_FLOOR, step_bound
from xatm.core.urls import ResourceSpec
from xatm.participants.adapters import make_participant
from xatm.sagas.definition import SagaError
from xatm.transactions.transaction import SagaTransaction

TABLE = "xatm_barrier"
ACTION = "action"
COMPENSATION = "compensation"

_DDL = {
    "postgresql": (
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        " saga_id VARCHAR(64) NOT NULL,"
        " step VARCHAR(64) NOT NULL,"
        " op VARCHAR(16) NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL,"
        " PRIMARY KEY (saga_id, step, op))"
    ),
    "mysql": (
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        " saga_id VARCHAR(64) CHARACTER SET ascii NOT NULL,"
        " step VARCHAR(64) CHARACTER SET ascii NOT NULL,"
        " op VARCHAR(16) CHARACTER SET ascii NOT NULL,"
        " created_at DOUBLE NOT NULL,"
        " PRIMARY KEY (saga_id, step, op)) ENGINE=InnoDB"
    ),
}
_INSERT = {
    "postgresql": (
        f"INSERT INTO {TABLE} (saga_id, step, op, created_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING"
    ),
    "mysql": f"INSERT IGNORE INTO {TABLE} (saga_id, step, op, created_at) VALUES (%s, %s, %s, %s)",
}
_SELECT = f"SELECT op FROM {TABLE} WHERE saga_id = %s AND step = %s"
_BETWEEN = f"SELECT saga_id, step, op FROM {TABLE} WHERE created_at BETWEEN %s AND %s"
#: the action's row with its values written in, sent with the branch's begin
_WRITTEN = (
    f"INSERT INTO {TABLE} (saga_id, step, op, created_at) VALUES ('{{}}', '{{}}', '{{}}', {{!r}})"
)
_RIDING = {"postgresql": f"{_WRITTEN} ON CONFLICT DO NOTHING", "mysql": _WRITTEN}
#: ids written into SQL as they are: nothing in them needs quoting (xatm makes saga ids and
#: step names of these characters; anything else takes the statement with parameters)
_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SagaBarrierError(SagaError):
    """The barrier rows of one step disagree between its resources."""


def ensure_table(name: str, spec: ResourceSpec) -> None:
    """Create the barrier table on resource ``name`` if it is missing (own connection)."""
    participant = make_participant(name, spec)
    conn = participant.connect()
    try:
        participant.create_table(conn, _DDL[participant.kind])
    finally:
        participant.close(conn)


def rows_between(name: str, spec: ResourceSpec, start: float, end: float) -> dict[str, set[str]]:
    """The barrier rows written on resource ``name`` between ``start`` and ``end`` (epoch
    seconds), by saga: saga_id -> {"step op", ...}; none if the table is missing. On a
    connection of its own, its calls bounded."""
    participant = make_participant(name, spec)
    conn = participant.connect()
    found: dict[str, set[str]] = {}
    try:
        with _deadline.bounded(participant, conn, step_bound(STEP_FLOOR), "a barrier scan"):
            cur = participant.execute(conn, _BETWEEN, (start, end))
            try:
                for saga_id, step, op in cur.fetchall():
                    found.setdefault(str(saga_id), set()).add(f"{step} {op}")
            finally:
                cur.close()
    except Exception as e:
        if participant.is_missing_table(e):
            return {}
        raise
    finally:
        participant.close(conn)
    return found


def kind_of(spec: ResourceSpec) -> str:
    return "postgresql" if spec.kind == "postgresql" else "mysql"


def _insert(tx: Any, resource: str, kind: str, saga_id: str, step: str, op: str) -> int:
    cur = tx.execute(resource, _INSERT[kind], (saga_id, step, op, time.time()))
    try:
        return int(cur.rowcount)
    finally:
        cur.close()


def _riding(tx: Any, resource: str, kind: str, saga_id: str, step: str) -> bool | None:
    """The action's row inserted with the begin of ``resource``'s branch: True if inserted,
    False if it was there; None if it cannot ride (the branch is enlisted already, ``tx`` is
    not a saga step's transaction, an id would need quoting): then insert it as usual."""
    if not isinstance(tx, SagaTransaction) or not (
        _PLAIN.fullmatch(saga_id) and _PLAIN.fullmatch(step)
    ):
        return None
    return tx.begin_with(resource, _RIDING[kind].format(saga_id, step, ACTION, time.time()))


def _ops(tx: Any, resource: str, saga_id: str, step: str) -> set[str]:
    cur = tx.execute(resource, _SELECT, (saga_id, step))
    try:
        return {str(r[0]) for r in cur.fetchall()}
    finally:
        cur.close()


def _agree(answers: list[str], saga_id: str, step: str) -> str:
    if len(set(answers)) != 1:
        raise SagaBarrierError(
            f"saga {saga_id}, step {step}: the barrier rows of its resources disagree"
            f" ({answers}); were resources added to the step while it ran?"
        )
    return answers[0]


def enter_action(tx: Any, resources: Sequence[tuple[str, str]], saga_id: str, step: str) -> str:
    """Insert the action's barrier rows in ``tx``: ``run``, ``duplicate`` (the action
    committed earlier) or ``hanging`` (its compensation came first). ``resources``: (name,
    kind) of every resource of the step."""
    answers = []
    for resource, kind in resources:
        inserted = _riding(tx, resource, kind, saga_id, step)
        if inserted is None:
            inserted = _insert(tx, resource, kind, saga_id, step, ACTION) == 1
        if inserted:
            answers.append("run")
        elif COMPENSATION in _ops(tx, resource, saga_id, step):
            answers.append("hanging")
        else:
            answers.append("duplicate")
    return _agree(answers, saga_id, step)


def enter_compensation(
    tx: Any, resources: Sequence[tuple[str, str]], saga_id: str, step: str
) -> str:
    """Insert the compensation's barrier rows in ``tx``: ``run``, ``empty`` (the action
    never committed; its row now blocks it) or ``duplicate`` (compensated earlier)."""
    answers = []
    for resource, kind in resources:
        origin = _insert(tx, resource, kind, saga_id, step, ACTION)
        own = _insert(tx, resource, kind, saga_id, step, COMPENSATION)
        if own == 0:
            answers.append("duplicate")
        elif origin == 1:
            answers.append("empty")
        else:
            answers.append("run")
    return _agree(answers, saga_id, step)
