"""MySQL / MariaDB XA statements and what the server's answers to them mean (pure, no I/O).

The XA SQL and the reading of each error number are written here only; the operations
(``xatm.participants.mysql.operations``) use them, whichever runner and driver perform the
I/O. Errors are read by their MySQL error number, which a ``MySQLDriver`` extracts.
"""

from __future__ import annotations

from typing import Any

from xatm.core.participant import BranchVotedNo, PhaseTwo
from xatm.core.urls import redact
from xatm.core.xid import Xid
from xatm.participants.mysql.drivers import MySQLDriver

XAER_NOTA = 1397
#: XAER_DUPID: the xid is already in use (by another session)
XAER_DUPID = 1440
#: XA_RBROLLBACK, XA_RBTIMEOUT, XA_RBDEADLOCK: the branch was rolled back by the server
XA_ROLLED_BACK = frozenset({1402, 1613, 1614})
ER_DUP_ENTRY = frozenset({1062, 1586})  # ER_DUP_ENTRY, ER_DUP_ENTRY_WITH_KEY_NAME
#: answers to ``XA END; XA COMMIT ... ONE PHASE`` after which the branch is certainly not
#: committed: rolled back by the server (XA_RB*), or the statement refused in the branch's
#: state (XAER_NOTA, XAER_INVAL, XAER_RMFAIL, XAER_OUTSIDE), or the wait for the commit lock
#: (``FLUSH TABLES WITH READ LOCK``, a backup) timed out or deadlocked (the server rolls the
#: branch back). Any other error may come after the commit happened.
ONE_PHASE_REFUSED = XA_ROLLED_BACK | {XAER_NOTA, 1398, 1399, 1400, 1205, 1213}


def start_statement(xid: Xid) -> str:
    return f"XA START {xid.to_mysql()}"


def end_statement(xid: Xid) -> str:
    return f"XA END {xid.to_mysql()}"


def prepare_statements(xid: Xid) -> tuple[str, str]:
    x = xid.to_mysql()
    return f"XA END {x}", f"XA PREPARE {x}"


def one_phase_statements(xid: Xid) -> tuple[str, str]:
    x = xid.to_mysql()
    return f"XA END {x}", f"XA COMMIT {x} ONE PHASE"


def finish_statement(verb: str, xid: Xid) -> str:
    """``XA COMMIT`` or ``XA ROLLBACK`` (``verb``) of a prepared branch."""
    return f"XA {verb} {xid.to_mysql()}"


def one_phase_refused(errno: int | None) -> bool:
    """Is ``errno``, answering ``XA END; XA COMMIT ... ONE PHASE``, a certain "not
    committed"? (False: the commit may have happened, e.g. 1317 query interrupted, 1401
    XAER_RMERR, 1180 error during commit; the outcome is unknown.)"""
    return errno in ONE_PHASE_REFUSED


def finish_answer(verb: str, errno: int | None) -> PhaseTwo | None:
    """What a phase-2 call's error ``errno`` means: NOT_FOUND (no such branch), DONE (a
    rollback of a branch the server rolled back already: read-only MariaDB branch, deadlock
    victim; its connection is closed rather than pooled), None (a real failure: raise)."""
    if errno == XAER_NOTA:
        return PhaseTwo.NOT_FOUND
    if verb == "ROLLBACK" and errno in XA_ROLLED_BACK:
        return PhaseTwo.DONE
    return None


def prepare_failed(driver: MySQLDriver, e: BaseException) -> BranchVotedNo:
    return BranchVotedNo(f"XA PREPARE failed: {describe(driver, e)}", e)


def commit_failed(driver: MySQLDriver, e: BaseException) -> BranchVotedNo:
    return BranchVotedNo(f"the one-phase commit failed: {describe(driver, e)}", e)


def describe(driver: MySQLDriver, e: BaseException) -> str:
    """A driver error in one line, with its MySQL error number, password-free."""
    args: tuple[Any, ...] = tuple(getattr(e, "args", ()))
    if driver.name != "mysqlconnector" and len(args) >= 2 and isinstance(args[0], int):
        text = f"{args[0]} {args[1]}"  # PyMySQL and MySQLdb: (errno, message)
    else:
        text = str(e)
    return redact(" ".join(text.split())) or type(e).__name__  # one line, as promised
