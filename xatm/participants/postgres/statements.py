"""PostgreSQL branch statements and what the server's answers to them mean (pure, no I/O).

The SQL of a branch and the reading of each answer or error are written here only; the
operations (``xatm.participants.postgres.operations``) use them, whichever runner, sync or
asyncio, performs the I/O.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from xatm.core.participant import BranchVotedNo, Prepared, Vote
from xatm.core.text import first_line
from xatm.core.xid import Xid

UNDEFINED_OBJECT = "42704"

#: the branch's transaction id (NULL if it wrote nothing)
TXID = "SELECT pg_current_xact_id_if_assigned()::text"
#: ``PREPARE TRANSACTION`` of a quoted gid (``{}``: :func:`gid_literal`)
PREPARE_ONLY = "PREPARE TRANSACTION {}"
#: ``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` (the verb) of a quoted gid
FINISH = "{} PREPARED {}"

#: every gid ``Xid.to_pg_gid`` writes: digits, base64, and two underscores
_GID_SHAPE = re.compile(r"-?[0-9]{1,10}_[A-Za-z0-9+/=]*_[A-Za-z0-9+/=]*")


@functools.lru_cache(maxsize=1024)  # prepare and commit of one branch: encoded once
def gid_literal(xid: Xid) -> str:
    """The gid of ``xid`` as a quoted SQL string literal. Built as text (composing it with
    ``psycopg.sql.Literal`` costs as much client CPU as the statement itself): the gid's
    shape is checked, and that shape holds no quote or backslash, so nothing needs escaping."""
    gid = xid.to_pg_gid()
    if _GID_SHAPE.fullmatch(gid) is None:
        raise ValueError(f"not a gid xatm writes: {gid[:80]!r}")
    return f"'{gid}'"


def prepare_statements(xid: Xid) -> tuple[str, str]:
    """The branch's transaction id (NULL if it wrote nothing) and the prepare."""
    return TXID, PREPARE_ONLY.format(gid_literal(xid))


def finish_statement(verb: str, xid: Xid) -> str:
    """``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` (``verb``) of ``xid``."""
    return FINISH.format(verb, gid_literal(xid))


def check_open(status: TransactionStatus) -> None:
    """Vote no (BranchVotedNo) unless the branch's transaction (``status``: the session's
    transaction status) is open and sound."""
    if status == TransactionStatus.INERROR:
        raise BranchVotedNo("the branch's transaction had already failed")
    if status != TransactionStatus.INTRANS:
        raise BranchVotedNo(
            f"the branch's transaction is not open (status {status.name}): it was ended"
            " outside xatm, by a commit or rollback on the raw connection"
        )


def check_one_phase(status: TransactionStatus) -> None:
    """Refuse (BranchVotedNo) a one-phase commit of a branch that is not open and sound."""
    if status == TransactionStatus.INERROR:
        raise BranchVotedNo("the branch's transaction had already failed")
    if status != TransactionStatus.INTRANS:
        raise BranchVotedNo("the branch's transaction was ended outside xatm")


def vote_of(tag: str | None, row: Any) -> Prepared | None:
    """The vote, from PREPARE's command tag and the branch's transaction id (the first row
    of :data:`TXID`); None for a read-only branch (to finish now with COMMIT PREPARED:
    READ_ONLY if that works)."""
    if tag != "PREPARE TRANSACTION":
        raise BranchVotedNo(
            f"the server rolled the branch back instead of preparing it (command tag {tag!r})"
        )
    if row is None or row[0] is None:
        return None
    return Prepared(Vote.PREPARED, int(row[0]))


def prepare_failed(e: psycopg.Error) -> BranchVotedNo:
    return BranchVotedNo(f"PREPARE TRANSACTION failed: {describe(e)}", e)


def commit_failed(e: psycopg.Error) -> BranchVotedNo:
    return BranchVotedNo(f"the commit failed: {describe(e)}", e)


def check_committed(tag: str | None) -> None:
    """Vote no unless COMMIT's command tag says it committed."""
    if tag != "COMMIT":
        raise BranchVotedNo(f"the server answered {tag!r} to COMMIT")


def not_found(e: psycopg.Error) -> bool:
    """A phase-2 call's error meaning "no such prepared transaction"."""
    return e.sqlstate == UNDEFINED_OBJECT


def answered_and_alive(e: psycopg.Error, status: TransactionStatus) -> bool:
    """A one-phase COMMIT's error that says it did not commit: the server answered with an
    ERROR (it has a SQLSTATE: a serialization failure, a deferred constraint, a lock or
    statement timeout...) and the session lives on (its status is known). PostgreSQL rolls
    back a transaction whose COMMIT (or a statement sent before it in the same query) fails
    with an ERROR: once the commit record is written, a failure is a PANIC and later
    trouble only a WARNING. A FATAL error ends the session: its status is UNKNOWN."""
    alive = status in (TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.INERROR)
    return e.sqlstate is not None and alive


def is_connection_error(exc: BaseException) -> bool:
    """The connection is unusable and the outcome of its last call is unknown."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def describe(e: psycopg.Error) -> str:
    """A psycopg error in one line, with its SQLSTATE."""
    text = first_line(str(e), type(e).__name__)
    return f"{e.sqlstate} {text}" if e.sqlstate else text
