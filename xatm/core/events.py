"""Events: what the coordinator did, told to whoever listens (metrics and tracing exporters).

The core says what happened; exporters (``xatm.prometheus``, ``xatm.otel``, or an
application's own function, through ``xatm.events``, the public face of this module)
subscribe and turn it into metrics or spans. Nothing here depends on any exporter's library.
With no subscriber the hooks cost a truthiness test of a tuple (``listening()``) and a few
no-op calls per transaction: no event object is built.

The events (frozen dataclasses, delivered on the thread where the thing happened):

* :class:`ManagerOpened` / :class:`ManagerClosed`: a TransactionManager was built / closed;
* :class:`TransactionFinished`: a global transaction ended: its outcome (``committed``,
  ``rolled_back``, ``in_doubt``, ``heuristic``), its phases (``prepare``, ``decide``,
  ``commit``, ``rollback``) and every branch operation, with their times;
* :class:`RecoveryPassFinished`: a recovery or sweeper pass ended (its RecoveryReport, and
  the in-doubt transactions it left: count and oldest creation time), or failed;
* :class:`LogForced`: a coordinator log made records durable (an fsync of the file log, a
  committed batch of the shared log);
* :class:`FailoverDetected`: a PostgreSQL resource is on a new timeline (a promoted standby,
  a restore: ``xatm.node.failover``); :class:`FailoverChecked`: recovery checked what a switch
  may have lost (transactions checked, certainly lost, possibly lost).

A subscriber's exception is logged and swallowed: an exporter never breaks a transaction.
When ``prometheus_client`` is installed, the first TransactionManager loads
``xatm.prometheus`` (which registers its collector in the default registry) unless
``XATM_PROMETHEUS=0`` is set or the application installed that collector itself.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

from xatm.core.participant import Connection, Participant, PhaseTwo, Prepared, Statement
from xatm.core.xid import Xid, parse_gtrid

if TYPE_CHECKING:
    from collections.abc import Sequence

    from xatm.core.participant import Cursor, PreparedBranch
    from xatm.core.report import RecoveryReport
    from xatm.core.urls import Kind, ResourceSpec

logger = logging.getLogger("xatm.events")

P = ParamSpec("P")
T = TypeVar("T")


class Event:
    """Base class of every event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ManagerOpened(Event):
    """A TransactionManager was built (``manager`` is it: exporters may read its public
    state, such as ``manager.sweeper.status()``, but must not keep it alive)."""

    node: str
    manager: Any


@dataclass(frozen=True, slots=True)
class ManagerClosed(Event):
    node: str
    manager: Any


class Phase(NamedTuple):
    """One phase of a transaction's end; times are ``time.perf_counter()`` seconds."""

    name: str  # prepare, decide, commit, rollback
    start: float
    end: float


class BranchOp(NamedTuple):
    """One operation on one branch (``begin``, ``prepare``, ``commit``, ``rollback``,
    ``commit_one_phase``); ``phase`` is the phase it ran in ("" before any)."""

    resource: str
    op: str
    phase: str
    db_system: str  # postgresql, mysql or mariadb
    host: str
    port: int
    database: str | None
    start: float
    end: float
    error: str | None = None  # the exception's type name


@dataclass(frozen=True, slots=True)
class TransactionFinished(Event):
    """A global transaction ended. ``start``/``end`` are ``time.perf_counter()`` seconds;
    ``wall_start`` is ``time.time()`` at ``start`` (see :meth:`wall`)."""

    node: str
    gtrid: str
    outcome: str  # committed, rolled_back, in_doubt, heuristic
    resources: tuple[str, ...]
    start: float
    end: float
    wall_start: float
    phases: tuple[Phase, ...]
    ops: tuple[BranchOp, ...]
    heuristics: int = 0  # branches found not prepared at commit (rolled back by hand?)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def wall(self, t: float) -> float:
        """A ``perf_counter`` time of this event as seconds since the epoch."""
        return self.wall_start + (t - self.start)


@dataclass(frozen=True, slots=True)
class RecoveryPassFinished(Event):
    """A recovery pass (``tm.recover()``, a sweeper pass, ``xatm recover``) ended.

    ``in_doubt`` counts the xatm transactions the pass left prepared: a phase-2 call failed,
    or it was left alone (live owner, unreachable decision...) and is older than the
    manager's timeout (younger ones are normally still in flight). ``oldest_created`` is the
    creation time (epoch seconds) of the oldest of them. ``report`` is None if the pass
    raised (``error`` names the exception)."""

    node: str
    actor: str
    dry_run: bool
    report: RecoveryReport | None
    start: float
    end: float
    wall_start: float
    in_doubt: int = 0
    oldest_created: float | None = None
    error: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class LogForced(Event):
    """The coordinator log of ``node`` made a batch durable (one fsync, one shared-log
    commit)."""

    node: str


@dataclass(frozen=True, slots=True)
class FailoverDetected(Event):
    """Node ``node`` found PostgreSQL resource ``resource`` on timeline ``new`` (was ``old``;
    equal for a restore that went back in the same timeline)."""

    node: str
    resource: str
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class FailoverChecked(Event):
    """Recovery checked the transactions node ``node`` committed on ``resource`` before a
    switch: ``checked`` of them, ``lost`` certainly lost, ``possibly_lost`` unknown."""

    node: str
    resource: str
    checked: int
    lost: int
    possibly_lost: int


Subscriber = Callable[[Event], None]

_lock = threading.Lock()
_subscribers: tuple[Subscriber, ...] = ()


def listening() -> bool:
    """True if anyone subscribed: the cheap check in front of every hook."""
    return bool(_subscribers)


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Call ``subscriber(event)`` for every event from now on; returns the unsubscribe call.
    Subscribing the same callable twice has no further effect."""
    global _subscribers
    with _lock:
        if subscriber not in _subscribers:
            _subscribers = (*_subscribers, subscriber)
    return lambda: unsubscribe(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    global _subscribers
    with _lock:
        _subscribers = tuple(s for s in _subscribers if s != subscriber)


def emit(event: Event) -> None:
    """Deliver ``event`` to every subscriber (their exceptions are logged, not raised)."""
    for subscriber in _subscribers:
        try:
            subscriber(event)
        except Exception:
            logger.exception("an xatm event subscriber failed on %s", type(event).__name__)


_first_manager_hooks: list[Callable[[], None]] = []


def on_first_manager(hook: Callable[[], None]) -> None:
    """Call ``hook()`` once, when the process's first TransactionManager is ready: how the
    public modules install exporters (Prometheus) without the core importing them."""
    with _lock:
        _first_manager_hooks.append(hook)


# -- hooks the core calls ---------------------------------------------------------------------
def manager_opened(manager: Any) -> None:
    """A TransactionManager is ready."""
    if _first_manager_hooks:
        with _lock:
            hooks = list(_first_manager_hooks)
            _first_manager_hooks.clear()
        for hook in hooks:
            try:
                hook()
            except Exception:
                logger.exception("an xatm exporter could not be installed")
    if _subscribers:
        emit(ManagerOpened(manager.node_id, manager))


def manager_closed(manager: Any) -> None:
    if _subscribers:
        emit(ManagerClosed(manager.node_id, manager))


def log_forced(node: str) -> None:
    """A coordinator log forced a batch to stable storage."""
    if _subscribers:
        emit(LogForced(node))


def failover_detected(node: str, resource: str, old: int, new: int) -> None:
    if _subscribers:
        emit(FailoverDetected(node, resource, old, new))


def failover_checked(node: str, resource: str, checked: int, lost: int, unknown: int) -> None:
    if _subscribers:
        emit(FailoverChecked(node, resource, checked, lost, unknown))


# -- recovery passes ----------------------------------------------------------------------
class _Manager(Protocol):
    @property
    def node_id(self) -> str: ...

    timeout: float


M = TypeVar("M", bound=_Manager)


def observed_pass(
    run: Callable[Concatenate[M, P], RecoveryReport],
) -> Callable[Concatenate[M, P], RecoveryReport]:
    """Decorates ``run_pass``: emits :class:`RecoveryPassFinished` from the report it returns."""

    @functools.wraps(run)
    def wrapper(manager: M, /, *args: P.args, **kwargs: P.kwargs) -> RecoveryReport:
        if not _subscribers:
            return run(manager, *args, **kwargs)
        start, wall = time.perf_counter(), time.time()
        actor = str(kwargs.get("actor") or f"recover@{manager.node_id}")
        dry_run = bool(kwargs.get("dry_run", False))
        try:
            report = run(manager, *args, **kwargs)
        except BaseException as e:
            end = time.perf_counter()
            emit(
                RecoveryPassFinished(
                    manager.node_id, actor, dry_run, None, start, end, wall, error=type(e).__name__
                )
            )
            raise
        end = time.perf_counter()
        count, oldest = in_doubt(report, manager.timeout)
        emit(
            RecoveryPassFinished(
                manager.node_id, actor, dry_run, report, start, end, wall, count, oldest
            )
        )
        return report

    return wrapper


def in_doubt(report: RecoveryReport, timeout: float) -> tuple[int, float | None]:
    """(transactions left in doubt, creation time of the oldest) by ``report``'s actions."""
    now = time.time()
    created: dict[str, float] = {}
    for a in report.actions:
        if a.action != "error" and not (a.action == "skip" and a.outcome == "left"):
            continue
        try:
            at = parse_gtrid(a.gtrid)[1]
        except ValueError:
            continue
        if a.action == "error" or now - at >= timeout:
            created[a.gtrid] = at
    return len(created), min(created.values(), default=None)


# -- transactions -------------------------------------------------------------------------
class NullTimeline:
    """What a transaction records into while nobody listens: nothing."""

    __slots__ = ()

    def watch(self, participant: Participant) -> Participant:
        """The participant to drive the branch through (the same one: nothing is timed)."""
        return participant

    def phase(self, name: str) -> None:
        """The transaction's end enters phase ``name``."""

    def finish(self, state: Any) -> None:
        """The transaction ended in ``state`` (a TransactionState)."""


NULL_TIMELINE = NullTimeline()

_OUTCOMES = {"committed": "committed", "committing": "committed", "rolled-back": "rolled_back"}


class Timeline(NullTimeline):
    """The times of one transaction's phases and branch operations (used by one thread)."""

    __slots__ = ("_done", "gtrid", "heuristics", "marks", "node", "ops", "resources", "start")

    def __init__(self, node: str, gtrid: str) -> None:
        self.node = node
        self.gtrid = gtrid
        self.start = time.perf_counter()
        self._done = False
        self.marks: list[tuple[str, float]] = []
        self.ops: list[BranchOp] = []
        self.resources: list[str] = []
        self.heuristics = 0

    @property
    def current(self) -> str:
        return self.marks[-1][0] if self.marks else ""

    def watch(self, participant: Participant) -> Participant:
        self.resources.append(participant.name)
        return _Watched(participant, self)

    def phase(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def op(
        self, participant: Participant, op: str, phase: str, start: float, error: str | None
    ) -> None:
        spec = participant.spec
        self.ops.append(
            BranchOp(
                participant.name,
                op,
                phase,
                getattr(participant, "db_system", participant.kind),
                spec.host,
                spec.port,
                spec.database,
                start,
                time.perf_counter(),
                error,
            )
        )

    def finish(self, state: Any) -> None:
        if self._done:
            return
        self._done = True
        end = time.perf_counter()
        outcome = _OUTCOMES.get(getattr(state, "value", ""), "in_doubt")
        if outcome == "committed" and self.heuristics:
            outcome = "heuristic"
        ends = [t for _, t in self.marks[1:]] + [end]  # a phase lasts until the next one
        phases = tuple(Phase(n, t, e) for (n, t), e in zip(self.marks, ends, strict=False))
        wall = time.time() - (end - self.start)
        emit(
            TransactionFinished(
                self.node,
                self.gtrid,
                outcome,
                tuple(self.resources),
                self.start,
                end,
                wall,
                phases,
                tuple(self.ops),
                self.heuristics,
            )
        )


def timeline(node: str, gtrid: str) -> NullTimeline:
    """A new transaction's timeline: a real one only while someone listens."""
    return Timeline(node, gtrid) if _subscribers else NULL_TIMELINE


class _Watched:
    """A participant whose branch operations are timed into a Timeline (the rest passes
    through unchanged)."""

    def __init__(self, inner: Participant, timeline: Timeline) -> None:
        self._inner = inner
        self._tl = timeline
        self.name = inner.name
        self.spec: ResourceSpec = inner.spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def kind(self) -> Kind:
        return self._inner.kind

    def _timed(self, op: str, call: Callable[[], T]) -> T:
        phase, start = self._tl.current, time.perf_counter()
        try:
            result = call()
        except BaseException as e:
            self._tl.op(self._inner, op, phase, start, type(e).__name__)
            raise
        self._tl.op(self._inner, op, phase, start, None)
        return result

    def _started(self, op: str, begin: Callable[[], Callable[[], T]]) -> Callable[[], T]:
        phase, start = self._tl.current, time.perf_counter()
        try:
            finish = begin()
        except BaseException as e:
            self._tl.op(self._inner, op, phase, start, type(e).__name__)
            raise

        def done() -> T:
            try:
                result = finish()
            except BaseException as e:
                self._tl.op(self._inner, op, phase, start, type(e).__name__)
                raise
            self._tl.op(self._inner, op, phase, start, None)
            if result is PhaseTwo.NOT_FOUND:
                self._tl.heuristics += 1
            return result

        return done

    # the Participant interface
    def connect(self) -> Connection:
        return self._inner.connect()

    def ping(self, conn: Connection) -> bool:
        return self._inner.ping(conn)

    def is_idle(self, conn: Connection) -> bool:
        return self._inner.is_idle(conn)

    def close(self, conn: Connection) -> None:
        self._inner.close(conn)

    def is_connection_error(self, exc: BaseException) -> bool:
        return self._inner.is_connection_error(exc)

    def begin(self, conn: Connection, xid: Xid, timeout: float | None = None) -> None:
        self._timed("begin", lambda: self._inner.begin(conn, xid, timeout))

    def begin_with(self, conn: Connection, xid: Xid, timeout: float | None, insert: str) -> bool:
        return self._timed("begin", lambda: self._inner.begin_with(conn, xid, timeout, insert))

    def execute(self, conn: Connection, sql: Any, params: Sequence[Any] | Any = None) -> Cursor:
        return self._inner.execute(conn, sql, params)

    def prepare(self, conn: Connection, xid: Xid) -> Prepared:
        return self._timed("prepare", lambda: self._inner.prepare(conn, xid))

    def start_prepare(self, conn: Connection, xid: Xid) -> Callable[[], Prepared]:
        return self._started("prepare", lambda: self._inner.start_prepare(conn, xid))

    def start_commit_prepared(self, conn: Connection, xid: Xid) -> Callable[[], PhaseTwo]:
        return self._started("commit", lambda: self._inner.start_commit_prepared(conn, xid))

    def commit_one_phase(
        self, conn: Connection, xid: Xid, before: Sequence[Statement] = ()
    ) -> None:
        self._timed("commit_one_phase", lambda: self._inner.commit_one_phase(conn, xid, before))

    def commit_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo:
        result = self._timed("commit", lambda: self._inner.commit_prepared(conn, xid))
        if result is PhaseTwo.NOT_FOUND:
            self._tl.heuristics += 1
        return result

    def rollback_prepared(self, conn: Connection, xid: Xid) -> PhaseTwo:
        return self._timed("rollback", lambda: self._inner.rollback_prepared(conn, xid))

    def rollback_active(self, conn: Connection, xid: Xid) -> None:
        self._timed("rollback", lambda: self._inner.rollback_active(conn, xid))

    def recover(self, conn: Connection) -> list[PreparedBranch]:
        return self._inner.recover(conn)

    def check(self, conn: Connection) -> list[str]:
        return self._inner.check(conn)
