"""The exceptions xatm raises: one small, documented hierarchy.

    XatmError
    ├── ConfigurationError          bad URL, bad node_id, bad config file (a user's mistake)
    ├── ResourceError               a participant could not be used
    │   ├── ResourceUnavailable     cannot connect (down, unreachable, bad credentials)
    │   └── ResourceNotFit          reachable, but not fit for two-phase commit
    ├── LogError                    the coordinator log cannot be opened or written
    │   ├── LogLocked               another live process owns that node's log
    │   └── LogCorrupt              a log file is damaged where no crash can have torn it
    ├── SagaError                   a saga could not be run or acted on
    │   └── SagaTakenOver           another process took the saga's record over
    └── TransactionError            the outcome of one global transaction
        ├── TransactionRolledBack   every branch was rolled back (a branch voted no, ...)
        │   └── TransactionTimeout  ... because the transaction outlived its timeout
        └── TransactionInDoubt      the outcome could not be settled here: recovery will
                                    settle it from the log (see docs/protocol.md)

An error raised by a database driver while the application's own SQL runs inside the block
(`tx.execute`) is *not* wrapped: the application sees the driver's own exception (for example
`psycopg.errors.UniqueViolation`), and the transaction is rolled back when the block exits.
Where xatm itself ends a transaction because of a driver error, that error is chained as
`__cause__`.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ConfigurationError",
    "IdentityNotHeld",
    "LogCorrupt",
    "LogError",
    "LogLocked",
    "ResourceError",
    "ResourceNotFit",
    "ResourceUnavailable",
    "SagaError",
    "SagaTakenOver",
    "TransactionError",
    "TransactionInDoubt",
    "TransactionRolledBack",
    "TransactionTimeout",
    "XatmError",
]


class XatmError(Exception):
    """Base class of every error raised by xatm itself."""


class ConfigurationError(XatmError, ValueError):
    """A setting is wrong: a malformed URL, node_id, resource name or config file."""


class ResourceError(XatmError):
    """A participant (resource) could not be used.

    ``resource`` names it; ``problems`` (a fail-fast start, ``fail_fast=True``) maps every
    resource that is not ready to why."""

    def __init__(
        self,
        message: str,
        *,
        resource: str | None = None,
        problems: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.resource = resource
        self.problems: dict[str, str] = dict(problems or {})


class ResourceUnavailable(ResourceError):
    """The resource could not be reached or refused the login."""


class IdentityNotHeld(ResourceUnavailable):
    """This manager does not hold its node's identity on the resource now: another live
    process with the same node_id holds it, or its identity session was lost or went silent
    (``xatm.node.identity``). Nothing is enlisted, prepared or decided there until it is held
    again."""


class ResourceNotFit(ResourceError):
    """The resource is reachable but cannot take part in two-phase commit.

    For example PostgreSQL with ``max_prepared_transactions = 0`` or a MariaDB older than
    10.5, which rolls prepared XA transactions back when their connection drops.
    """


class LogError(XatmError):
    """The coordinator log could not be opened, read or forced to disk."""


class LogLocked(LogError):
    """Another live process holds the log of this node_id."""


class LogCorrupt(LogError):
    """A segment of a file log is damaged somewhere a crash cannot have torn it.

    A crash can only tear the end of the newest segment. A bad frame anywhere else (in an
    older segment, or followed by good frames) may have held a COMMIT decision, so the log is
    not used: nothing is deleted or rewritten, and ``path`` and ``offset`` say where the
    damage starts. docs/operations.md says how an operator proceeds (``xatm log``,
    ``xatm log salvage``).
    """

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SagaError(XatmError):
    """A saga could not be run or acted on (unknown saga, a key still running, ...)."""


class SagaTakenOver(SagaError):
    """The saga's record was claimed by another process (an operator's forced action)."""


class SagaInDoubt(SagaError, LogError):
    """``run_saga`` could not write the saga's record (its store failed, or did not answer
    in time): whether the saga is recorded, and how far it went, is unknown here. A recorded
    saga is run to its end by recovery; ``.saga_id`` finds it (``tm.saga``)."""

    def __init__(self, message: str, saga_id: str) -> None:
        super().__init__(message)
        self.saga_id = saga_id


class TransactionError(XatmError):
    """The global transaction did not end as a plain commit."""

    def __init__(self, message: str, *, gtrid: str | None = None) -> None:
        super().__init__(message)
        self.gtrid = gtrid


class TransactionRolledBack(TransactionError):
    """Every branch was rolled back; nothing of the transaction is committed anywhere.

    Raised when a branch votes no at prepare (a serialization failure, a deadlock, a branch
    whose transaction had already failed, ...) or cannot be prepared at all. The database
    error that caused it, if any, is chained as ``__cause__``.
    """


class TransactionTimeout(TransactionRolledBack):
    """The transaction took longer than its timeout and was rolled back."""


class TransactionInDoubt(TransactionError):
    """The outcome is not known here, and will be settled by recovery (or was settled
    without this process being able to tell).

    Raised when the connection carrying the deciding step was lost midway, so whether it
    took effect cannot be known by the coordinator:

    * forcing the COMMIT decision to the log failed midway (every branch stays prepared and
      recovery resolves all of them by what the log holds);
    * the one-phase commit of the transaction's only branch failed midway (connection lost,
      call interrupted);
    * the commit of the only branch that wrote anything (the others were read-only) failed
      midway or found the branch gone: with no decision logged, its own outcome is the
      transaction's;
    * the commit-marker branch's commit (which is the decision) failed midway
      (recovery settles the other branches by whether the decision row is there).

    In every case the branches end all the same way: never some committed, some not.
    """
