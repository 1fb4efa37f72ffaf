"""PostgreSQL branch operations, written once as I/O-free generators for every runner.

Each operation yields commands and is sent their answers (or has the driver's error
thrown into it), then returns its result; ``xatm.participants.runner`` runs it, sync or
asyncio, through an executor (``xatm.participants.postgres.executors``) that performs
each command on a connection and decides nothing. The order of the statements and what
each answer or error means are written here only (with ``statements``):

* :class:`Status` asks for the session's transaction status (no I/O: psycopg knows it),
  answered with a ``psycopg.pq.TransactionStatus``;
* :class:`Send` sends statements in one round trip, answered with a :class:`Reply` (the
  last statement's command tag, and the first row of the first if asked for).

psycopg's error classes are the same for its sync and asyncio connections, so the
operations read errors with them directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from xatm.core.participant import PhaseTwo, Prepared, Statement, Vote
from xatm.core.xid import Xid
from xatm.participants.postgres.statements import (
    answered_and_alive,
    check_committed,
    check_one_phase,
    check_open,
    commit_failed,
    finish_statement,
    not_found,
    prepare_failed,
    prepare_statements,
    vote_of,
)


@dataclass(frozen=True, slots=True)
class Status:
    """Ask for the session's transaction status (no round trip)."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``bound`` (their parameters bound on the client) and then ``statements``, all
    in one simple query: one round trip; the server stops at the first that fails. ``row``:
    answer with the first row of the first statement too."""

    statements: tuple[str, ...]
    row: bool = False
    bound: tuple[Statement, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a :class:`Send`: the last statement's command tag, and the first row
    of the first statement (if asked for, and it returned one)."""

    tag: str | None
    row: Any = None


#: what an operation yields
Command = Status | Send

STATUS = Status()
ROLLBACK = Send(("ROLLBACK",))
COMMIT = ("COMMIT",)


def begin(statement: str) -> Generator[Command, Any, None]:
    """Open the branch with ``statement`` (``BEGIN`` and its wait bounds: one round trip)."""
    yield Send((statement,))


def begin_with(statement: str, insert: str) -> Generator[Command, Any, bool]:
    """``begin``, and ``insert`` (one row, ``ON CONFLICT DO NOTHING``) in the same round
    trip: True if it inserted its row, False if a row with its key was there. A saga step's
    barrier row rides so."""
    reply = yield Send((statement, insert))
    return bool(reply.tag == "INSERT 0 1")


def prepare(xid: Xid) -> Generator[Command, Any, Prepared]:
    """Phase 1: the branch's transaction id and ``PREPARE TRANSACTION`` in one round trip,
    then, for a branch that wrote nothing, ``COMMIT PREPARED`` at once (READ_ONLY; if that
    fails, an ordinary prepared branch: presumed abort makes that harmless)."""
    check_open((yield STATUS))
    try:
        reply = yield Send(prepare_statements(xid), row=True)
    except psycopg.Error as e:
        raise prepare_failed(e) from e
    vote = vote_of(reply.tag, reply.row)
    if vote is not None:
        return vote
    try:
        yield Send((finish_statement("COMMIT", xid),))
    except psycopg.Error:
        return Prepared(Vote.PREPARED)
    return Prepared(Vote.READ_ONLY)


def commit_one_phase(before: Sequence[Statement] = ()) -> Generator[Command, Any, None]:
    """Commit the unprepared branch, ``before`` run first: one simple query with their
    parameters bound on the client (a failing statement skips the rest, COMMIT included).
    An error the server answered, its session alive, means the branch did not commit: it is
    rolled back and votes no; any other error leaves the outcome unknown (raised as it is)."""
    check_one_phase((yield STATUS))
    try:
        reply = yield Send(COMMIT, bound=tuple(before))
    except psycopg.Error as e:
        status = yield STATUS
        if not answered_and_alive(e, status):
            raise  # the outcome is unknown
        if status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                yield ROLLBACK
        raise commit_failed(e) from e
    check_committed(reply.tag)


def finish(verb: str, xid: Xid) -> Generator[Command, Any, PhaseTwo]:
    """Phase 2: ``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` (``verb``); an unknown gid is
    NOT_FOUND."""
    try:
        yield Send((finish_statement(verb, xid),))
    except psycopg.Error as e:
        if not_found(e):
            return PhaseTwo.NOT_FOUND
        raise
    return PhaseTwo.DONE


def rollback_active() -> Generator[Command, Any, None]:
    """Roll back the unprepared branch (``ROLLBACK`` unless the session is idle)."""
    if (yield STATUS) != TransactionStatus.IDLE:
        yield ROLLBACK
