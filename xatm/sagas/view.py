"""A read-only view of the sagas in a log, for operators (``xatm sagas``, ``xatm saga show``).

Built from an :class:`~xatm.admin.Inspector` (so from a config file, without a manager and without
the saga definitions): it lists the sagas that are not over (running, compensating, stuck),
with their age, the step they are at and whether their owner is alive, and shows one saga with
its audit trail. Acting on a saga needs a manager that has its definition
(``tm.saga_action``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xatm.errors import ConfigurationError
from xatm.log.audit import AuditEntry
from xatm.sagas.runner import saga_history
from xatm.sagas.store import SagaRecord, SagaStore

if TYPE_CHECKING:
    from xatm.log.store import Store
    from xatm.ops.inspect import Inspector

_SAGA_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,30}\.[0-9a-f]{24}\.[0-9a-f]{8}")


def validate_saga_id(saga_id: object) -> str:
    """Return ``saga_id`` if it has a saga id's shape, else raise ConfigurationError."""
    if isinstance(saga_id, str) and _SAGA_ID_RE.fullmatch(saga_id):
        return saga_id
    shown = repr(saga_id)[:80]
    raise ConfigurationError(f"not a saga id: {shown} (expected <name>.<24 hex>.<8 hex>)")


@dataclass(frozen=True, slots=True)
class SagaInfo:
    """One saga as operators see it."""

    record: SagaRecord
    owner_alive: bool
    history: tuple[AuditEntry, ...] = ()

    @property
    def status(self) -> str:
        """``running``, ``compensating``, ``stuck`` or the final state."""
        return "stuck" if self.record.stuck and not self.record.final else self.record.state

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.record.created_at)

    def to_json(self) -> dict[str, Any]:
        r = self.record
        body: dict[str, Any] = {
            "saga_id": r.saga_id,
            "name": r.name,
            "status": self.status,
            "state": r.state,
            "key": r.key,
            "step": r.step,
            "node": r.node,
            "owner_alive": self.owner_alive,
            "age_s": round(self.age_s, 3),
            "done": list(r.done),
            "compensated": list(r.compensated),
            "to_compensate": list(r.to_compensate),
            "error": r.error,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
        }
        if self.history:
            body["history"] = [e.to_json() for e in self.history]
        return body


class SagaView:
    """Reads the saga records next to one coordinator log (file or shared)."""

    def __init__(self, store: Store, node_id: str) -> None:
        self._store = store
        self.store: SagaStore = store.saga_store(node_id)

    @classmethod
    def from_inspector(cls, inspector: Inspector, node_id: str) -> SagaView:
        return cls(inspector.store, node_id)

    def sagas(self, *, include_final: bool = False) -> list[SagaInfo]:
        """The sagas that are not over (every saga kept, with ``include_final``), oldest first."""
        records = sorted(
            self.store.records(include_final=include_final), key=lambda r: r.created_at
        )
        return [SagaInfo(r, False if r.final else self.store.owner_alive(r)) for r in records]

    def show(self, saga_id: str) -> SagaInfo | None:
        record = self.store.get(validate_saga_id(saga_id))
        if record is None:
            return None
        history = saga_history(self._store, saga_id, record)
        alive = False if record.final else self.store.owner_alive(record)
        return SagaInfo(record, alive, tuple(history))

    def close(self) -> None:
        self.store.close()
