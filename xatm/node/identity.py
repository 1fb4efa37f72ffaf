"""Node identity as a lease: a manager acts on a resource only while it holds its node's lock there.

A manager holds, on a connection of its own to every resource, a session lock named after its
node_id (the adapters' ``take_identity``: ``GET_LOCK('xatm:node:<id>', 0)`` on MySQL/MariaDB,
server-wide like ``XA RECOVER``; a session advisory lock on PostgreSQL, per database like the
filtered ``pg_prepared_xacts``). Resources whose locks live in one place (several databases
on one MySQL/MariaDB server: ``identity_session``) share one lock and one session.

A session lock proves the identity only *while it is held*: its session can be cut while the
process lives on (a failover, ``pg_terminate_backend``, ``wait_timeout`` after a pause, a
proxy dropping the flow), and another process with the same node_id can take it in that
window. So the lock is a **lease**:

* at start, a lock held by another session makes the manager refuse to start
  (:class:`~xatm.ConfigurationError` naming the node and the resource) after waiting up to
  ``wait`` seconds; a resource that cannot be reached is tried again later;
* a keeper thread per lock confirms it every :data:`KEEP_INTERVAL` (a ping of its session:
  alive means held) and retakes it at once when its session is gone; the lease runs
  :data:`LEASE` seconds from the last confirmation, so a session that stops answering (a
  silent server, a half-open connection) loses the lease without any call returning;
* :meth:`IdentityLocks.require` (at enlistment) and :meth:`IdentityLocks.unheld` (at the
  decision fence, ``xatm.transactions.transaction``) refuse to act on a resource whose lease is not
  held now, with :class:`~xatm.IdentityNotHeld` naming node and resource; a lock found taken by
  someone else is logged at ERROR and shown by ``status`` (``xatm doctor``, the
  ``xatm_identity_held`` metric) until it is retaken.

Safety does not rest on the lease: a lease can lapse between the check and the act. What
keeps two processes with one node_id from splitting a transaction is the incarnation in every
gtrid (``xatm.log.incarnations``): recovery presumes abort only for branches of processes that a
log it holds lists. The lease makes a twin fail fast and visibly instead of running on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from xatm.core import deadline as _deadline
from xatm.core.logfields import log_fields
from xatm.core.participant import Connection, Participant
from xatm.core.urls import describe_error, redact
from xatm.errors import ConfigurationError, IdentityNotHeld, ResourceError

logger = logging.getLogger("xatm.identity")

#: seconds between two confirmations of a lock by its keeper thread
KEEP_INTERVAL = 1.0
#: seconds a confirmation is good for: past it, the lease has lapsed
LEASE = 5.0

#: ``held``: the lock is ours (lease valid or lapsed: see :meth:`IdentityLocks.status`);
#: ``taken``: another session holds it; ``unreached``: it could not be asked; ``closed``
LockState = Literal["held", "taken", "unreached", "closed"]


class NodeInUse(ConfigurationError):
    """Another live process holds this node_id's identity lock on a resource (at start)."""


@dataclass(eq=False)
class _Lock:
    """One identity lock: its session, and the resources it stands for."""

    participant: Participant  # the resource whose connection holds it
    conn: Connection | None = None
    place: str = ""  # identity_session's place: resources of one place share this lock
    session: int = -1
    state: LockState = "unreached"
    why: str = "not taken yet"
    confirmed: float = float("-inf")  # monotonic time of the last confirmation
    members: set[str] = field(default_factory=set)
    checking: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, slots=True)
class IdentityStatus:
    """The identity of the node on one resource, as ``xatm doctor`` and the metrics show it."""

    resource: str
    held: bool  # the lease is valid now
    state: LockState
    detail: str  # why it is not held, or which resource's session holds it


class IdentityLocks:
    """The identity leases of one node_id on every resource of one manager."""

    def __init__(
        self,
        participants: Mapping[str, Participant],
        node_id: str,
        *,
        lease: float = LEASE,
        interval: float = KEEP_INTERVAL,
    ) -> None:
        self._participants = dict(participants)
        self.node_id = node_id
        self.lease = lease
        self.interval = interval
        self._mutex = threading.Lock()
        self._locks: dict[str, _Lock] = {n: _Lock(p, members={n}) for n, p in participants.items()}
        self._closed = False
        self._stop = threading.Event()
        self._keepers: list[threading.Thread] = []

    # -- start -----------------------------------------------------------------------------
    def acquire(self, wait: float) -> None:
        """Take the lock on every reachable resource (the servers asked in parallel); raise
        ConfigurationError, releasing every lock taken, if another session holds one for
        longer than ``wait`` seconds."""
        deadline = time.monotonic() + max(0.0, wait)
        # one server's resources one after the other (the second finds the first one's
        # session holding the lock, and shares it), the servers in parallel
        servers: dict[tuple[str, str, int], list[str]] = {}
        for name, participant in self._participants.items():
            spec = participant.spec
            servers.setdefault((spec.kind, spec.host, spec.port), []).append(name)

        def take_all(names: list[str]) -> list[tuple[str, bool]]:
            return [(n, self._first_take(n, deadline)) for n in names]

        taken: dict[str, bool] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            for results in pool.map(take_all, servers.values()):
                taken.update(results)
        refused = [n for n, ok in taken.items() if not ok]
        if refused:
            self.close()
            name = refused[0]
            raise NodeInUse(
                f"node_id {self.node_id!r} is already in use on resource {name!r}: another"
                " live process holds its identity lock there (a second process with the same"
                " node_id, or another application on the same database server using it)."
                " Give every coordinator process its own node_id"
            )

    def _first_take(self, name: str, deadline: float) -> bool:
        """Take ``name``'s lock at start, waiting until ``deadline`` for another holder to
        go; False if it is still held by another then."""
        while True:
            lock = self._lock_of(name)
            with lock.checking:
                self._check(lock, name, report=False)
                state = lock.state
            if state == "taken" and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if state == "unreached":
                logger.warning(
                    "identity lock of node %r on %r not taken yet: %s",
                    self.node_id,
                    name,
                    lock.why,
                    extra=log_fields(self.node_id, resource=name),
                )
            return state != "taken"

    # -- keeping ---------------------------------------------------------------------------
    def keep(self) -> None:
        """Start the keeper threads: one per resource, each confirming (and if need be
        retaking) the lock that resource stands on every :attr:`interval` seconds."""
        if self._keepers:
            return
        for name in self._participants:
            t = threading.Thread(
                target=self._keep, args=(name,), name=f"xatm-identity-{name}", daemon=True
            )
            self._keepers.append(t)
            t.start()

    def _keep(self, name: str) -> None:
        while not self._stop.wait(self.interval):
            lock = self._lock_of(name)
            if name != min(lock.members):
                continue  # a lock shared by several resources is kept by one of them
            try:
                with lock.checking:
                    self._check(lock, name)
            except Exception:  # a check must never end the thread
                logger.debug("identity check on %r failed", name, exc_info=True)

    def _lock_of(self, name: str) -> _Lock:
        with self._mutex:
            return self._locks[name]

    def _check(self, lock: _Lock, name: str, *, report: bool = True) -> None:
        """Confirm ``lock`` (its session answers: still held), or take it (again). Called
        with ``lock.checking`` held; ``name`` is one of the resources it stands for."""
        if self._closed:
            lock.state, lock.why = "closed", "the manager is closed"
            return
        conn = lock.conn
        if conn is not None:
            bound = _deadline.bounded(lock.participant, conn, _deadline.GRACE, "an identity check")
            with bound as watch:  # a silent server: the session counts as lost
                alive = lock.participant.ping(conn) and not watch.fired
            if alive:
                lock.confirmed = time.monotonic()
                return
            lock.conn = None
            lock.confirmed = float("-inf")  # the session is gone: so is the lock, now
            lock.participant.close(conn)
            logger.warning(
                "node_id %r: the session holding its identity lock on %r was lost; taking it again",
                self.node_id,
                name,
                extra=log_fields(self.node_id, resource=name),
            )
        self._take(lock, name, report)

    def _take(self, lock: _Lock, name: str, report: bool, *, bound: float | None = None) -> None:
        participant = self._participants[name]
        try:
            conn = participant.connect()
        except ResourceError as e:
            lock.state, lock.why = "unreached", redact(str(e))
            return
        seconds = _deadline.GRACE if bound is None else max(0.001, min(bound, _deadline.GRACE))
        try:
            with _deadline.bounded(participant, conn, seconds, "an identity check"):
                got = participant.take_identity(conn, self.node_id)
                place, session = participant.identity_session(conn)
                holder = None if got else participant.identity_holder(conn, self.node_id)
        except Exception as e:
            participant.close(conn)
            lock.state, lock.why = "unreached", describe_error(e)
            return
        if got:
            with self._mutex:
                if self._closed:
                    participant.close(conn)
                    return
                lock.participant, lock.conn = participant, conn
                lock.place, lock.session = place, session
                lock.confirmed = time.monotonic()
                was = lock.state
                lock.state, lock.why = "held", ""
            if was == "taken":
                logger.warning(
                    "node_id %r: identity lock on %r taken back",
                    self.node_id,
                    name,
                    extra=log_fields(self.node_id, resource=name),
                )
            return
        participant.close(conn)
        mine = self._holding(place, holder)
        if mine is not None and mine is not lock:
            # another resource of this manager, on the same server, holds it: share its lock
            with self._mutex:
                mine.members |= lock.members
                for member in lock.members:
                    self._locks[member] = mine
            return
        was = lock.state
        lock.state = "taken"
        lock.why = (
            "another live process holds its identity lock there (a second process with the"
            " same node_id, or another application on the same database server using it)"
        )
        if was != "taken" and report:
            logger.error(
                "node_id %r: another process holds this node's identity lock on %r: two"
                " processes run with the same node_id; this one refuses to enlist, prepare or"
                " decide there until it is its own again",
                self.node_id,
                name,
                extra=log_fields(self.node_id, resource=name),
            )

    def _holding(self, place: str, session: int | None) -> _Lock | None:
        """This manager's lock whose session ``session`` at ``place`` is, if any."""
        if session is None:
            return None
        with self._mutex:
            for lock in self._locks.values():
                if lock.conn is not None and lock.place == place and lock.session == session:
                    return lock
        return None

    # -- asking ----------------------------------------------------------------------------
    def _reason(self, name: str, now: float) -> str | None:
        """Why the lease on ``name`` is not held at ``now`` (None if it is)."""
        lock = self._lock_of(name)
        if lock.state == "held":
            if now - lock.confirmed <= self.lease:
                return None
            if lock.conn is None:
                return "its identity session was lost and is not taken back yet"
            return (
                f"its identity session has not answered for {now - lock.confirmed:.1f} s"
                " (the server or the path to it is silent)"
            )
        if lock.state == "taken":
            return lock.why
        if lock.state == "closed":
            return "the transaction manager is closed"
        return f"its identity lock there could not be taken yet: {lock.why}"

    def holds(self, name: str) -> bool:
        """Is the lease on ``name`` held now? (No I/O.)"""
        return name not in self._locks or self._reason(name, time.monotonic()) is None

    def require(self, name: str, budget: float | None = None) -> None:
        """Raise IdentityNotHeld unless this manager holds its identity on ``name`` now. A
        lock whose session is gone (a server restart) or was never taken is taken here, once,
        if its keeper is not busy with it: a connect, as enlisting on a fresh connection
        costs, and the take bounded by ``budget`` (the seconds the caller's transaction has
        left), so a first transaction after a restart need not fail. A lease that lapsed on
        a session that stopped answering is not waited for. Blocking: the asyncio manager
        calls it on a worker thread."""
        if self.holds(name):
            return
        lock = self._lock_of(name)
        if lock.state != "taken" and lock.conn is None and lock.checking.acquire(timeout=0.05):
            try:
                if lock.conn is None and self._reason(name, time.monotonic()) is not None:
                    self._take(lock, name, True, bound=budget)
            finally:
                lock.checking.release()
        why = self._reason(name, time.monotonic())
        if why is not None:
            raise self.error(name, why)

    def unheld(self, names: Iterable[str]) -> IdentityNotHeld | None:
        """The error for the first of ``names`` whose lease is not held now (None if every
        one is): no I/O."""
        now = time.monotonic()
        for name in names:
            if name in self._locks:
                why = self._reason(name, now)
                if why is not None:
                    return self.error(name, why)
        return None

    def error(self, name: str, why: str) -> IdentityNotHeld:
        return IdentityNotHeld(
            f"node_id {self.node_id!r} does not hold its identity on resource {name!r}: {why}",
            resource=name,
        )

    def held(self, name: str) -> bool:
        """Does this process hold the node's identity on ``name``? Confirmed now (one round
        trip), taken again if its session was lost and nobody else has it."""
        if name not in self._locks or self._closed:
            return False
        lock = self._lock_of(name)
        with lock.checking:
            self._check(lock, name)
        return self._reason(name, time.monotonic()) is None

    def status(self) -> list[IdentityStatus]:
        """The identity on every resource, now (no I/O)."""
        now = time.monotonic()
        out = []
        for name in self._participants:
            lock = self._lock_of(name)
            why = self._reason(name, now)
            shared_with = sorted(lock.members - {name})
            detail = why or (f"shares the lock of {', '.join(shared_with)}" if shared_with else "")
            out.append(IdentityStatus(name, why is None, lock.state, detail))
        return out

    def close(self) -> None:
        """Release every lock (closing its session)."""
        self._stop.set()
        for keeper in self._keepers:
            if keeper is not threading.current_thread():
                keeper.join(timeout=10.0)
        with self._mutex:
            self._closed = True
            locks = {id(lock): lock for lock in self._locks.values()}.values()
            conns = [(lock.participant, lock.conn) for lock in locks if lock.conn is not None]
            for lock in locks:
                lock.conn, lock.state, lock.why = None, "closed", "the manager is closed"
        for participant, conn in conns:
            participant.close(conn)
