"""The participants' branch operations (``xatm.participants.*.operations``) driven with scripted
answers and thrown driver errors: no server, no connection.

Each case runs one operation's generator against a script of (the command it must yield, the
answer to send it or the error to throw into it), and checks what it returns or raises. The
errors are the drivers' own classes, made by hand with their SQLSTATE or error number. Then
the runners (``xatm.participants.runner``) with executors made of lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import mysql.connector.errors as myerr
import psycopg
import pymysql
import pytest
from psycopg.pq import TransactionStatus

from xatm.core.participant import BranchVotedNo, PhaseTwo, Prepared, Vote
from xatm.core.xid import branch_xid
from xatm.participants.mysql import operations as my
from xatm.participants.mysql.drivers import MySQLDriver, by_name
from xatm.participants.mysql.executors import XAConnections
from xatm.participants.postgres import operations as pg
from xatm.participants.runner import arun, run, start

XID = branch_xid("xatm.unit.0123456789abcdef0123456789a", "ledger")
IDLE = TransactionStatus.IDLE
INTRANS = TransactionStatus.INTRANS
INERROR = TransactionStatus.INERROR
UNKNOWN = TransactionStatus.UNKNOWN

#: the mysql-connector driver classifies mysql.connector.aio's errors (the same classes)
CONNECTOR = by_name("mysqlconnector")
PYMYSQL = by_name("pymysql")

Script = list[tuple[Any, Any]]


def drive(op: Generator[Any, Any, Any], script: Script) -> Any:
    """Run ``op`` through ``script``: each command it yields must be the next one scripted,
    and gets the scripted answer (an exception is thrown into it). Returns its result (what
    it raises goes to the caller); every scripted step must be used."""
    steps = iter(script)
    answer: Any = None
    error: BaseException | None = None
    try:
        while True:
            command = op.send(answer) if error is None else op.throw(error)
            expected, reply = next(steps, (None, None))
            assert command == expected, f"yielded {command!r}, script says {expected!r}"
            answer, error = (None, reply) if isinstance(reply, BaseException) else (reply, None)
    except StopIteration as stop:
        assert next(steps, None) is None, "script not used up"
        return stop.value


def pg_error(cls: type[psycopg.Error], text: str = "boom") -> psycopg.Error:
    return cls(text)


def my_error(errno: int, cls: type[BaseException] = myerr.DatabaseError) -> BaseException:
    return cls(msg=f"error {errno}", errno=errno)


# -- PostgreSQL ----------------------------------------------------------------------------
PREPARE = pg.Send(
    (
        "SELECT pg_current_xact_id_if_assigned()::text",
        f"PREPARE TRANSACTION '{XID.to_pg_gid()}'",
    ),
    row=True,
)
COMMIT_PREPARED = pg.Send((f"COMMIT PREPARED '{XID.to_pg_gid()}'",))
ROLLBACK_PREPARED = pg.Send((f"ROLLBACK PREPARED '{XID.to_pg_gid()}'",))


def test_pg_begin_is_one_round_trip() -> None:
    statement = "BEGIN; SET LOCAL lock_timeout = '5000ms'"
    assert drive(pg.begin(statement), [(pg.Send((statement,)), pg.Reply("SET"))]) is None


def test_pg_prepare_votes_prepared_with_the_transaction_id() -> None:
    vote = drive(
        pg.prepare(XID),
        [(pg.STATUS, INTRANS), (PREPARE, pg.Reply("PREPARE TRANSACTION", ("742",)))],
    )
    assert vote == Prepared(Vote.PREPARED, 742)


def test_pg_prepare_answered_rollback_votes_no() -> None:
    """A failed transaction answers PREPARE with the tag ROLLBACK instead of an error."""
    with pytest.raises(BranchVotedNo, match="ROLLBACK"):
        drive(
            pg.prepare(XID),
            [(pg.STATUS, INTRANS), (PREPARE, pg.Reply("ROLLBACK", ("742",)))],
        )


@pytest.mark.parametrize("status", [INERROR, IDLE])
def test_pg_prepare_of_a_branch_not_open_votes_no_without_sending(
    status: TransactionStatus,
) -> None:
    with pytest.raises(BranchVotedNo):
        drive(pg.prepare(XID), [(pg.STATUS, status)])


def test_pg_read_only_branch_is_finished_at_once() -> None:
    vote = drive(
        pg.prepare(XID),
        [
            (pg.STATUS, INTRANS),
            (PREPARE, pg.Reply("PREPARE TRANSACTION", (None,))),
            (COMMIT_PREPARED, pg.Reply("COMMIT PREPARED")),
        ],
    )
    assert vote == Prepared(Vote.READ_ONLY)


def test_pg_read_only_branch_whose_commit_fails_stays_prepared() -> None:
    vote = drive(
        pg.prepare(XID),
        [
            (pg.STATUS, INTRANS),
            (PREPARE, pg.Reply("PREPARE TRANSACTION", (None,))),
            (COMMIT_PREPARED, pg_error(psycopg.OperationalError, "connection lost")),
        ],
    )
    assert vote == Prepared(Vote.PREPARED)


@pytest.mark.parametrize(
    "error",
    [
        pg_error(psycopg.errors.SerializationFailure),
        pg_error(psycopg.OperationalError, "server closed the connection"),
    ],
)
def test_pg_prepare_error_votes_no(error: psycopg.Error) -> None:
    with pytest.raises(BranchVotedNo, match="PREPARE TRANSACTION failed") as info:
        drive(pg.prepare(XID), [(pg.STATUS, INTRANS), (PREPARE, error)])
    assert info.value.__cause__ is error


def test_pg_prepare_lets_other_errors_through() -> None:
    error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        drive(pg.prepare(XID), [(pg.STATUS, INTRANS), (PREPARE, error)])
    assert info.value is error


def test_pg_commit_prepared() -> None:
    assert drive(pg.finish("COMMIT", XID), [(COMMIT_PREPARED, pg.Reply("COMMIT PREPARED"))]) is (
        PhaseTwo.DONE
    )


@pytest.mark.parametrize(
    ("verb", "command"), [("COMMIT", COMMIT_PREPARED), ("ROLLBACK", ROLLBACK_PREPARED)]
)
def test_pg_finish_of_an_unknown_gid_is_not_found(verb: str, command: pg.Send) -> None:
    error = pg_error(psycopg.errors.UndefinedObject, "prepared transaction does not exist")
    assert error.sqlstate == "42704"
    assert drive(pg.finish(verb, XID), [(command, error)]) is PhaseTwo.NOT_FOUND


def test_pg_finish_other_errors_are_raised() -> None:
    error = pg_error(psycopg.OperationalError, "connection lost")
    with pytest.raises(psycopg.OperationalError) as info:
        drive(pg.finish("COMMIT", XID), [(COMMIT_PREPARED, error)])
    assert info.value is error


BEFORE = (("INSERT INTO t VALUES (%s, %s)", (1, "a")),)
ONE_PHASE = pg.Send(("COMMIT",), bound=BEFORE)


def test_pg_one_phase_commit_with_before_is_one_client_bound_query() -> None:
    script: Script = [(pg.STATUS, INTRANS), (ONE_PHASE, pg.Reply("COMMIT"))]
    assert drive(pg.commit_one_phase(BEFORE), script) is None
    plain: Script = [(pg.STATUS, INTRANS), (pg.Send(("COMMIT",)), pg.Reply("COMMIT"))]
    assert drive(pg.commit_one_phase(), plain) is None


def test_pg_one_phase_commit_answered_rollback_votes_no() -> None:
    with pytest.raises(BranchVotedNo, match="ROLLBACK"):
        drive(
            pg.commit_one_phase(),
            [(pg.STATUS, INTRANS), (pg.Send(("COMMIT",)), pg.Reply("ROLLBACK"))],
        )


@pytest.mark.parametrize("status", [INERROR, IDLE])
def test_pg_one_phase_commit_of_a_branch_not_open_votes_no(status: TransactionStatus) -> None:
    with pytest.raises(BranchVotedNo):
        drive(pg.commit_one_phase(BEFORE), [(pg.STATUS, status)])


def test_pg_one_phase_commit_error_rolls_back_and_votes_no() -> None:
    error = pg_error(psycopg.errors.UniqueViolation, "duplicate key")
    with pytest.raises(BranchVotedNo, match="the commit failed") as info:
        drive(
            pg.commit_one_phase(BEFORE),
            [
                (pg.STATUS, INTRANS),
                (ONE_PHASE, error),
                (pg.STATUS, INERROR),
                (pg.ROLLBACK, pg.Reply("ROLLBACK")),
            ],
        )
    assert info.value.__cause__ is error


def test_pg_one_phase_commit_error_votes_no_even_if_the_rollback_fails() -> None:
    with pytest.raises(BranchVotedNo):
        drive(
            pg.commit_one_phase(BEFORE),
            [
                (pg.STATUS, INTRANS),
                (ONE_PHASE, pg_error(psycopg.errors.UniqueViolation)),
                (pg.STATUS, INERROR),
                (pg.ROLLBACK, pg_error(psycopg.errors.QueryCanceled)),
            ],
        )
    # the session already idle: no ROLLBACK sent
    with pytest.raises(BranchVotedNo):
        drive(
            pg.commit_one_phase(),
            [
                (pg.STATUS, INTRANS),
                (pg.Send(("COMMIT",)), pg_error(psycopg.errors.CheckViolation)),
                (pg.STATUS, IDLE),
            ],
        )


@pytest.mark.parametrize(
    ("error", "after"),
    [
        # no answer from the server (no SQLSTATE): the connection went
        (pg_error(psycopg.OperationalError, "server closed the connection"), UNKNOWN),
        (pg_error(psycopg.InterfaceError, "the connection is closed"), UNKNOWN),
        # an answer, but a FATAL one: the session ended with it
        (pg_error(psycopg.errors.AdminShutdown, "terminating connection"), UNKNOWN),
        # an answer whose session is gone before its status could be read
        (pg_error(psycopg.errors.SerializationFailure), UNKNOWN),
    ],
)
def test_pg_one_phase_commit_without_a_live_answer_is_unknown(
    error: psycopg.Error, after: TransactionStatus
) -> None:
    with pytest.raises(type(error)) as info:
        drive(
            pg.commit_one_phase(BEFORE),
            [(pg.STATUS, INTRANS), (ONE_PHASE, error), (pg.STATUS, after)],
        )
    assert info.value is error


@pytest.mark.parametrize(
    "cls",
    [
        psycopg.errors.SerializationFailure,  # 40001: SERIALIZABLE, found at COMMIT
        psycopg.errors.DeadlockDetected,  # 40P01
        psycopg.errors.LockNotAvailable,  # 55P03: lock_timeout (a statement before COMMIT)
        psycopg.errors.QueryCanceled,  # 57014: statement_timeout or a cancel request
    ],
)
def test_pg_one_phase_commit_answered_with_an_operational_error_votes_no(
    cls: type[psycopg.Error],
) -> None:
    """psycopg counts these as OperationalError, but the server answered and the session
    lives on: the transaction did not commit (it is not in doubt)."""
    error = pg_error(cls)
    assert isinstance(error, psycopg.OperationalError) and error.sqlstate
    with pytest.raises(BranchVotedNo, match="the commit failed") as info:
        drive(
            pg.commit_one_phase(),
            [(pg.STATUS, INTRANS), (pg.Send(("COMMIT",)), error), (pg.STATUS, IDLE)],
        )
    assert info.value.__cause__ is error


def test_pg_rollback_active() -> None:
    assert drive(pg.rollback_active(), [(pg.STATUS, IDLE)]) is None
    script: Script = [(pg.STATUS, INERROR), (pg.ROLLBACK, pg.Reply("ROLLBACK"))]
    assert drive(pg.rollback_active(), script) is None


# -- MySQL / MariaDB -----------------------------------------------------------------------
X = XID.to_mysql()
XA_START = my.Run((f"XA START {X}",))
XA_END = my.Run((f"XA END {X}",))
XA_PREPARE = my.Run((f"XA END {X}", f"XA PREPARE {X}"))
XA_ONE_PHASE = my.Run((f"XA END {X}", f"XA COMMIT {X} ONE PHASE"))
XA_COMMIT = my.Run((f"XA COMMIT {X}",))
XA_ROLLBACK = my.Run((f"XA ROLLBACK {X}",))


def quiet_rollback(end_error: BaseException | None = None) -> Script:
    """The quiet rollback after a "no": its XA END may fail (XAER_RMFAIL: already IDLE)."""
    return [
        (my.CONSUME, None),
        (XA_END, my_error(1399) if end_error is None else end_error),
        (XA_ROLLBACK, None),
        (my.LEAVE_XA, None),
    ]


QUIET_ROLLBACK = quiet_rollback()


def test_mysql_begin_marks_the_connection_before_sending() -> None:
    assert drive(my.begin(XID), [(my.ENTER_XA, None), (XA_START, None)]) is None


def test_mysql_prepare() -> None:
    vote = drive(my.prepare(CONNECTOR, XID), [(XA_PREPARE, None)])
    assert vote == Prepared(Vote.PREPARED)


@pytest.mark.parametrize(
    ("driver", "error", "end_error"),
    [
        (CONNECTOR, my_error(1614), my_error(1399)),  # XA_RBDEADLOCK
        (CONNECTOR, my_error(1399, myerr.IntegrityError), my_error(1399)),
        (
            PYMYSQL,
            pymysql.err.OperationalError(1614, "XA_RBDEADLOCK"),
            pymysql.err.OperationalError(1399, "XAER_RMFAIL"),
        ),
    ],
)
def test_mysql_prepare_error_rolls_back_quietly_and_votes_no(
    driver: MySQLDriver, error: BaseException, end_error: BaseException
) -> None:
    with pytest.raises(BranchVotedNo, match="XA PREPARE failed") as info:
        drive(my.prepare(driver, XID), [(XA_PREPARE, error), *quiet_rollback(end_error)])
    assert info.value.__cause__ is error


def test_mysql_prepare_votes_no_when_the_quiet_rollback_fails_too() -> None:
    """The connection stays marked in XA (no LEAVE_XA): it is closed, never pooled."""
    with pytest.raises(BranchVotedNo):
        drive(
            my.prepare(CONNECTOR, XID),
            [
                (XA_PREPARE, my_error(1614)),
                (my.CONSUME, None),
                (XA_END, None),
                (XA_ROLLBACK, my_error(2013, myerr.OperationalError)),
            ],
        )


def test_mysql_prepare_lost_connection_votes_no_without_a_rollback() -> None:
    error = my_error(2013, myerr.OperationalError)
    with pytest.raises(BranchVotedNo) as info:
        drive(my.prepare(CONNECTOR, XID), [(XA_PREPARE, error)])
    assert info.value.__cause__ is error


def test_mysql_errors_are_read_with_the_given_driver() -> None:
    """A PyMySQL participant does not take mysql-connector's error for its own."""
    error = my_error(1614)
    with pytest.raises(myerr.DatabaseError) as info:
        drive(my.prepare(PYMYSQL, XID), [(XA_PREPARE, error)])
    assert info.value is error


MARKER = (("INSERT INTO xatm_decisions VALUES (%s, %s, %s)", ("g", "b", 1.0)),)
EXECUTE_MARKER = my.Execute(*MARKER[0])


def test_mysql_one_phase_commit() -> None:
    script: Script = [(EXECUTE_MARKER, None), (XA_ONE_PHASE, None), (my.LEAVE_XA, None)]
    assert drive(my.commit_one_phase(CONNECTOR, XID, MARKER), script) is None


def test_mysql_one_phase_commit_before_statement_failure_is_a_no() -> None:
    error = my_error(1062, myerr.IntegrityError)  # duplicate key: the commit is not sent
    with pytest.raises(BranchVotedNo, match="one-phase commit failed"):
        drive(
            my.commit_one_phase(CONNECTOR, XID, MARKER),
            [(EXECUTE_MARKER, error), *QUIET_ROLLBACK],
        )


@pytest.mark.parametrize("errno", [1614, 1397, 1399, 1205])
def test_mysql_one_phase_commit_refused_is_a_no(errno: int) -> None:
    with pytest.raises(BranchVotedNo):
        drive(
            my.commit_one_phase(CONNECTOR, XID),
            [(XA_ONE_PHASE, my_error(errno)), *QUIET_ROLLBACK],
        )


@pytest.mark.parametrize("errno", [1317, 1401, 1180])
def test_mysql_one_phase_commit_other_answer_is_unknown(errno: int) -> None:
    """After the commit was sent, an error that does not refuse it is raised as it is
    (the outcome is unknown): no rollback is sent."""
    error = my_error(errno)
    with pytest.raises(myerr.DatabaseError) as info:
        drive(
            my.commit_one_phase(CONNECTOR, XID, MARKER),
            [(EXECUTE_MARKER, None), (XA_ONE_PHASE, error)],
        )
    assert info.value is error


def test_mysql_one_phase_commit_lost_connection_is_unknown() -> None:
    error = my_error(2013, myerr.OperationalError)
    with pytest.raises(myerr.OperationalError) as info:
        drive(my.commit_one_phase(CONNECTOR, XID), [(XA_ONE_PHASE, error)])
    assert info.value is error


def test_mysql_finish() -> None:
    script: Script = [(XA_COMMIT, None), (my.LEAVE_XA, None)]
    assert drive(my.finish(CONNECTOR, "COMMIT", XID), script) is PhaseTwo.DONE


@pytest.mark.parametrize(("verb", "command"), [("COMMIT", XA_COMMIT), ("ROLLBACK", XA_ROLLBACK)])
def test_mysql_finish_of_an_unknown_xid_is_not_found(verb: str, command: my.Run) -> None:
    error = my_error(1397, myerr.IntegrityError)  # XAER_NOTA
    assert drive(my.finish(CONNECTOR, verb, XID), [(command, error)]) is PhaseTwo.NOT_FOUND


def test_mysql_rollback_of_a_branch_rolled_back_already_is_done() -> None:
    """The connection stays marked (no LEAVE_XA): it is closed rather than pooled."""
    result = drive(my.finish(CONNECTOR, "ROLLBACK", XID), [(XA_ROLLBACK, my_error(1614))])
    assert result is PhaseTwo.DONE
    error = my_error(1614)
    with pytest.raises(myerr.DatabaseError) as info:  # a commit of one is a failure
        drive(my.finish(CONNECTOR, "COMMIT", XID), [(XA_COMMIT, error)])
    assert info.value is error


def test_mysql_rollback_active() -> None:
    script: Script = [(my.CONSUME, None), (XA_END, None), (XA_ROLLBACK, None), (my.LEAVE_XA, None)]
    assert drive(my.rollback_active(CONNECTOR, XID), script) is None


def test_mysql_rollback_active_after_a_failed_end_still_rolls_back() -> None:
    script: Script = [
        (my.CONSUME, None),
        (XA_END, my_error(1614)),  # rollback-only after a deadlock
        (XA_ROLLBACK, None),
        (my.LEAVE_XA, None),
    ]
    assert drive(my.rollback_active(CONNECTOR, XID), script) is None


@pytest.mark.parametrize("errno", [1402, 1613, 1614])
def test_mysql_rollback_active_rolled_back_already_returns_quietly(errno: int) -> None:
    script: Script = [(my.CONSUME, None), (XA_END, None), (XA_ROLLBACK, my_error(errno))]
    assert drive(my.rollback_active(CONNECTOR, XID), script) is None


def test_mysql_rollback_active_raises_real_failures() -> None:
    lost = my_error(2013, myerr.OperationalError)
    with pytest.raises(myerr.OperationalError):
        drive(my.rollback_active(CONNECTOR, XID), [(my.CONSUME, None), (XA_END, lost)])
    error = my_error(1399)
    with pytest.raises(myerr.DatabaseError) as info:
        drive(
            my.rollback_active(CONNECTOR, XID),
            [(my.CONSUME, None), (XA_END, None), (XA_ROLLBACK, error)],
        )
    assert info.value is error


def test_xa_connections() -> None:
    class Conn:
        pass

    conns, conn = XAConnections(), Conn()
    assert conn not in conns
    conns.mark(conn, True)
    assert conn in conns
    conns.mark(conn, False)
    conns.mark(conn, False)
    assert conn not in conns


# -- the runners -----------------------------------------------------------------------------
class Scripted:
    """An executor answering from a script, noting what it performed and sent."""

    def __init__(self, script: Script, sendable: Callable[[Any], bool] = lambda c: False) -> None:
        self.script = list(script)
        self.sendable = sendable
        self.log: list[str] = []

    def perform(self, conn: Any, command: Any) -> Any:
        self.log.append(f"perform {command!r}")
        return self._answer(command)

    def send(self, conn: Any, command: Any) -> Callable[[], Any] | None:
        if not self.sendable(command):
            return None
        self.log.append(f"send {command!r}")

        def wait() -> Any:
            self.log.append("wait")
            return self._answer(command)

        return wait

    def _answer(self, command: Any) -> Any:
        expected, reply = self.script.pop(0)
        assert command == expected
        if isinstance(reply, BaseException):
            raise reply
        return reply


class AsyncScripted(Scripted):
    async def perform(self, conn: Any, command: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return Scripted.perform(self, conn, command)


READ_ONLY: Script = [
    (pg.STATUS, INTRANS),
    (PREPARE, pg.Reply("PREPARE TRANSACTION", (None,))),
    (COMMIT_PREPARED, pg.Reply("COMMIT PREPARED")),
]


def test_run() -> None:
    executor = Scripted(READ_ONLY)
    assert run(executor, "conn", pg.prepare(XID)) == Prepared(Vote.READ_ONLY)
    assert executor.script == []
    error = pg_error(psycopg.errors.UndefinedObject)
    assert run(Scripted([(COMMIT_PREPARED, error)]), "c", pg.finish("COMMIT", XID)) is (
        PhaseTwo.NOT_FOUND
    )


def test_arun() -> None:
    executor = AsyncScripted(READ_ONLY)
    assert asyncio.run(arun(executor, "conn", pg.prepare(XID))) == Prepared(Vote.READ_ONLY)
    with pytest.raises(BranchVotedNo):
        asyncio.run(
            arun(
                AsyncScripted([(XA_PREPARE, my_error(1614)), *QUIET_ROLLBACK]),
                "conn",
                my.prepare(CONNECTOR, XID),
            )
        )


def is_send(command: Any) -> bool:
    return isinstance(command, pg.Send)


def test_start_sends_then_runs_the_rest_when_called() -> None:
    executor = Scripted(READ_ONLY, is_send)
    finish = start(executor, "conn", pg.prepare(XID))
    assert executor.log == [f"perform {pg.STATUS!r}", f"send {PREPARE!r}"]
    assert finish() == Prepared(Vote.READ_ONLY)
    assert executor.log[2:] == ["wait", f"perform {COMMIT_PREPARED!r}"]  # the rest: blocking


def test_start_reads_errors_like_run() -> None:
    # a status that votes no: raised by start, nothing sent
    with pytest.raises(BranchVotedNo):
        start(Scripted([(pg.STATUS, INERROR)], is_send), "conn", pg.prepare(XID))
    # an error in the answer: the rest of the operation reads it
    error = pg_error(psycopg.errors.UndefinedObject)
    finish = start(Scripted([(COMMIT_PREPARED, error)], is_send), "c", pg.finish("COMMIT", XID))
    assert finish() is PhaseTwo.NOT_FOUND

    # an error while sending: the operation reads it at once
    class Failing(Scripted):
        def send(self, conn: Any, command: Any) -> Callable[[], Any] | None:
            if isinstance(command, pg.Send):
                raise psycopg.OperationalError("gone")
            return None

    with pytest.raises(BranchVotedNo, match="gone"):
        start(Failing([(pg.STATUS, INTRANS)]), "conn", pg.prepare(XID))


def test_start_of_an_operation_that_sends_nothing_runs_it_whole() -> None:
    executor = Scripted([(pg.STATUS, IDLE)], is_send)
    finish = start(executor, "conn", pg.rollback_active())
    assert executor.script == []
    assert finish() is None
