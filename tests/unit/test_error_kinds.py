"""Each participant's reading of its drivers' errors (``Participant.classify``), from a
table of errors made by hand, and the rule over several participants (no servers)."""

from __future__ import annotations

import psycopg
import pymysql
import pytest

from xatm.core.participant import ErrorKind, classify
from xatm.core.urls import parse_url
from xatm.participants.adapters import make_participant
from xatm.participants.mysql.participant import classify_error as mysql_kind
from xatm.participants.postgres.participant import classify_error as pg_kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.SerializationFailure("x"), ErrorKind.SERIALIZATION),
        (psycopg.errors.DeadlockDetected("x"), ErrorKind.DEADLOCK),
        (psycopg.errors.LockNotAvailable("x"), ErrorKind.LOCK_TIMEOUT),
        (psycopg.errors.QueryCanceled("x"), ErrorKind.CANCELLED),
        (psycopg.OperationalError("connection lost"), ErrorKind.GONE),
        (psycopg.InterfaceError("closed"), ErrorKind.GONE),
        (psycopg.errors.UniqueViolation("x"), ErrorKind.OTHER),
        (pymysql.err.OperationalError(1213, "deadlock"), ErrorKind.OTHER),
        (ConnectionResetError("x"), ErrorKind.OTHER),
    ],
)
def test_postgres(error: BaseException, kind: ErrorKind) -> None:
    assert pg_kind(error) is kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (pymysql.err.OperationalError(1213, "deadlock"), ErrorKind.DEADLOCK),
        (pymysql.err.OperationalError(1614, "XA_RBDEADLOCK"), ErrorKind.DEADLOCK),
        (pymysql.err.OperationalError(1205, "lock wait timeout"), ErrorKind.LOCK_TIMEOUT),
        (pymysql.err.OperationalError(1613, "XA_RBTIMEOUT"), ErrorKind.LOCK_TIMEOUT),
        (pymysql.err.OperationalError(2013, "lost connection"), ErrorKind.GONE),
        (pymysql.err.IntegrityError(1062, "duplicate"), ErrorKind.OTHER),
        (psycopg.errors.DeadlockDetected("x"), ErrorKind.OTHER),
        (ConnectionResetError("x"), ErrorKind.OTHER),
    ],
)
def test_mysql(error: BaseException, kind: ErrorKind) -> None:
    assert mysql_kind(error) is kind


def test_over_several_participants() -> None:
    pg = make_participant("pg", parse_url("postgresql://u@127.0.0.1:1/d"))
    maria = make_participant("m", parse_url("mysql://u@127.0.0.1:1/d"))
    both = [pg, maria]
    assert classify(psycopg.errors.DeadlockDetected("x"), both) is ErrorKind.DEADLOCK
    assert classify(pymysql.err.OperationalError(1205, "x"), both) is ErrorKind.LOCK_TIMEOUT
    # an OSError nobody claims is a lost connection, whichever databases are configured
    assert classify(ConnectionResetError("x"), [pg]) is ErrorKind.GONE
    assert classify(FileNotFoundError("x"), []) is ErrorKind.GONE
    assert classify(ValueError("x"), both) is ErrorKind.OTHER
    assert all(k.transient for k in ErrorKind if k is not ErrorKind.OTHER)
    assert not ErrorKind.OTHER.transient
