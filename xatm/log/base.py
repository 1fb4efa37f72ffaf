"""The coordinator log's interface, as the transaction and recovery code use it.

The protocol needs very little from a log (presumed abort):

1. ``log_commit`` forces the COMMIT decision of one gtrid to stable storage and returns only
   once it is durable. Nothing else is ever forced.
2. ``log_end`` notes that every branch of a committed gtrid is finished (lazily).
3. ``pending`` lists the gtrids decided COMMIT whose END is not yet recorded; recovery
   commits their branches. A gtrid that is not pending has no COMMIT decision (or is over),
   so its prepared branches are rolled back once their coordinator is known to be dead.

Logs of other coordinators (peers) are opened only when their owner is provably dead, and are
then resolved like the local log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from xatm.core.decide import Coordinator
from xatm.core.records import LogRecord
from xatm.errors import LogError

#: Whose a transaction is, seen from here: the coordinator of its node_id is this process,
#: another live process, dead, or unknown (no log of it here); the decision rule's
#: ``Coordinator``
OwnerState = Coordinator

#: Told by a batched log (``xatm.log.file.FileLog.append_commit``, used by
#: ``xatm.log.aio``) that the flush writing records appended without a waiting thread is
#: over: ``(their waiters, in append order; None if they are durable, else the LogError that
#: leaves them in doubt)``. Called on the thread that ran the flush, without the log's lock:
#: it must return quickly and must not wait for the log.
DurabilityCallback = Callable[[list[Any], LogError | None], None]


class DecisionNotLogged(LogError):
    """The COMMIT record was certainly not written (the log refused it before writing).

    Any other LogError from ``log_commit`` leaves it unknown whether the record is durable.
    """


class CoordinatorLog(Protocol):
    """The durable decision log of one coordinator (one node_id)."""

    @property
    def node_id(self) -> str: ...

    def log_commit(
        self,
        gtrid: str,
        branches: Sequence[str],
        txids: Mapping[str, int] | None = None,
        deadline: float | None = None,
    ) -> None:
        """Force a COMMIT decision for ``gtrid`` to disk; return once it is durable.
        ``deadline`` (``time.monotonic()``): the transaction's; a log on a server does not
        wait for it longer than a phase-2 call would (the outcome is then unknown)."""

    def log_end(self, gtrid: str) -> None:
        """Record (lazily) that every branch of ``gtrid`` is committed."""

    def log_overrule(self, gtrid: str, by: str) -> None:
        """Replace the COMMIT decision of ``gtrid`` with ABORT, durably (an operator rolls
        it back by hand: a heuristic outcome): it is no longer pending, nor retained."""

    def pending(self) -> Mapping[str, LogRecord]:
        """A snapshot of COMMIT records with no END yet, by gtrid."""

    def flush(self) -> None:
        """Write out lazily appended records."""

    def close(self) -> None:
        """Flush, release the log's lock and close its files."""
