"""Saga definitions: the steps, their compensations, and what a run of a saga returns.

A saga is a sequence of steps; each step is a local (one resource) or global (several
resources, one XA transaction) xatm transaction with an optional compensating transaction::

    transfer = Saga("transfer")
    transfer.step("debit", action=debit, compensation=refund, resources=["ledger"])
    transfer.step("credit", action=credit, compensation=uncredit, resources=["wallet"])

    tm = TransactionManager(..., sagas=[transfer])
    result = tm.run_saga("transfer", data={"amt": 5}, key="req-42")

An action or compensation is called as ``fn(tx, data)``: ``tx`` is the step's
:class:`~xatm.SagaTransaction` (a ``Transaction`` whose ``idempotency_key``, a ``str``, is
stable for that saga, step and op),
``data`` a copy of the saga's JSON payload. An action raising :class:`SagaAbort` ends the
saga: what was done is compensated in reverse. How a saga runs is in ``xatm.sagas.runner``;
docs/sagas.md has the whole design.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from xatm.core.xid import validate_resource_name
from xatm.errors import ConfigurationError
from xatm.errors import SagaError as SagaError  # defined low, so the saga storage can raise it
from xatm.errors import SagaTakenOver as SagaTakenOver
from xatm.log.saga_record import FINAL_STATES as FINAL_STATES

if TYPE_CHECKING:
    from xatm.transactions.transaction import SagaTransaction

#: a step's action or compensation: ``fn(tx, data)``
StepFunction: TypeAlias = "Callable[[SagaTransaction, Any], object]"

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,30}")
_STEP_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: the states a saga's record can be in; the last three are final (``FINAL_STATES``, kept
#: with the saga records' storage, ``xatm.log.saga_state``)
STATES = ("running", "compensating", "completed", "compensated", "failed")
MAX_KEY = 200


class SagaAbort(Exception):
    """Raised by a step's action to end the saga: the completed steps are compensated."""


class SagaInProgress(SagaError):
    """``run_saga`` with a key whose first run is still going on in a live process."""

    def __init__(self, message: str, saga_id: str) -> None:
        super().__init__(message)
        self.saga_id = saga_id


def validate_saga_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"a saga name must be 1 to 30 characters of letters, digits, '_' and '-'; got {name!r}"
        )
    return name


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a saga."""

    name: str
    action: StepFunction
    compensation: StepFunction | None
    resources: tuple[str, ...]
    max_attempts: int


class Saga:
    """The definition of a saga: a name and its steps, in order.

    :param max_attempts: how often a step's action is tried when it fails with a transient
        error (lost connection, deadlock, serialization failure, lock timeout) before the
        saga gives up and compensates (per step: ``step(..., max_attempts=)``).
    :param compensation_attempts: how often a compensation is tried in the run itself before
        the saga is left *stuck* for recovery (which keeps retrying) and an operator.
    :param backoff: seconds before the first retry; doubled each time, up to ``max_backoff``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_attempts: int = 5,
        compensation_attempts: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.name = validate_saga_name(name)
        self.max_attempts = _positive_int(max_attempts, "max_attempts")
        self.compensation_attempts = _positive_int(compensation_attempts, "compensation_attempts")
        if not backoff >= 0 or not max_backoff >= backoff:
            raise ConfigurationError("backoff must be >= 0 and max_backoff >= backoff")
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.steps: list[Step] = []

    def step(
        self,
        name: str,
        action: StepFunction,
        compensation: StepFunction | None = None,
        resources: Iterable[str] = (),
        *,
        max_attempts: int | None = None,
    ) -> Saga:
        """Add a step (returns the saga, so calls may be chained).

        ``resources``: every resource the step writes to (the barrier table lives in each);
        a step with several runs as one XA transaction across them."""
        if not isinstance(name, str) or not _STEP_RE.fullmatch(name):
            raise ConfigurationError(
                f"saga {self.name!r}: a step name must be 1 to 40 characters of letters,"
                f" digits, '_' and '-'; got {name!r}"
            )
        if any(s.name == name for s in self.steps):
            raise ConfigurationError(f"saga {self.name!r}: two steps are named {name!r}")
        if not callable(action) or (compensation is not None and not callable(compensation)):
            raise ConfigurationError(
                f"saga {self.name!r}, step {name!r}: action and compensation must be callables"
            )
        if isinstance(resources, str):
            resources = [resources]
        names = tuple(dict.fromkeys(validate_resource_name(r) for r in resources))
        if not names:
            raise ConfigurationError(
                f"saga {self.name!r}, step {name!r}: name the resources it writes to"
            )
        attempts = self.max_attempts if max_attempts is None else max_attempts
        self.steps.append(
            Step(name, action, compensation, names, _positive_int(attempts, "max_attempts"))
        )
        return self

    def step_named(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def check_resources(self, known: Iterable[str]) -> None:
        """ConfigurationError if a step names a resource the manager does not have."""
        if not self.steps:
            raise ConfigurationError(f"saga {self.name!r} has no steps")
        have = set(known)
        for s in self.steps:
            missing = [r for r in s.resources if r not in have]
            if missing:
                raise ConfigurationError(
                    f"saga {self.name!r}, step {s.name!r}: unknown resource(s) {', '.join(missing)}"
                )

    def __repr__(self) -> str:
        return f"<Saga {self.name!r} steps={[s.name for s in self.steps]}>"


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SagaResult:
    """What a run of a saga came to (also what ``tm.saga(saga_id)`` reports).

    ``state``: ``completed`` (every step done), ``compensated`` (it ended early and every
    step done was undone; ``compensated`` lists the steps undone, in order, including those
    that had nothing to undo), ``failed`` (a compensation could not succeed: the saga is left
    for recovery and an operator, see ``xatm sagas``), or, when read while it runs,
    ``running`` / ``compensating``."""

    saga_id: str
    name: str
    state: str
    key: str | None = None
    done: tuple[str, ...] = ()
    compensated: tuple[str, ...] = ()
    error: str = ""
    stuck: bool = False
    data: Any = field(default=None, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "name": self.name,
            "state": self.state,
            "key": self.key,
            "done": list(self.done),
            "compensated": list(self.compensated),
            "error": self.error,
            "stuck": self.stuck,
        }


def registry(sagas: Iterable[Saga | str] | Mapping[str, Saga]) -> dict[str, Saga]:
    """Saga definitions by name, from Saga objects or ``"module:attribute"`` references."""
    values = sagas.values() if isinstance(sagas, Mapping) else sagas
    out: dict[str, Saga] = {}
    for item in values:
        saga = load_saga(item) if isinstance(item, str) else item
        if not isinstance(saga, Saga):
            raise ConfigurationError(f"sagas: {item!r} is not a Saga")
        if saga.name in out and out[saga.name] is not saga:
            raise ConfigurationError(f"sagas: two sagas are named {saga.name!r}")
        out[saga.name] = saga
    return out


def load_sagas(refs: Iterable[Saga | str]) -> list[Saga]:
    """Saga definitions from Saga objects or ``"module:attribute"`` references (imported);
    ConfigurationError naming the first that cannot be loaded."""
    return list(registry(refs).values())


def load_saga(ref: str) -> Saga:
    """Import ``"package.module:attribute"`` (the TOML ``sagas = [...]`` entries)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"sagas: {ref!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(f"sagas: cannot import {module_name!r}: {e}") from None
    saga = getattr(module, attr, None)
    if not isinstance(saga, Saga):
        raise ConfigurationError(f"sagas: {ref!r} is not a Saga (got {type(saga).__name__})")
    return saga
