"""Retrying a whole transaction: what is safe to retry, and how long to wait (``tm.run``).

A transaction may be run again only when its first run certainly committed nothing, and
only when running it again may well succeed. So :func:`retryable` says yes to an error
raised *before the decision* whose cause is transient:

* a deadlock, a serialization failure, a lock wait timeout or a cancelled statement
  (as the resources' participants classify their drivers' errors: ``Participant.classify``),
  raised by a statement in the block or by a branch's prepare (a
  :class:`~xatm.TransactionRolledBack` caused by one);
* a lost connection before the decision (the statement's driver error, or the
  ``TransactionRolledBack`` of a transaction that lost a branch's connection), a resource
  that cannot be reached (:class:`~xatm.ResourceUnavailable`, the node's identity lease not
  held there included);
* :class:`~xatm.TransactionTimeout` (rolled back: it took too long, as lock waits can make it).

Never retried: :class:`~xatm.TransactionInDoubt` (the outcome is not known: running it again
could apply it twice), anything else raised once the decision is made (the block does not
raise then), a ``TransactionRolledBack`` for any other reason (``set_rollback_only``, a
constraint violated at prepare, the log refused the decision, the manager was closed), any
other :class:`~xatm.TransactionError` (a misuse: a nested transaction, a transaction used
after its end), and every error of the application's own.

Waits: ``backoff`` seconds before the first retry, doubled each time up to ``max_backoff``,
each drawn between half and all of that (jitter: two transactions that deadlocked each other
do not retry in step).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from xatm.core.logfields import log_fields
from xatm.core.participant import ErrorKind
from xatm.core.text import first_line
from xatm.errors import (
    ConfigurationError,
    ResourceUnavailable,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
)

logger = logging.getLogger("xatm.transaction")


#: what one error is (``Context.classify``: as the resources' participants read it)
Classify = Callable[[BaseException], ErrorKind]


def _transient(exc: BaseException | None, classify: Classify) -> bool:
    """True if ``exc``, or an error in its cause chain, is worth running the transaction
    again for (see the module docstring)."""
    seen: set[int] = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ResourceUnavailable):
            return True
        if isinstance(e, OSError) and not isinstance(e, ConnectionError | TimeoutError):
            e = e.__cause__  # a file error is not a lost connection
            continue
        if classify(e).transient:
            return True
        e = e.__cause__
    return False


def retryable(exc: BaseException, classify: Classify) -> bool:
    """May a transaction that ended with ``exc`` be run again? (See the module docstring;
    ``classify`` says what one error is.)"""
    if not isinstance(exc, Exception) or isinstance(exc, TransactionInDoubt):
        return False
    if isinstance(exc, TransactionTimeout):
        return True
    if isinstance(exc, TransactionRolledBack):
        return _transient(exc.__cause__, classify)
    if isinstance(exc, TransactionError):
        return False
    return _transient(exc, classify)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and after how long, ``tm.run`` runs a transaction again."""

    retries: int
    backoff: float
    max_backoff: float
    classify: Classify

    @classmethod
    def of(
        cls, retries: object, backoff: object, max_backoff: object, classify: Classify
    ) -> RetryPolicy:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, got {retries!r}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}")
        assert isinstance(backoff, int | float) and isinstance(max_backoff, int | float)
        if max_backoff < backoff:
            raise ConfigurationError("max_backoff must be >= backoff")
        return cls(retries, float(backoff), float(max_backoff), classify)

    def delay(self, attempt: int, error: BaseException, gtrid: str | None = None) -> float | None:
        """Seconds to wait before running the transaction again after attempt number
        ``attempt`` (1 for the first) failed with ``error``; None: do not, raise ``error``."""
        if attempt > self.retries or not retryable(error, self.classify):
            return None
        full = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        wait = full * random.uniform(0.5, 1.0)
        text = first_line(str(error))
        logger.info(
            "transaction%s attempt %d failed (%s: %s); running it again in %.3f s",
            f" {gtrid}" if gtrid else "",
            attempt,
            type(error).__name__,
            text,
            wait,
            extra=log_fields(gtrid=gtrid),
        )
        return wait
