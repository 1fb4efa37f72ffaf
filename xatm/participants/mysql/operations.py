"""MySQL / MariaDB XA branch operations, written once as I/O-free generators for every runner.

Each operation yields commands and is sent their answers (None for all of them here), or has
the driver's error thrown into it, then returns its result; ``xatm.participants.runner``
runs it, sync or asyncio, through an executor (``xatm.participants.mysql.executors``) that
performs each command on a connection and decides nothing. The commands:

* :class:`Run`: statements that return no rows, in one round trip where the driver allows;
* :class:`Execute`: one statement with parameters, on a buffered cursor (the marker rows);
* :class:`Consume`: read and drop whatever the connection has unread;
* :class:`Mark`: the connection's XA state is (or is no longer) possibly other than idle;
  the executor notes it in its participant's :class:`~.executors.XAConnections`, and a
  connection marked in XA is never pooled.

An operation reads errors with ``driver`` (a ``MySQLDriver``: its error classes, error
numbers and connection errors), the driver whose classes the connection raises: the sync
participant's, or mysql-connector's for mysql.connector.aio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from xatm.core.participant import PhaseTwo, Prepared, Statement, Vote
from xatm.core.xid import Xid
from xatm.participants.mysql.drivers import MySQLDriver
from xatm.participants.mysql.statements import (
    ER_DUP_ENTRY,
    XA_ROLLED_BACK,
    commit_failed,
    end_statement,
    finish_answer,
    finish_statement,
    one_phase_refused,
    one_phase_statements,
    prepare_failed,
    prepare_statements,
    start_statement,
)


@dataclass(frozen=True, slots=True)
class Run:
    """Send ``statements`` (no rows) in one query where the driver allows it; the server
    stops at the first that fails, and its error is raised."""

    statements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    """Run one statement with its parameters on a buffered cursor, then close it."""

    query: str
    params: Any


@dataclass(frozen=True, slots=True)
class Consume:
    """Read and drop whatever is unread on the connection."""


@dataclass(frozen=True, slots=True)
class Mark:
    """Note that the connection may be inside an XA branch (``in_xa``), or is known not to be."""

    in_xa: bool


#: what an operation yields
Command = Run | Execute | Consume | Mark

CONSUME = Consume()
ENTER_XA = Mark(True)
LEAVE_XA = Mark(False)


def begin(xid: Xid) -> Generator[Command, Any, None]:
    """``XA START``; the connection is marked before sending (a failed XA START leaves its
    state unknown). Lock waits are bounded by the server's ``innodb_lock_wait_timeout``."""
    yield ENTER_XA
    yield Run((start_statement(xid),))


def begin_with(driver: MySQLDriver, xid: Xid, insert: str) -> Generator[Command, Any, bool]:
    """``begin``, and ``insert`` (a plain one-row INSERT) in the same round trip: True if
    it inserted its row, False if its key was there (a duplicate key fails that statement
    alone; the branch goes on). A saga step's barrier row rides so."""
    yield ENTER_XA
    try:
        yield Run((start_statement(xid), insert))
    except driver.errors() as e:
        if driver.errno(e) in ER_DUP_ENTRY:  # only the insert can fail so
            return False
        raise
    return True


def prepare(driver: MySQLDriver, xid: Xid) -> Generator[Command, Any, Prepared]:
    """``XA END; XA PREPARE`` in one round trip; any error is a no vote, and after one that
    is not a lost connection the branch is rolled back quietly. A read-only XA branch
    cannot be told apart: it is prepared like any other."""
    try:
        yield Run(prepare_statements(xid))
    except driver.errors() as e:
        if not driver.is_connection_error(e):
            yield from rollback_quietly(driver, xid)
        raise prepare_failed(driver, e) from e
    return Prepared(Vote.PREPARED)


def commit_one_phase(
    driver: MySQLDriver, xid: Xid, before: Sequence[Statement] = ()
) -> Generator[Command, Any, None]:
    """``before`` (one round trip each), then ``XA END; XA COMMIT ... ONE PHASE``. A failure
    before the commit is sent, or an answer that refuses it (``one_phase_refused``), rolls
    the branch back and votes no; a lost connection or any other answer to the commit
    leaves the outcome unknown (raised as it is: the connection is closed)."""
    committing = False
    try:
        for query, params in before:  # the commit is not sent yet: a failure is a "no"
            yield Execute(query, params)
        committing = True
        yield Run(one_phase_statements(xid))
    except driver.errors() as e:
        if driver.is_connection_error(e):
            raise  # the outcome is unknown
        if committing and not one_phase_refused(driver.errno(e)):
            raise  # the commit may have happened: unknown (the connection is closed)
        yield from rollback_quietly(driver, xid)
        raise commit_failed(driver, e) from e
    yield LEAVE_XA


def finish(driver: MySQLDriver, verb: str, xid: Xid) -> Generator[Command, Any, PhaseTwo]:
    """Phase 2: ``XA COMMIT`` or ``XA ROLLBACK`` (``verb``); an error is read by
    ``finish_answer`` (NOT_FOUND, DONE: rolled back by the server already; that connection
    stays marked, so it is closed) or raised."""
    try:
        yield Run((finish_statement(verb, xid),))
    except driver.errors() as e:
        result = finish_answer(verb, driver.errno(e))
        if result is None:
            raise
        return result
    yield LEAVE_XA
    return PhaseTwo.DONE


def rollback_active(driver: MySQLDriver, xid: Xid) -> Generator[Command, Any, None]:
    """Roll back an unprepared branch: ``XA END`` (an error other than a lost connection
    ignored: already IDLE, or rollback-only after a deadlock), then ``XA ROLLBACK`` (an
    XA_RB* answer: rolled back by the server already; the connection stays marked)."""
    yield CONSUME
    try:
        yield Run((end_statement(xid),))
    except driver.errors() as e:
        if driver.is_connection_error(e):
            raise
    try:
        yield Run((finish_statement("ROLLBACK", xid),))
    except driver.errors() as e:
        if driver.errno(e) in XA_ROLLED_BACK:
            return
        raise
    yield LEAVE_XA


def rollback_quietly(driver: MySQLDriver, xid: Xid) -> Generator[Command, Any, None]:
    """Roll back a branch whose prepare or one-phase commit failed, in whatever state it is
    left (ACTIVE if the failure came before ``XA END``, IDLE after), ignoring the driver's
    errors. If that does not succeed, the connection stays marked in XA: closed, not pooled."""
    errors = driver.errors()
    try:
        yield CONSUME
        with contextlib.suppress(*errors):
            yield Run((end_statement(xid),))  # fails harmlessly if already IDLE
        yield Run((finish_statement("ROLLBACK", xid),))
        yield LEAVE_XA
    except errors:
        pass
