"""Running sagas: the state machine, retries, keys, recovery and operators' actions.

::

    run_saga(name, data, key)
      │ the key is taken: return that run's result (or wait for it, or finish it if its
      │ owner died)
      ▼ record created, forced (the key's claim)                        state running
    for each step, in order:
      │ one xatm transaction on the step's resources: barrier rows, then the action
      │ ├ committed (or the barrier says it committed before) ─ note the step done (lazy;
      │ │ the last step's note is the end's write)
      │ ├ transient error ─ retry with backoff, up to the step's max_attempts
      │ └ SagaAbort, another error, attempts used up, or the barrier says its compensation
      │   came first ─ switch to compensating (forced)              state compensating
      ▼ every step done                                         state completed (not forced)
    compensating: the compensation of each step tried (done ones and the failed one), in
      │ reverse, each in its own transaction behind its barrier; retried with backoff
      │ └ still failing after compensation_attempts: left *stuck* (forced; the result says
      │   "failed"); recovery passes retry it every STUCK_RETRY seconds, operators see it
      ▼ every compensation done                               state compensated (not forced)

Recovery (``recover``, from ``tm.recover()``, the sweeper and ``xatm sweep``) finishes every
saga whose owner is dead and whose definition this manager has: forward if it was running,
backward if it was compensating. Owners' liveness is the saga store's (``xatm.sagas.store``);
sagas running in this process are never touched. Every transition goes to the audit trail,
with the saga id in place of a gtrid.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from xatm.core import failpoint as _failpoint
from xatm.core.decide import SKEW
from xatm.core.participant import ErrorKind
from xatm.core.urls import describe_error
from xatm.errors import (
    ConfigurationError,
    LogError,
    ResourceUnavailable,
    SagaInDoubt,
    TransactionInDoubt,
    TransactionRolledBack,
    XatmError,
)
from xatm.log.audit import AuditEntry
from xatm.sagas import barrier as _barrier
from xatm.sagas.definition import (
    MAX_KEY,
    Saga,
    SagaAbort,
    SagaError,
    SagaInProgress,
    SagaResult,
    Step,
    StepFunction,
)
from xatm.sagas.store import Claim, SagaRecord, SagaStore, name_of

if TYPE_CHECKING:
    from xatm.core.urls import ResourceSpec
    from xatm.log.store import Store
    from xatm.node.context import Context
    from xatm.transactions.transaction import SagaTransaction


class SagaHost(Protocol):
    """What the runner needs of its TransactionManager (its public API)."""

    node_id: str

    @property
    def context(self) -> Context:
        """What the manager's pieces share; the runner keeps its records in its ``store``."""
        ...

    @property
    def resource_names(self) -> Iterable[str]: ...

    @property
    def resources(self) -> Mapping[str, ResourceSpec]: ...

    @property
    def closed(self) -> bool: ...

    def _saga_transaction(self, idempotency_key: str) -> SagaTransaction: ...

    def recover(self, *, dry_run: bool = False, actor: str | None = None) -> Any: ...


logger = logging.getLogger("xatm.saga")

#: seconds between recovery's retries of a stuck saga's compensation
STUCK_RETRY = 60.0
#: finished sagas (and so their keys) are kept this long
DEFAULT_RETENTION = 7 * 86400.0
PRUNE_EVERY = 60.0
#: how long before a failover of the store's database a saga's barrier rows are read for
#: sagas whose record it lost (a standby that lagged longer loses sagas not listed)
LOST_WINDOW = 900.0
#: routine events kept in a saga's record (the audit trail has the rest)
MAX_HISTORY = 64
#: finished sagas leave the file store's active directory this long after their end
RETIRE_AFTER = 60.0


class SagaRefused(SagaError):
    """An operator's action on a saga was refused (owner alive, wrong state)."""


@dataclass(frozen=True, slots=True)
class SagaRecoveryReport:
    """What one saga recovery pass did: (saga_id, state reached) and (saga_id, why left)."""

    finished: tuple[tuple[str, str], ...] = ()
    left: tuple[tuple[str, str], ...] = ()
    #: (saga_id, what its barrier rows show) of sagas whose record the store lost
    lost: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "finished": [{"saga_id": s, "state": st} for s, st in self.finished],
            "left": [{"saga_id": s, "why": w} for s, w in self.left],
            "lost": [{"saga_id": s, "ran": r} for s, r in self.lost],
        }


def result_of(record: SagaRecord) -> SagaResult:
    state = "failed" if record.stuck and record.state == "compensating" else record.state
    return SagaResult(
        record.saga_id,
        record.name,
        state,
        record.key,
        record.done,
        record.compensated,
        record.error,
        record.stuck,
        record.data,
    )


def is_transient(exc: BaseException, classify: Callable[[BaseException], ErrorKind]) -> bool:
    """Worth retrying: a lost connection, deadlock, serialization failure, lock timeout,
    an unreachable resource, or an outcome in doubt (the barrier makes a retry safe);
    ``classify`` says what one database error is (the resources' participants)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TransactionInDoubt | ResourceUnavailable):
            return True
        if classify(e).transient:
            return True
        if isinstance(e, TransactionRolledBack) and e.__cause__ is None:
            return True  # rollback-only after a lost connection, a timeout, a fenced decision
        e = e.__cause__
    return False


def saga_history(store: Store, saga_id: str, record: SagaRecord | None) -> list[AuditEntry]:
    """One saga's history, oldest first: the routine events kept in its record and its
    entries in the audit trail (the file log's or the shared log's, as ``store`` reads it)."""
    entries = store.view().audit(saga_id)
    if record is not None:
        entries += [
            AuditEntry(at, saga_id, "", step, action, reason, outcome, actor, record.node)
            for at, step, action, outcome, actor, reason in record.history
        ]
    entries.sort(key=lambda e: e.at)
    return entries


def _describe(exc: BaseException) -> str:
    text = describe_error(exc) if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


#: a stuck saga's error: why it compensates, then this, then why a compensation fails
_STUCK = " | stuck: "


def _stuck(error: str, failure: str) -> str:
    """The error of a saga left stuck: why it compensates, and why it is stuck."""
    return f"{_reason(error)}{_STUCK}{failure}"


def _reason(error: str) -> str:
    """Why a saga compensates, without why a compensation was stuck (once it is done)."""
    return error.partition(_STUCK)[0]


@dataclass
class _Outcome:
    ok: bool
    barrier: str = ""  # run | duplicate | hanging | empty
    error: str = ""


@dataclass
class _Claimed:
    claim: Claim
    record: SagaRecord
    actor: str
    saga: Saga
    routine: bool = False  # the run that started it (not recovery, not an operator)
    payload: str | None = None  # the record's data as JSON text, once encoded

    def data(self) -> Any:
        """A fresh copy of the saga's payload for a step (decoding its JSON text is
        cheaper than ``copy.deepcopy``, and the payload is JSON)."""
        if self.payload is None:
            self.payload = json.dumps(self.record.data)
        return json.loads(self.payload)


class SagaRunner:
    """The sagas of one TransactionManager: runs them, recovers them, acts on them."""

    def __init__(
        self,
        manager: SagaHost,
        sagas: dict[str, Saga],
        classify: Callable[[BaseException], ErrorKind],
        *,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        self._tm = manager
        self._classify = classify
        self.sagas = sagas
        for saga in sagas.values():
            saga.check_resources(manager.resource_names)
        self.node_id = manager.node_id
        self.store: SagaStore = manager.context.store.saga_store(manager.node_id)
        self._audit = manager.context.store.audit_trail(manager.node_id)
        self.retention = retention
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._tables: set[str] = set()
        #: (resource, kind) of each step's resources, once their barrier tables exist
        self._kinds: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        self._stuck_next: dict[str, float] = {}
        #: the store's failovers looked at for lost sagas (``_lost``)
        self._checked: set[float] = set()
        self._last_prune = -PRUNE_EVERY
        self._sleep: Callable[[float], None] = time.sleep
        #: what the last recovery pass did (``xatm recover`` prints it)
        self.last_report: SagaRecoveryReport | None = None

    # -- running ----------------------------------------------------------------------------
    def run(self, name: str, data: Any, key: str | None, *, wait: float, actor: str) -> SagaResult:
        saga = self.sagas.get(name)
        if saga is None:
            known = ", ".join(sorted(self.sagas)) or "none"
            raise ConfigurationError(f"unknown saga {name!r} (registered: {known})")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise ConfigurationError(f"a saga key must be a string of 1 to {MAX_KEY} characters")
        try:
            text = json.dumps(data)
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"saga {name!r}: data must be JSON: {e}") from None
        payload = json.loads(text)
        record = SagaRecord(
            self.store.new_id(name, key),
            name,
            key,
            self.node_id,
            "running",
            payload,
            step=saga.steps[0].name,
            history=(
                (time.time(), "", "saga-start", "running", actor, f"key {key!r}" if key else ""),
            ),
        )
        try:
            return self._start(saga, record, text, wait, actor)
        except SagaError:
            raise
        except LogError as e:
            raise SagaInDoubt(
                f"saga {record.saga_id}: its store failed ({e}): whether the saga is recorded,"
                " and how far it went, is unknown here. Do not run it again without its key:"
                " recovery (the sweeper, or recover_sagas) runs a recorded saga to its end,"
                " tm.saga(saga_id) tells its state, and run_saga with the same key returns"
                " its result",
                record.saga_id,
            ) from None

    def _start(
        self, saga: Saga, record: SagaRecord, text: str, wait: float, actor: str
    ) -> SagaResult:
        """Record the new saga and drive it (or, its key used before, the first run's)."""
        with self._lock:
            self._running.add(record.saga_id)
        try:
            claim = self.store.create(record)
        except BaseException:
            claim = None
            raise
        finally:
            if claim is None:
                with self._lock:
                    self._running.discard(record.saga_id)
        if claim is None:
            assert record.key is not None
            return self._existing(saga, record.key, wait, actor)
        return self._drive(_Claimed(claim, record, actor, saga, routine=True, payload=text))

    def _existing(self, saga: Saga, key: str, wait: float, actor: str) -> SagaResult:
        """The key was used before: its result, once it has one (see docs/sagas.md)."""
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            record = self.store.find_key(saga.name, key)
            if record is None:  # pruned in between: rare; look again
                if time.monotonic() >= deadline:
                    raise SagaError(f"saga {saga.name!r}: the record of key {key!r} is gone")
                time.sleep(delay)
                continue
            if record.final or record.stuck:
                return result_of(record)
            if not self._is_running_here(record.saga_id):
                claimed = self._claim(record.saga_id, actor)
                if claimed is not None:  # its owner died: finish it here
                    if claimed.record.final:
                        self.store.release(claimed.claim)
                        return result_of(claimed.record)
                    return self._drive(claimed)
            if time.monotonic() >= deadline:
                raise SagaInProgress(
                    f"saga {record.saga_id} (key {key!r}) is still being run by node"
                    f" {record.node}; ask again later",
                    record.saga_id,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _is_running_here(self, saga_id: str) -> bool:
        with self._lock:
            return saga_id in self._running

    def _claim(self, saga_id: str, actor: str, *, force: bool = False) -> _Claimed | None:
        """Take a saga whose owner is dead (not one running in this process)."""
        with self._lock:
            if saga_id in self._running:
                return None
            self._running.add(saga_id)  # reserved while it is claimed
        try:
            before = self.store.get(saga_id)
            claim = self.store.claim(saga_id, force=force)
            if claim is None:
                with self._lock:
                    self._running.discard(saga_id)
                return None
            record = self.store.read(claim)
        except BaseException:
            with self._lock:
                self._running.discard(saga_id)
            raise
        if record is None or record.name not in self.sagas:
            self.store.release(claim)
            with self._lock:
                self._running.discard(saga_id)
            return None
        owner = before.node if before is not None else record.node
        if owner != self.node_id and not record.final:
            self._audit.record(
                saga_id,
                "",
                record.step,
                "saga-takeover",
                f"taken from {owner} by force" if force else f"owner {owner} is dead",
                "claimed",
                actor,
            )
            record = record.with_(node=self.node_id)
        return _Claimed(claim, record, actor, self.sagas[record.name])

    def _drive(self, c: _Claimed) -> SagaResult:
        with self._lock:
            self._running.add(c.record.saga_id)
        try:
            while not c.record.final:
                if c.record.state == "running":
                    self._forward(c)
                elif not self._backward(c):
                    break  # stuck
            return result_of(c.record)
        finally:
            self.store.release(c.claim)
            with self._lock:
                self._running.discard(c.record.saga_id)

    def _event(
        self,
        c: _Claimed,
        resource: str,
        step: str,
        action: str,
        reason: str,
        outcome: str,
        *,
        routine: bool = False,
    ) -> None:
        """Note what happened: a routine event of the run that started the saga goes into
        its record (written with its next save); anything else to the audit trail."""
        if routine and c.routine:
            entry = (time.time(), step, action, outcome, c.actor, reason)
            c.record = c.record.with_(history=(*c.record.history, entry)[-MAX_HISTORY:])
        else:
            self._audit.record(c.record.saga_id, resource, step, action, reason, outcome, c.actor)

    def _save(self, c: _Claimed, *, force: bool, **changes: Any) -> None:
        c.record = c.record.with_(**changes)
        self.store.save(c.claim, c.record, force=force)

    def _forward(self, c: _Claimed) -> None:
        saga, rec = c.saga, c.record
        pending = [s for s in saga.steps if s.name not in rec.done]
        if not pending:
            self._event(c, "", "", "saga-end", "every step done", "completed", routine=True)
            self._save(c, force=False, state="completed", step="")
            return
        step = pending[0]
        if rec.step != step.name:
            c.record = c.record.with_(step=step.name)
        out = self._attempt(c, step, "action")
        if out.ok and out.barrier in ("run", "duplicate"):
            _failpoint.hit("saga_after_step")
            done = (*c.record.done, step.name)
            if len(pending) > 1:
                self._save(c, force=False, done=done, step=pending[1].name)
                return
            # the last step: its note and the end are one write (neither is forced: lost,
            # recovery runs the step again, its barrier skips it, and the saga completes)
            self._event(c, "", "", "saga-end", "every step done", "completed", routine=True)
            self._save(c, force=False, done=done, state="completed", step="")
            return
        reason = out.error or f"step {step.name!r} was compensated before its action ran"
        attempted = [*c.record.done, step.name]
        self._save(
            c,
            force=True,
            state="compensating",
            error=reason,
            to_compensate=tuple(reversed(attempted)),
            step=step.name,
        )
        self._audit.record(
            rec.saga_id,
            ",".join(step.resources),
            step.name,
            "saga-abort",
            reason,
            "compensating",
            c.actor,
        )

    def _backward(self, c: _Claimed) -> bool:
        """Compensate what is left; False if a compensation keeps failing (stuck)."""
        saga = c.saga
        for name in c.record.to_compensate:
            if name in c.record.compensated:
                continue
            step = saga.step_named(name)
            if step is None or step.compensation is None:
                self._save(c, force=False, compensated=(*c.record.compensated, name))
                continue
            c.record = c.record.with_(step=name)
            out = self._attempt(c, step, "compensation")
            if not out.ok:
                self._save(c, force=True, stuck=True, error=_stuck(c.record.error, out.error))
                self._audit.record(
                    c.record.saga_id,
                    ",".join(step.resources),
                    name,
                    "saga-stuck",
                    out.error,
                    "left for recovery and an operator",
                    c.actor,
                )
                logger.error(
                    "saga %s: the compensation of step %r keeps failing (%s); it is left"
                    " stuck for recovery and an operator (xatm sagas)",
                    c.record.saga_id,
                    name,
                    out.error,
                )
                return False
            _failpoint.hit("saga_after_compensation")
            done = (*c.record.compensated, name)
            following = next((s for s in c.record.to_compensate if s not in done), "")
            self._save(c, force=False, compensated=done, stuck=False, step=following)
        reason = _reason(c.record.error)  # why it compensated, not a stuck step's error
        self._event(c, "", "", "saga-end", reason, "compensated", routine=True)
        self._save(c, force=False, state="compensated", step="", stuck=False, error=reason)
        return True

    def _attempt(self, c: _Claimed, step: Step, op: str) -> _Outcome:
        """Run one step's action or compensation, retrying transient errors."""
        saga, saga_id = c.saga, c.record.saga_id
        compensating = op == "compensation"
        limit = saga.compensation_attempts if compensating else step.max_attempts
        fn = step.compensation if compensating else step.action
        assert fn is not None
        where = ",".join(step.resources)
        attempt = 0
        while True:
            attempt += 1
            try:
                barrier = self._transaction(c, step, op, fn)
            except SagaAbort as e:
                if not compensating:
                    self._audit.record(
                        saga_id, where, step.name, "saga-action", str(e), "aborted", c.actor
                    )
                    return _Outcome(False, error=f"step {step.name!r} aborted: {e}")
                error: BaseException = e
            except (XatmError, Exception) as e:
                if isinstance(e, SagaError) and not isinstance(e, _barrier.SagaBarrierError):
                    raise  # the store failed or the saga was taken over
                if self._tm.closed:
                    # not the step's failure: the saga stays as it is, for recovery
                    raise SagaError(
                        f"saga {saga_id}: the transaction manager was closed during step"
                        f" {step.name!r}; the saga is left as it is, for recovery to finish"
                    ) from e
                error = e
            else:
                self._event(
                    c, where, step.name, f"saga-{op}", _NOTE[barrier], "committed", routine=True
                )
                return _Outcome(True, barrier)
            text = _describe(error)
            if isinstance(error, TransactionInDoubt):
                self._recover_after_doubt(c.actor)
            retry = attempt < limit and (compensating or is_transient(error, self._classify))
            self._audit.record(
                saga_id,
                where,
                step.name,
                f"saga-{op}",
                text,
                f"attempt {attempt} failed" + ("; retrying" if retry else ""),
                c.actor,
            )
            if not retry:
                return _Outcome(False, error=f"{op} of step {step.name!r} failed: {text}")
            self._sleep(min(saga.max_backoff, saga.backoff * 2 ** (attempt - 1)))

    def _recover_after_doubt(self, actor: str) -> None:
        """A step's transaction ended in doubt: its branches may hold the barrier rows'
        locks until recovery settles them, so run a recovery pass before trying again."""
        try:
            self._tm.recover(actor=actor)
        except XatmError as e:
            logger.warning("sagas: the recovery pass after an in-doubt step failed: %s", e)

    def _transaction(self, c: _Claimed, step: Step, op: str, fn: StepFunction) -> str:
        """One transaction of the step: barrier rows, then (if they say so) ``fn``."""
        kinds = self._kinds.get(step.resources)
        if kinds is None:
            self._ensure_tables(step.resources)
            specs = self._tm.resources
            kinds = [(r, _barrier.kind_of(specs[r])) for r in step.resources]
            self._kinds[step.resources] = kinds
        saga_id = c.record.saga_id
        with self._tm._saga_transaction(f"{saga_id}.{step.name}.{op}") as tx:
            if op == "action":
                barrier = _barrier.enter_action(tx, kinds, saga_id, step.name)
            else:
                barrier = _barrier.enter_compensation(tx, kinds, saga_id, step.name)
            _failpoint.hit("saga_after_barrier")
            if barrier == "run":
                fn(tx, c.data())
                extra = set(tx.branches) - set(step.resources)
                if extra:
                    raise ConfigurationError(
                        f"saga {c.saga.name!r}, step {step.name!r} wrote to"
                        f" {', '.join(sorted(extra))}, which it does not name in resources="
                    )
        return barrier

    def _ensure_tables(self, resources: tuple[str, ...]) -> None:
        for name in resources:
            if name not in self._tables:
                _barrier.ensure_table(name, self._tm.resources[name])
                self._tables.add(name)

    # -- recovery ---------------------------------------------------------------------------
    def recover(self, actor: str) -> SagaRecoveryReport:
        """Finish every saga that has a dead owner (see the module docstring). A manager
        with no saga definitions does not look (it could not finish any)."""
        if not self.sagas:
            self.last_report = SagaRecoveryReport()
            return self.last_report
        finished: list[tuple[str, str]] = []
        left: list[tuple[str, str]] = []
        now = time.monotonic()
        self.store.adopt()
        for record in self.store.records():
            if self._is_running_here(record.saga_id):
                continue
            if record.name not in self.sagas:
                left.append((record.saga_id, f"saga {record.name!r} is not registered here"))
                continue
            if record.stuck and self._stuck_next.get(record.saga_id, 0.0) > now:
                left.append((record.saga_id, "stuck: retried later"))
                continue
            claimed = self._claim(record.saga_id, actor)
            if claimed is None:
                left.append((record.saga_id, "its owner is alive"))
                continue
            if claimed.record.final:
                self.store.release(claimed.claim)
                with self._lock:
                    self._running.discard(record.saga_id)
                continue
            result = self._drive(claimed)
            if result.stuck:
                self._stuck_next[record.saga_id] = time.monotonic() + STUCK_RETRY
                left.append((record.saga_id, f"stuck: {result.error}"))
            else:
                self._stuck_next.pop(record.saga_id, None)
                finished.append((record.saga_id, result.state))
        if time.monotonic() - self._last_prune >= PRUNE_EVERY:
            self._last_prune = time.monotonic()
            try:
                self.store.retire(RETIRE_AFTER)
                self.store.prune(self.retention)
            except XatmError as e:
                logger.warning("sagas: pruning failed: %s", e)
        self.last_report = SagaRecoveryReport(tuple(finished), tuple(left), self._lost())
        return self.last_report

    def _lost(self) -> tuple[tuple[str, str], ...]:
        """After each failover of the store's database (once per process): the sagas of the
        names registered here whose barrier rows, written in the :data:`LOST_WINDOW` before
        it, have no record in the store. Their record was lost with it, and no runner wrote
        it again (``xatm.log.saga_state``), so nothing finishes or compensates them: each is
        said at ERROR, with the steps its rows show ran."""
        resources = sorted(
            {r for saga in self.sagas.values() for st in saga.steps for r in st.resources}
        )
        ran: dict[str, set[str]] = {}
        try:
            new = [t for t in self.store.lost_writes() if t not in self._checked]
            if not new:
                return ()
            start, end = min(new) - LOST_WINDOW, max(new) + SKEW
            for name in resources:
                for saga_id, ops in _barrier.rows_between(
                    name, self._tm.resources[name], start, end
                ).items():
                    ran.setdefault(saga_id, set()).update(f"{name}: {op}" for op in ops)
            lost = [
                (s, ", ".join(sorted(ran[s])))
                for s in sorted(ran)
                if name_of(s) in self.sagas
                and not self._is_running_here(s)
                and self.store.get(s) is None
            ]
        except Exception as e:  # a resource or the store failed: the next pass looks again
            logger.warning(
                "sagas: looking for sagas lost in a failover of the store failed: %s",
                _describe(e),
            )
            return ()
        for saga_id, what in lost:
            logger.error(
                "saga %s: its record is gone from the saga store (lost in a failover of the"
                " shared log's database), and no runner wrote it again: nothing finishes or"
                " compensates it. Its barrier rows show what ran (%s): resolve it by hand;"
                " it is recorded again as failed, with that in its error",
                saga_id,
                what,
            )
            self._record_lost(saga_id, what)
        self._checked.update(new)
        return tuple(lost)

    def _record_lost(self, saga_id: str, what: str) -> None:
        """A saga whose record was lost is written again, final (``failed``: nothing runs it
        again), saying what its barrier rows show: operators find it with the other sagas,
        and no later pass reports it again. Its payload is unknown."""
        record = SagaRecord(
            saga_id,
            name_of(saga_id),
            None,
            self.node_id,
            "failed",
            None,
            error=f"its record was lost in a failover of the store's database; its barrier"
            f" rows show what ran: {what}",
        )
        try:
            claim = self.store.create(record)
        except XatmError as e:
            logger.warning("saga %s: recording it as lost failed: %s", saga_id, e)
            return
        if claim is not None:
            self.store.release(claim)

    # -- operators --------------------------------------------------------------------------
    def get(self, saga_id: str) -> SagaRecord | None:
        return self.store.get(saga_id)

    def history(self, saga_id: str) -> list[AuditEntry]:
        """The saga's audit trail (every node's entries), oldest first."""
        return saga_history(self._tm.context.store, saga_id, self.store.get(saga_id))

    def act(self, saga_id: str, what: str, *, force: bool, actor: str) -> SagaResult:
        """``retry``: run the saga on now; ``abort``: stop going forward and compensate (with
        ``force``, abandon a stuck compensation: the saga ends ``failed``)."""
        record = self.store.get(saga_id)
        if record is None:
            raise SagaError(f"no saga {saga_id!r} in this log")
        if record.final:
            raise SagaRefused(f"saga {saga_id} is already {record.state}")
        if record.name not in self.sagas:
            raise SagaRefused(f"saga {record.name!r} is not registered with this manager")
        if what == "abort" and record.state == "compensating" and not force:
            raise SagaRefused(
                f"saga {saga_id} is already compensating: retry it, or abandon its"
                " compensation with --force (it then ends failed, for you to clean up)"
            )
        claimed = self._claim(saga_id, actor, force=force)
        if claimed is None:
            raise SagaRefused(
                f"saga {saga_id} is being run by a live process (node {record.node}); it is"
                " left to it" + ("" if force else " (--force takes it over with a shared log)")
            )
        rec = claimed.record
        self._audit.record(
            saga_id,
            "",
            rec.step,
            f"saga-{what}",
            "by hand" + (" (forced)" if force else ""),
            rec.state,
            actor,
        )
        if what == "abort":
            if rec.state == "compensating":
                self._save(
                    claimed,
                    force=True,
                    state="failed",
                    stuck=False,
                    error=rec.error + " (compensation abandoned by an operator)",
                )
                self.store.release(claimed.claim)
                with self._lock:
                    self._running.discard(saga_id)
                return result_of(claimed.record)
            step = claimed.saga.step_named(rec.step)
            attempted = [*rec.done] + (
                [rec.step] if step is not None and rec.step not in rec.done else []
            )
            self._save(
                claimed,
                force=True,
                state="compensating",
                error="aborted by an operator",
                to_compensate=tuple(reversed(attempted)),
            )
        else:
            self._stuck_next.pop(saga_id, None)
            claimed.record = claimed.record.with_(stuck=False)
        return self._drive(claimed)

    def close(self) -> None:
        self.store.close()
        self._audit.close()


_NOTE = {
    "run": "",
    "duplicate": "barrier: done before (duplicate), skipped",
    "hanging": "barrier: compensated before, action skipped",
    "empty": "barrier: the action never committed (empty compensation)",
}
