"""Client-side deadlines: a watchdog thread that ends a call its database does not answer.

A server that stops answering (a storage stall, a paused VM, a process stopped by SIGSTOP, a
path that drops packets but never closes the connection) keeps its client blocked in
``recv()`` for as long as it is silent: libpq has no read timeout, a ``statement_timeout`` is
enforced by the very server that is silent, and mysql-connector's timeouts do not bound
every read. So the calls xatm makes run under a deadline. :func:`arm` (or the ``with`` forms
:func:`bounded` and :func:`until`) puts a connection's deadline in a table; one watchdog
thread per process scans the table every :data:`TICK` seconds and, for a deadline that has
passed, shuts the connection's socket down (``shutdown(SHUT_RDWR)`` on a duplicate of its
file descriptor). The driver then fails the call as a lost connection, which every caller
already handles (the connection is closed, and the outcome of that call is unknown); the
:class:`Watch` says it ``fired``, so that a caller can tell a cut call from a failed one.

How to find a connection's socket is the participant's business (``socket_of``, in
``xatm.participants.postgres.participant``, ``xatm.participants.mysql.drivers`` and the asyncio
adapters); this module knows no driver. A connection is watched by one deadline at a time: arming it
again inside a watched block watches it by the inner deadline until that block ends, then by the
outer one again.

Cost: arming is one small object and one dictionary insert, disarming a removal, no lock
(a few microseconds together: ``python -m benchmarks.micro``); the
thread only runs while something is armed. A connect has no socket to cut until it returns:
its bound is the driver's connect timeout, and :func:`waiting` only makes it visible to
:func:`report_waits`, with which the ``xatm`` command says early what it is waiting for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from xatm.core.logfields import log_fields
from xatm.core.urls import DEFAULT_CONNECT_TIMEOUT

logger = logging.getLogger("xatm.deadline")

#: seconds between two scans of the deadlines (how late past its deadline a call is cut)
TICK = 0.1
#: what the calls that end a transaction's branches (commit, rollback) may take past its
#: deadline, and the bound of a call that must answer at once (a ping, an identity check):
#: as long as a connect may take
GRACE = float(DEFAULT_CONNECT_TIMEOUT)


#: the least bound of a step of recovery, inspection or resolution: the lock waits its
#: sessions allow are never below 5 s
# (``xatm.participants.postgres.participant.SESSION_WAIT_FLOOR``, the marker
#: probe's ``PROBE_LOCK_WAIT``)
STEP_FLOOR = 5.0


def step_bound(timeout: float) -> float:
    """Seconds one step on one resource (a listing, one branch's commit or rollback, a
    decision-row probe) may take, for a manager whose transaction timeout is ``timeout``:
    the longest lock wait its sessions allow, plus :data:`GRACE`."""
    return max(timeout, STEP_FLOOR) + GRACE


class Sockets(Protocol):
    """What a deadline needs of a participant (sync or asyncio): its name, and the socket
    of one of its connections."""

    @property
    def name(self) -> str: ...

    def socket_of(self, conn: Any) -> int | None:
        """The file descriptor of ``conn``'s socket, or None if it cannot be found."""


class Watch:
    """One deadline on one connection (or, with no connection, a wait that is only
    reported). ``fired``: the deadline passed during a call, and the connection's socket was
    shut down (unless it could not be found: that is logged as an error).

    Only a connection in a call is cut: ``busy`` counts the calls in flight (1 for the
    ``with`` forms; a watch kept over a longer span, such as a transaction's branch, is
    made busy around each call with :class:`calling`). A watch that is past its deadline
    while idle is cut as soon as a call starts on it."""

    __slots__ = (
        "_conn",
        "_outer",
        "busy",
        "deadline",
        "done",
        "fd",
        "fired",
        "firing",
        "key",
        "noticed",
        "owner",
        "since",
        "what",
    )

    def __init__(
        self, owner: Sockets, conn: Any, deadline: float, what: str, busy: int = 1
    ) -> None:
        self.owner = owner
        # the connection, weakly: a transaction dropped unended must not be kept alive by
        # its deadline (its connection closes, and the server rolls its work back)
        self._conn: Callable[[], Any] = _ref(conn)
        self.key = id(conn) if conn is not None else id(self)
        self.deadline = deadline
        self.what = what
        self.busy = busy
        self.since = time.monotonic()
        self.fired = False
        self.firing = False  # the watchdog is cutting it now
        self.noticed = False
        self.done = False  # disarmed
        self._outer: Watch | None = None
        # the socket is found when the watch is armed, by the thread about to make the call:
        # some drivers refuse to be asked anything by another thread during a call
        self.fd: int | None = None
        if conn is not None:
            try:
                self.fd = owner.socket_of(conn)
            except Exception:
                self.fd = None

    @property
    def conn(self) -> Any:
        """The connection (None once it is gone)."""
        return self._conn()

    def renew(self, seconds: float) -> None:
        """Move the deadline to ``seconds`` from now (a loop of steps, each bounded)."""
        self.deadline = time.monotonic() + seconds

    def extend_to(self, deadline: float) -> None:
        """Move the deadline to ``deadline`` if that is later."""
        if deadline > self.deadline:
            self.deadline = deadline

    def __repr__(self) -> str:
        left = self.deadline - time.monotonic()
        return f"<Watch {self.owner.name!r} {self.what} {left:.3f}s left fired={self.fired}>"


@dataclass(frozen=True, slots=True)
class Wait:
    """A wait that has lasted a while, as :func:`report_waits` tells it."""

    resource: str
    what: str
    waited: float
    limit: float | None  # seconds from its start to its deadline (None: the driver's own)


def _ref(conn: Any) -> Callable[[], Any]:
    """A weak reference to ``conn`` that drops its watch from the table when ``conn`` goes
    (a strong one for an object that allows no weak reference)."""
    if conn is None:
        return lambda: None
    key = id(conn)

    def gone(_: object) -> None:
        watch = _armed.get(key)
        while watch is not None and watch.conn is None:  # this connection's, now dead
            watch = watch._outer
        if watch is None:
            _armed.pop(key, None)
        else:
            _armed[key] = watch

    try:
        return weakref.ref(conn, gone)
    except TypeError:
        return lambda: conn


# -- the table: connection id -> its watch; waits without a connection ---------------------
_armed: dict[int, Watch] = {}
_waits: dict[int, Watch] = {}
_wake = threading.Event()
_sleeping = False
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_notify: Callable[[Wait], None] | None = None
_notice_after = 1.0


def arm(
    owner: Sockets, conn: Any, deadline: float, what: str = "a call", *, busy: int = 1
) -> Watch:
    """Watch ``conn`` until :func:`disarm`: past ``deadline`` (``time.monotonic()``) a
    call on it (``busy``: one is in flight now; 0: see :class:`calling`) is cut."""
    watch = Watch(owner, conn, deadline, what, busy)
    key = watch.key
    outer = _armed.get(key)
    if outer is not None:
        watch._outer = outer
    _armed[key] = watch
    if _thread is None:
        _start()
    elif _sleeping:
        _wake.set()
    return watch


def disarm(watch: Watch) -> bool:
    """Stop watching; True if the deadline had passed and the connection was cut.

    No lock on this path (it runs for every branch, on every thread): the watchdog says it
    is cutting (``firing``) before it checks ``done`` one last time, and this sets ``done``
    before it checks ``firing``; so either the watchdog sees ``done`` and leaves the
    connection alone, or this waits for the cut to end. Either way the connection is never
    given back, closed and its descriptor reused while it is being cut."""
    watch.done = True
    while watch.firing:
        time.sleep(0.001)
    key = watch.key
    if _armed.get(key) is watch:
        outer = watch._outer
        while outer is not None and outer.done:  # disarmed out of order meanwhile
            outer = outer._outer
        if outer is None:
            _armed.pop(key, None)
        else:
            _armed[key] = outer
    return watch.fired


def renew(conn: Any, seconds: float) -> None:
    """Move the deadline of ``conn``'s current watch (if any) to ``seconds`` from now."""
    watch = _armed.get(id(conn))
    if watch is not None:
        watch.renew(seconds)


class until:
    """``with until(owner, conn, deadline, what) as watch:`` watches ``conn`` for the
    block, by an absolute deadline (``time.monotonic()``)."""

    __slots__ = ("_args", "watch")

    def __init__(self, owner: Sockets, conn: Any, deadline: float, what: str = "a call") -> None:
        self._args = (owner, conn, deadline, what)

    def __enter__(self) -> Watch:
        self.watch = arm(*self._args)
        return self.watch

    def __exit__(self, *exc: object) -> None:
        disarm(self.watch)


class calling:
    """``with calling(watch):`` marks a call in flight on a long-lived watch (None: no
    watch, nothing to mark)."""

    __slots__ = ("watch",)

    def __init__(self, watch: Watch | None) -> None:
        self.watch = watch

    def __enter__(self) -> None:
        if self.watch is not None:
            self.watch.busy += 1

    def __exit__(self, *exc: object) -> None:
        if self.watch is not None:
            self.watch.busy -= 1


def bounded(owner: Sockets, conn: Any, seconds: float, what: str = "a call") -> until:
    """``with bounded(participant, conn, seconds) as watch:`` watches ``conn`` for the
    block: a call still running ``seconds`` from now is cut."""
    return until(owner, conn, time.monotonic() + seconds, what)


@contextlib.contextmanager
def waiting(owner: Sockets, what: str) -> Iterator[None]:
    """A wait with no socket to cut yet (a connect, bounded by its driver's timeout): only
    made visible to :func:`report_waits`."""
    watch = Watch(owner, None, math.inf, what)
    key = watch.key
    _waits[key] = watch
    if _thread is None:
        _start()
    elif _sleeping:
        _wake.set()
    try:
        yield
    finally:
        _waits.pop(key, None)


def report_waits(callback: Callable[[Wait], None] | None, after: float = 1.0) -> None:
    """Call ``callback`` (on the watchdog thread) once for every wait that has lasted
    ``after`` seconds, armed or not; None stops it. Used by the ``xatm`` command."""
    global _notify, _notice_after
    _notice_after = after
    _notify = callback


def cut(fd: int) -> None:
    """Shut a socket down by its file descriptor (a duplicate: the driver still owns and
    closes the original, whose reads then see the end of the stream)."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        raise
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


# -- the watchdog thread -----------------------------------------------------------------
def _start() -> None:
    global _thread
    with _start_lock:
        if _thread is None:
            thread = threading.Thread(target=_run, name="xatm-deadlines", daemon=True)
            thread.start()
            _thread = thread


#: scans with nothing armed before the thread sleeps until the next arm (so that a steady
#: load, whose table empties between transactions, never pays for waking it)
IDLE_SCANS = 50


def _run() -> None:
    global _sleeping
    idle = 0
    while True:
        time.sleep(TICK)
        if _armed or _waits:
            idle = 0
        else:
            idle += 1
            if idle >= IDLE_SCANS:
                _sleeping = True
                _wake.clear()
                if not _armed and not _waits:  # an arm after the flag was set wakes it
                    _wake.wait()
                _sleeping = False
                idle = 0
            continue
        try:
            _scan()
        except Exception:  # the thread must never die
            logger.exception("the deadline watchdog failed a scan")


def _scan() -> None:
    now = time.monotonic()
    overdue: list[Watch] = []
    notices: list[Wait] = []
    notify = _notify
    for watch in [*_armed.values(), *_waits.values()]:
        if watch.deadline <= now:
            if watch.busy and not watch.fired:
                overdue.append(watch)
        elif notify is not None and not watch.noticed and now - watch.since >= _notice_after:
            watch.noticed = True
            limit = None if math.isinf(watch.deadline) else watch.deadline - watch.since
            notices.append(Wait(watch.owner.name, watch.what, now - watch.since, limit))
    for watch in overdue:
        _fire(watch)
    if notify is not None:
        for notice in notices:
            try:
                notify(notice)
            except Exception:
                logger.debug("a wait notice failed", exc_info=True)


def _fire(watch: Watch) -> None:
    """Cut ``watch``'s connection if it is still watched by it and in a call (the handshake
    with :func:`disarm`: the connection cannot have been given back, closed and its
    descriptor reused meanwhile)."""
    if _armed.get(watch.key) is not watch or watch.fired or watch.done:
        return
    problem = None
    watch.firing = True
    try:
        conn = watch.conn
        if watch.done or not watch.busy or conn is None:
            return
        watch.fired = True
        fd = watch.fd
        try:
            current = watch.owner.socket_of(conn)
        except Exception:  # a driver that refuses to be asked during a call: open, then
            current = fd
        try:
            if current is None or current < 0 or (fd is not None and current != fd):
                # closed behind xatm's back (an application closing a connection it was
                # handed): its descriptor may be another socket's by now
                problem = "its socket cannot be found (is the connection closed?)"
            else:
                cut(current)
        except Exception as e:
            problem = f"shutting its socket down failed: {e}"
    finally:
        watch.firing = False
    late = time.monotonic() - watch.deadline
    if problem is None:
        logger.warning(
            "resource %r did not answer %s by its deadline (%.1f s ago): its connection was cut",
            watch.owner.name,
            watch.what,
            late,
            extra=log_fields(resource=watch.owner.name),
        )
    else:
        logger.error(
            "resource %r did not answer %s by its deadline (%.1f s ago), and %s: the call waits on",
            watch.owner.name,
            watch.what,
            late,
            problem,
            extra=log_fields(resource=watch.owner.name),
        )


def _after_fork() -> None:
    """A forked child has no watchdog thread: it starts its own on its first arm."""
    global _thread, _sleeping, _start_lock, _wake
    _thread = None
    _sleeping = False
    _start_lock = threading.Lock()
    _wake = threading.Event()
    _armed.clear()
    _waits.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
