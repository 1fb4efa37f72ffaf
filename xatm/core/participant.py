"""The resource-manager interface: what the coordinator asks of one kind of database.

One ``Participant`` object drives one resource (a database on a server) through a DB-API
driver connection. The coordinator's view of a branch, in XA terms::

    begin ──> (application SQL) ──> prepare ──> commit_prepared
      │                               │    └──> rollback_prepared
      │                               └── vote no (raises BranchVotedNo): rolled back
      │                          (or votes READ_ONLY: already finished, no phase 2)
    ├──> commit_one_phase   (the only branch: no prepare, no log)
      └──> rollback_active    (the block raised, or another branch voted no)

``recover`` lists the branches prepared on the resource (every application's); the caller
keeps only xatm's. ``check`` reports why a resource is not fit for two-phase commit.
Implementations must never interpolate an XID into SQL except through ``Xid.to_pg_gid`` as a
quoted literal or ``Xid.to_mysql`` (hex literals).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from xatm.core.urls import Kind, ResourceSpec
from xatm.core.xid import Xid

Connection = (
    Any  # a driver connection: psycopg's, or a MySQL driver's (xatm.participants.mysql.drivers)
)
Cursor = Any
Statement = tuple[str, tuple[Any, ...]]  # SQL with %s placeholders, and its parameters


class Vote(enum.Enum):
    """A branch's answer to prepare."""

    PREPARED = "prepared"
    READ_ONLY = "read-only"  # nothing to commit: the branch is already finished


@dataclass(frozen=True, slots=True)
class Prepared:
    """A branch's yes vote.

    ``READ_ONLY``: the branch wrote nothing and is already finished (it takes no part in
    phase 2 and needs no decision). ``txid``: the server's own transaction id of the
    prepared branch where it has one (PostgreSQL), recorded with the COMMIT decision so
    recovery can later tell "committed" from "rolled back by hand" for a vanished branch.
    """

    vote: Vote
    txid: int | None = None


#: what the server can tell of a branch that is no longer prepared
Finished = Literal["committed", "aborted", "in progress", "unknown"]
CANNOT_TELL = "not found: committed earlier or resolved outside xatm (cannot tell)"


class PhaseTwo(enum.Enum):
    """What a phase-2 call found."""

    DONE = "done"
    NOT_FOUND = "not-found"  # no such prepared branch on the resource


class ErrorKind(enum.Enum):
    """What a database error means, as a participant reads its driver's error (its codes
    stay in its own folder)."""

    DEADLOCK = "deadlock"
    SERIALIZATION = "serialization"  # a serialization failure
    LOCK_TIMEOUT = "lock-timeout"  # a lock wait ran out of time (or no lock was available)
    CANCELLED = "cancelled"  # the statement was cancelled (a statement timeout)
    GONE = "gone"  # the connection or the server failed (the driver's operational errors)
    OTHER = "other"  # anything else: the application's, a constraint, a syntax error

    @property
    def transient(self) -> bool:
        """May running the work again meet something else (every kind but OTHER)?"""
        return self is not ErrorKind.OTHER


def classify(exc: BaseException, participants: Iterable[Participant]) -> ErrorKind:
    """What ``exc`` (one error, not its causes) is, as the first of ``participants`` that
    recognises it says; an ``OSError`` none of them claims is a lost connection."""
    for participant in participants:
        kind = participant.classify(exc)
        if kind is not ErrorKind.OTHER:
            return kind
    return ErrorKind.GONE if isinstance(exc, OSError) else ErrorKind.OTHER


class BranchVotedNo(Exception):
    """Prepare failed: the branch is (or will be, by the server) rolled back."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.__cause__ = cause


@dataclass(frozen=True, slots=True)
class PreparedBranch:
    """A prepared transaction found on a resource by ``recover``."""

    xid: Xid | None  # None: a gid that is not in XA shape (certainly not xatm's)
    raw: str  # the gid / XID as the server shows it
    prepared_at: float | None = None  # seconds since the epoch, where the server knows it
    owner: str | None = None  # the role that prepared it, where the server knows it


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``xatm doctor`` reports of a resource's configuration: ``ok`` False makes
    the resource unfit; ``advice``: fit, but a setting an operator should change."""

    check: str
    ok: bool
    detail: str
    advice: bool = False


class Participant(Protocol):
    """Drives one resource through its driver."""

    name: str
    spec: ResourceSpec

    @property
    def kind(self) -> Kind: ...

    def connect(self) -> Connection:
        """A new connection; raise ResourceUnavailable (redacted message) on failure."""

    def ping(self, conn: Connection) -> bool:
        """True if ``conn`` still answers."""

    def is_idle(self, conn: Connection) -> bool:
        """True if ``conn`` is healthy and outside any transaction (fit to pool)."""

    def close(self, conn: Connection) -> None:
        """Close ``conn``, ignoring errors."""

    def is_connection_error(self, exc: BaseException) -> bool:
        """True if ``exc`` means the connection is unusable (the outcome of its last call
        is unknown)."""

    def socket_of(self, conn: Connection) -> int | None:
        """The file descriptor of ``conn``'s socket, for ``xatm.core.deadline`` to cut a call
        the server does not answer in time (None if it cannot be found, or ``conn`` is
        closed)."""

    def classify(self, exc: BaseException) -> ErrorKind:
        """What ``exc`` is if it is this database's driver error (deadlock, serialization
        failure, lock timeout, cancelled statement, lost connection); ``OTHER`` otherwise
        (another driver's errors included)."""

    def is_duplicate_key(self, exc: BaseException) -> bool:
        """True if ``exc`` is a unique-key violation (the driver's own code for it)."""

    def is_xid_in_use(self, exc: BaseException) -> bool:
        """True if ``exc`` says a begin found the branch's xid held by another session (a
        begin tried again after its connection was lost: the server may still be ending
        the session that connection had)."""

    def is_missing_table(self, exc: BaseException) -> bool:
        """True if ``exc`` says the table does not exist."""

    def driver_info(self, conn: Connection) -> str:
        """The driver (and connection class) ``conn`` is, for ``doctor``."""

    def begin(self, conn: Connection, xid: Xid, timeout: float | None = None) -> None:
        """Start the branch ``xid`` on ``conn``; ``timeout``: the seconds its transaction
        has left, to bound the branch's lock waits where the adapter can do so cheaply."""

    def begin_with(self, conn: Connection, xid: Xid, timeout: float | None, insert: str) -> bool:
        """``begin``, then ``insert`` (one row, its values written in it) in the same round
        trip: True if it inserted its row, False if a row with its key was there (the branch
        is begun and usable either way). ``insert`` is written for this participant's kind:
        ``ON CONFLICT DO NOTHING`` on PostgreSQL, a plain INSERT on MySQL/MariaDB (whose
        duplicate key fails that statement alone). A saga step's barrier row rides so."""

    def execute(self, conn: Connection, sql: Any, params: Sequence[Any] | Any = None) -> Cursor:
        """Run application SQL inside the branch and return a cursor."""

    def prepare(self, conn: Connection, xid: Xid) -> Prepared:
        """Phase 1. Raise BranchVotedNo if the branch cannot commit."""

    def start_prepare(self, conn: Connection, xid: Xid) -> Callable[[], Prepared]:
        """Begin phase 1 and return a call that completes it (returns the vote or raises
        like ``prepare``). Drivers that can send without waiting do so, letting the
        coordinator overlap the branches' round trips without threads; others prepare at
        once."""

    def start_commit_prepared(self, conn: Connection, xid: Xid) -> Callable[[], PhaseTwo]:
        """Like ``start_prepare``, for ``commit_prepared``."""

    def commit_one_phase(
        self, conn: Connection, xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        """Commit an unprepared branch directly (the only branch, or the marker branch).

        ``before``: statements to run in the branch first, sent with the commit in as few
        round trips as the driver allows. Raise BranchVotedNo if the branch is certainly
        rolled back; anything else raised (a connection error, an answer after which the
        commit may have happened) means the outcome is unknown.
        """

    def commit_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo:
        """Phase 2, commit. ``conn`` may be the preparing connection or a fresh one."""

    def rollback_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo:
        """Phase 2, roll back a prepared branch."""

    def rollback_active(self, conn: Connection, xid: Xid) -> None:
        """Roll back an unprepared branch (the server also does so on disconnect)."""

    def recover(self, conn: Connection) -> list[PreparedBranch]:
        """Every prepared transaction on this resource (of any application)."""

    def check(self, conn: Connection) -> list[str]:
        """Problems that make the resource unfit for 2PC, each saying what to change."""

    def adopt(self, conn: Connection, info: dict[str, Any]) -> bool:
        """Take a connection from an application's pool (a SQLAlchemy engine's) for a
        branch: roll back what the pool left open, switch it to autocommit (xatm begins its
        branches itself) and match its session to the engine's settings; returns the
        connection's own autocommit setting, to be given back. ``info`` is the pool's
        dictionary of this connection (what is learnt once per connection is kept there)."""

    def set_autocommit(self, conn: Connection, on: bool) -> None:
        """Switch a connection's autocommit (to give an adopted connection back)."""

    def scalar(self, conn: Connection, sql: str) -> Any:
        """The first column of the first row of ``sql`` (None if it returns no row)."""

    def server_version(self, conn: Connection) -> str:
        """The server's name and version, short (for ``xatm doctor``)."""

    def two_phase_detail(self, conn: Connection) -> str:
        """What makes a resource that ``check`` passed fit for 2PC, in a few words."""

    def wait_findings(self, conn: Connection, timeout: float | None) -> list[Finding]:
        """``xatm doctor``'s findings on bounded waits and recovery's headroom, judged
        against the transaction ``timeout``."""

    #: ``CREATE TABLE IF NOT EXISTS xatm_decisions (...)`` in this server's dialect
    marker_ddl: str

    def table_exists(self, conn: Connection, table: str) -> bool:
        """Does ``table`` exist in the connection's database (or schema)?"""

    def create_table(self, conn: Connection, ddl: str) -> None:
        """Run ``ddl`` (a ``CREATE TABLE IF NOT EXISTS``, outside any transaction): done
        once the table is there, also when other sessions create it at the same moment."""

    def local_transaction(
        self, conn: Connection, statements: Sequence[Statement], *, lock_wait: float, commit: bool
    ) -> None:
        """Run ``statements`` in one local (not XA) transaction with lock waits bounded by
        ``lock_wait`` seconds, then commit it (or roll it back); rolled back if one fails."""

    #: True when ``start_prepare`` / ``start_commit_prepared`` send without waiting for the
    #: answer (so starting this branch's step first lets the others overlap with it)
    sends_without_waiting: bool

    #: True when a marker branch's decision row and its commit go in one round trip (such a
    #: resource is preferred as the marker branch)
    marker_in_one_round_trip: bool

    #: True when committing or rolling back a branch that ``recover`` just listed can answer
    #: "no such branch" while the branch still exists (MariaDB: a session still attached to
    #: it); the branch must then be left for a later pass, never taken as finished
    nota_may_be_held: bool

    def take_identity(self, conn: Connection, node_id: str) -> bool:
        """Take the session-level identity lock of ``node_id`` on this resource without
        waiting; False if another session holds it."""

    def identity_holder(self, conn: Connection, node_id: str) -> int | None:
        """The session id (connection id, backend pid) of whoever holds the identity lock of
        ``node_id`` on this resource, or None if nobody does."""

    def identity_session(self, conn: Connection) -> tuple[str, int]:
        """Where this resource's identity locks live (a string naming the server, and the
        database where locks are per database) and ``conn``'s session id there: two
        resources with the same place share one identity lock."""

    def verify_finished(self, conn: Connection, txid: int | None) -> tuple[Finished, str]:
        """What became of a branch that is no longer prepared (``txid``: the server
        transaction id logged with the decision), and a text saying so."""

    def branch_locks(
        self, conn: Connection, branch: PreparedBranch
    ) -> tuple[int | None, tuple[str, ...]]:
        """How many locks a prepared branch holds and on which relations (None: unknown)."""
