"""The I/O operations the commit protocol asks for, as plain values (sans-IO).

The protocol (``xatm.transactions.protocol.TransactionCore``) is written once, as generators that
*yield* these operations and *receive* their results, making every decision themselves. A
driver runs each operation and sends back what happened, never deciding anything: the
threaded :class:`~xatm.Transaction` runs them with blocking drivers (the branches' round
trips overlapped on one thread, ``xatm.core.parallel``), the asyncio
:class:`~xatm.aio.AsyncTransaction` awaits them (the branches concurrently, the log's fsync
on a worker thread). The psycopg 3 model: its two-phase logic is written once, as I/O-free
generators, driven by its sync and async connections.

Every result comes back as an :class:`~xatm.core.parallel.Outcome` (value or exception), so the
generator, not the driver, says what a failure means. Two operations are no I/O but belong
to the process, not to the protocol: the decision fence (:class:`PassFence`, run under the
transaction's lock) and the failpoints (:class:`Failpoint`).
"""

from __future__ import annotations

import enum
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from xatm.core.deadline import Watch, disarm
from xatm.core.participant import Connection, Participant, Statement
from xatm.core.xid import Xid


class BranchState(enum.Enum):
    """Where one branch is."""

    ACTIVE = "active"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    UNKNOWN = "unknown"  # a call failed midway: recovery will settle it


class BranchPool(Protocol):
    """Where a branch's connection goes back: a :class:`~xatm.participants.pool.Pool`, or an asyncio
    pool (``xatm.participants.aio_pool``)."""

    def put(self, conn: Connection) -> None: ...

    def discard(self, conn: Connection) -> None: ...


@dataclass(eq=False)
class Branch:
    """The part of a global transaction that runs on one resource."""

    resource: str
    xid: Xid
    participant: Participant
    pool: BranchPool
    conn: Connection | None
    state: BranchState = BranchState.ACTIVE
    error: BaseException | None = field(default=None, repr=False)
    txid: int | None = None  # the server's transaction id of the prepared branch, if known
    #: the connection's deadline (``xatm.core.deadline``), from enlistment until it is given back
    watch: Watch | None = field(default=None, repr=False)

    #: the application was given the connection itself (``tx.connection()``, a SQLAlchemy
    #: session): xatm cannot tell when it is in a call, so it always counts as in one
    handed_out: bool = field(default=False, repr=False)

    @property
    def cut(self) -> bool:
        """The connection was cut: its server did not answer within the deadline."""
        return self.watch is not None and self.watch.fired

    def hand_out(self) -> Connection:
        """The connection, for the application to use directly (see ``handed_out``)."""
        if not self.handed_out:
            self.handed_out = True
            if self.watch is not None:
                self.watch.busy += 1
        return self.conn

    def release(self) -> None:
        """Give the connection back to the pool (or close it if it is not clean)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.watch is not None:
                disarm(self.watch)
            if self.error is not None or self.cut:
                self.pool.discard(conn)
            else:
                self.pool.put(conn)

    def drop(self) -> None:
        """Close the connection: its state is unknown, or another session must finish."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.watch is not None:
                disarm(self.watch)
            self.pool.discard(conn)


T = TypeVar("T")


@dataclass(slots=True)
class Prepare:
    """Phase 1 on each branch; result: ``list[Outcome[Prepared]]`` in the same order."""

    branches: list[Branch]


@dataclass(slots=True)
class CommitOnePhase:
    """Commit an unprepared branch, running ``before`` in it first; result ``Outcome[None]``."""

    branch: Branch
    before: Sequence[Statement] = ()


@dataclass(slots=True)
class LogCommit:
    """Force the COMMIT decision to the coordinator log; result ``Outcome[None]``."""

    gtrid: str
    resources: list[str]
    txids: dict[str, int]


@dataclass(slots=True)
class LogEnd:
    """Append the END record (not forced); result ``Outcome[None]``."""

    gtrid: str


@dataclass(slots=True)
class CommitPrepared:
    """Phase 2 on each branch; result ``list[Outcome[PhaseTwo]]``. The driver hits the
    failpoint ``after_first_commit`` once the first branch's answer is in."""

    branches: list[Branch]


@dataclass(slots=True)
class Rollback:
    """Roll one branch back (``prepared``: ROLLBACK PREPARED, else the active branch);
    result ``Outcome[object]``."""

    branch: Branch
    prepared: bool


@dataclass(slots=True)
class AwaitWork:
    """Wait until no statement or enlistment of the transaction runs any more in another
    task or thread (new ones are refused already); result ``None``."""


@dataclass(slots=True)
class PassFence:
    """The fence with recovery just before the decision: the driver holds the transaction's
    fence lock while it asks the protocol (``TransactionCore.try_decide(refuse)``), so that
    recovery's ``abort_if_expired`` and the decision never interleave. ``refuse``: a reason
    to refuse anyway (the node's identity lease is not held). Result: None if passed (the
    decision is being made), else why it is refused."""

    refuse: str | None


@dataclass(slots=True)
class Failpoint:
    """The protocol reached the failpoint ``name`` (``xatm.core.failpoint``): the driver
    crashes or pauses the process there if it is the active one; result ``None``."""

    name: str


Operation = (
    Prepare
    | CommitOnePhase
    | LogCommit
    | LogEnd
    | CommitPrepared
    | Rollback
    | AwaitWork
    | PassFence
    | Failpoint
)

#: a protocol run: yields operations, receives their results, returns at the end
Steps = Generator[Operation, Any, T]
