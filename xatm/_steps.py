"""The I/O operations the commit protocol asks for, as plain values (sans-IO).

The protocol (``xatm._transaction.TransactionCore``) is written once, as generators that
*yield* these operations and *receive* their results, making every decision themselves. A
driver runs each operation and sends back what happened, never deciding anything: the
threaded :class:`~xatm.Transaction` runs them with blocking drivers (the branches' round
trips overlapped on one thread, ``xatm._parallel``), the asyncio
:class:`~xatm.aio.AsyncTransaction` awaits them (the branches concurrently, the log's fsync
on a worker thread). The psycopg 3 model: its two-phase logic is written once, as I/O-free
generators, driven by its sync and async connections.

Every result comes back as an :class:`~xatm._parallel.Outcome` (value or exception), so the
generator, not the driver, says what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._participant import Statement

if TYPE_CHECKING:
    from ._transaction import Branch

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
    """Phase 2 on each branch; result ``list[Outcome[PhaseTwo]]``. ``after_first`` is called
    (no I/O: a failpoint) once the first branch's answer is in."""

    branches: list[Branch]
    after_first: Callable[[], None]


@dataclass(slots=True)
class Rollback:
    """Roll one branch back (``prepared``: ROLLBACK PREPARED, else the active branch);
    result ``Outcome[object]``."""

    branch: Branch
    prepared: bool


Operation = Prepare | CommitOnePhase | LogCommit | LogEnd | CommitPrepared | Rollback

#: a protocol run: yields operations, receives their results, returns at the end
Steps = Generator[Operation, Any, T]
