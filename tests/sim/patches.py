"""Every point where the simulator replaces real I/O under xatm's real code, in one place.

:func:`install` runs in a simulator worker process *before* xatm is imported:

* ``threading.Lock / Event / Condition / Thread / current_thread``: greenlet-aware versions
  (a contended lock parks the greenlet; a thread is a greenlet of the current simulated
  process; ``current_thread`` names the greenlet, so ``xatm.transactions.ambient`` tells them
  apart);
* ``time.monotonic / time.time / time.sleep``: the virtual clock;
* ``xatm.core.deadline``: no watchdog thread; the simulated network fires a watch (sets
  ``watch.fired``, as the watchdog's cut does) when a call blocks past its deadline;
* ``xatm.core.xid``: the gtrids' random bits and the incarnations from the seeded generator;
* ``os`` in the file log's modules (``xatm.log.file.{segments,writer,reader,salvage}``, the
  side files, retention, the saga store) and ``write_at`` where the writer calls it: writes
  are real (a temporary directory) but an ``fsync`` only marks what is durable; a crash
  throws away (or tears) what was written after the last ``fsync`` of each file, and closes
  the process's descriptors (its flocks go);
* ``xatm.node.identity.ThreadPoolExecutor``: runs the map in the calling greenlet.
"""

from __future__ import annotations

import contextlib
import itertools
import os as real_os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tests.sim import sched as S

_real_lock = threading.Lock
_real_current_thread = threading.current_thread
_real_sleep = time.sleep
_real_monotonic = time.monotonic
_real_time = time.time

EPOCH = 1_790_000_000.0  # the virtual clock's time.time() at t=0


class SimLock:
    """``threading.Lock`` for greenlets: a contended acquire parks the greenlet."""

    __slots__ = ("_held", "_q")

    def __init__(self) -> None:
        self._held = False
        self._q: S.WaitQ | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._held:
            self._held = True
            return True
        if not blocking:
            return False
        sched = S.SCHED
        if sched is None or sched.current is None:
            raise RuntimeError("a simulated lock is contended outside a simulated greenlet")
        limit = None if timeout is None or timeout < 0 else sched.now + timeout
        if self._q is None:
            self._q = S.WaitQ()
        while self._held:
            if limit is not None and sched.now >= limit:
                return False
            sched.wait(self._q, None if limit is None else limit - sched.now)
        self._held = True
        return True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release unlocked lock")
        self._held = False
        q = self._q
        if q is not None and q.tasks:
            q.wake_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # threading.Condition asks these of its lock
    def _is_owned(self) -> bool:
        return self._held


class SimCondition:
    def __init__(self, lock: Any = None) -> None:
        self._lock = lock if lock is not None else SimLock()
        self._q = S.WaitQ()
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self) -> Any:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def wait(self, timeout: float | None = None) -> bool:
        sched = S.SCHED
        if sched is None or sched.current is None:
            raise RuntimeError("a simulated condition waited on outside the simulation")
        self._lock.release()
        try:
            sched.wait(self._q, timeout)
        finally:
            self._lock.acquire()
        return True

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        while not predicate():
            self.wait(timeout)
            if timeout is not None:
                return predicate()
        return True

    def notify(self, n: int = 1) -> None:
        self._q.wake_all()

    def notify_all(self) -> None:
        self._q.wake_all()


class SimEvent:
    def __init__(self) -> None:
        self._flag = False
        self._q = S.WaitQ()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        self._q.wake_all()

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        sched = S.SCHED
        if sched is None or sched.current is None:
            raise RuntimeError("a simulated event waited on outside the simulation")
        limit = None if timeout is None else sched.now + timeout
        while not self._flag:
            if limit is not None and sched.now >= limit:
                return False
            sched.wait(self._q, None if limit is None else limit - sched.now)
        return True


class SimThread:
    """A thread of the current simulated process: a greenlet."""

    def __init__(
        self,
        group: Any = None,
        target: Callable[..., Any] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        self._target = target
        self._args = tuple(args)
        self._kwargs = kwargs or {}
        self.name = name or "sim-thread"
        self.daemon = daemon
        self._task: S.Task | None = None
        self._done = SimEvent()

    def start(self) -> None:
        sched = S.SCHED

        def run() -> None:
            try:
                if self._target is not None:
                    self._target(*self._args, **self._kwargs)
            finally:
                self._done.set()

        self._task = sched.spawn(run, S.current_proc(), self.name)
        _THREADS[self._task] = self

    def join(self, timeout: float | None = None) -> None:
        if self._task is None or self._task.done:
            return
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done


_THREADS: dict[S.Task, SimThread] = {}
_MAIN = object()


class _GreenletThread:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_names: dict[S.Task, _GreenletThread] = {}


def current_thread() -> Any:
    sched = S.SCHED
    if sched is None or sched.current is None:
        return _real_current_thread()
    task = sched.current
    found = _THREADS.get(task)
    if found is not None:
        return found
    named = _names.get(task)
    if named is None:
        named = _names[task] = _GreenletThread(task.name)
    return named


# -- time ----------------------------------------------------------------------------------
def monotonic() -> float:
    sched = S.SCHED
    return _real_monotonic() if sched is None else 1000.0 + sched.now


def wall() -> float:
    sched = S.SCHED
    return _real_time() if sched is None else EPOCH + sched.now


def sleep(seconds: float) -> None:
    sched = S.SCHED
    if sched is None or sched.current is None:
        _real_sleep(seconds)
        return
    sched.sleep(seconds)


class _SyncExecutor:
    """``ThreadPoolExecutor`` for ``xatm.node.identity.acquire``: the map runs here, in turn."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __enter__(self) -> _SyncExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return iter([fn(i) for i in items])


# -- the coordinator log's files -----------------------------------------------------------
class Disk:
    """What each simulated process wrote to its log files and did not fsync yet."""

    def __init__(self) -> None:
        #: fd -> [(offset, length)] written since its last fsync
        self.unsynced: dict[int, list[tuple[int, int]]] = {}
        self.crash_hook: Callable[[str], None] | None = None  # the world's "crash here?"

    def crash(self, proc: S.Proc, rng: Any) -> None:
        """SIGKILL of ``proc``: lose or tear what it wrote since each file's last fsync,
        then close its descriptors (releasing its flocks)."""
        for fd in list(proc.fds):
            for offset, length in self.unsynced.pop(fd, ()):
                fate = rng.random()
                if fate < 0.4:
                    continue  # the page cache got it to disk anyway
                keep = 0 if fate < 0.8 else rng.randrange(length)
                try:
                    if offset + length >= real_os.fstat(fd).st_size:
                        real_os.ftruncate(fd, offset + keep)  # an append: cut (or torn)
                    else:
                        real_os.pwrite(fd, b"\0" * (length - keep), offset + keep)
                except OSError:
                    pass
            with contextlib.suppress(OSError):
                real_os.close(fd)
        proc.fds.clear()


DISK = Disk()


def _check_alive() -> S.Proc | None:
    proc = S.current_proc()
    if proc is not None and not proc.alive:
        raise S.SimCrash()
    return proc


class _SimOS:
    """``os`` as ``xatm.log.file`` sees it (everything else passes through)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(real_os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        proc = _check_alive()
        fd = real_os.open(path, flags, mode, **kw)
        if proc is not None:
            proc.fds[fd] = path
        return fd

    def close(self, fd: int) -> None:
        proc = _check_alive()
        if proc is not None:
            proc.fds.pop(fd, None)
        DISK.unsynced.pop(fd, None)
        real_os.close(fd)

    def write(self, fd: int, data: bytes) -> int:
        _check_alive()
        return real_os.write(fd, data)

    def fsync(self, fd: int) -> None:
        proc = _check_alive()
        hook = DISK.crash_hook
        if hook is not None and proc is not None and DISK.unsynced.get(fd):
            hook("fsync")  # may crash the process here: written, not yet durable
        DISK.unsynced.pop(fd, None)

    def fdatasync(self, fd: int) -> None:
        self.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        _check_alive()
        real_os.ftruncate(fd, length)

    def replace(self, a: Any, b: Any) -> None:
        _check_alive()
        real_os.replace(a, b)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    _check_alive()
    view = memoryview(data)
    at = offset
    while view:
        n = real_os.pwrite(fd, view, at)
        view = view[n:]
        at += n
    DISK.unsynced.setdefault(fd, []).append((offset, len(data)))


def _no_watchdog() -> None:
    """``xatm.core.deadline._start``: no thread; the simulated network fires the watches."""
    import xatm.core.deadline as d

    d._thread = _MAIN  # type: ignore[assignment]


_installed = False


def install() -> None:
    """Patch the standard library (before xatm is imported), then xatm's seams."""
    global _installed
    if _installed:
        return
    _installed = True
    # libraries that make threads or locks at import: imported with the real ones
    import concurrent.futures.thread  # noqa: F401

    import psycopg  # noqa: F401

    with contextlib.suppress(ImportError):
        import mysql.connector  # noqa: F401
    threading.Lock = SimLock  # type: ignore[misc,assignment]
    threading.Event = SimEvent  # type: ignore[misc,assignment]
    threading.Condition = SimCondition  # type: ignore[misc,assignment]
    threading.Thread = SimThread  # type: ignore[misc,assignment]
    threading.current_thread = current_thread
    time.monotonic = monotonic
    time.time = wall
    time.sleep = sleep

    import importlib

    import xatm.core.deadline as deadline
    import xatm.node.identity as identity

    for name in FILE_MODULES:
        _set(importlib.import_module(name), "os", _SimOS())
    import xatm.sagas.barrier as barrier

    # the barrier table is there from the start (its DDL opens a real driver's connection)
    _set(barrier, "ensure_table", lambda name, spec: None)
    deadline._start = _no_watchdog
    deadline._thread = _MAIN  # type: ignore[assignment]
    for name in WRITE_AT_MODULES:
        module = importlib.import_module(name)
        _set(module, "write_at", _write_at)
        _set(module, "preallocate", lambda fd, size: None)
    _set(identity, "ThreadPoolExecutor", _SyncExecutor)


#: every xatm module the simulated processes reach that opens, writes or fsyncs a file: its
#: ``os`` is replaced (a module global set on the package ``xatm.log.file`` would reach none
#: of its modules; tests/sim/test_sim.py checks that no such module is missing here)
FILE_MODULES = (
    "xatm.log.file.reader",
    "xatm.log.file.retention",
    "xatm.log.file.salvage",
    "xatm.log.file.segments",
    "xatm.log.file.writer",
    "xatm.log.incarnations",
    "xatm.log.node_markers",
    "xatm.log.saga_journal",
    "xatm.log.saga_state",
    "xatm.log.timelines",
)
#: the modules that call ``write_at`` and ``preallocate`` (the writer imports them by name)
WRITE_AT_MODULES = ("xatm.log.file.segments", "xatm.log.file.writer")
#: modules that write files with the real ``os``: the audit trail (not part of what a crash
#: may lose), and what the simulator never runs (the doctor, the command line)
REAL_FILES = ("xatm.log.audit", "xatm.ops.doctor", "xatm.cli.main", "xatm.cli.daemon")


def _set(module: Any, name: str, value: Any) -> None:
    """Replace ``module.name``; a name the module no longer has is a stale patch point (a
    patch that would silently do nothing), so it fails the run instead."""
    if not hasattr(module, name):
        raise RuntimeError(f"stale patch point: {module.__name__}.{name} does not exist")
    setattr(module, name, value)


def reseed(rng: Any) -> None:
    """Per run: the gtrids' random bits and sequence from the run's generator."""
    import xatm.core.xid as xid

    xid._random.seed(rng.getrandbits(64))
    xid._sequence = itertools.count(rng.randrange(1 << 16))
    import random

    import xatm.log.saga_journal as saga_journal
    import xatm.log.saga_record as saga_record
    import xatm.log.saga_state as saga_store

    ids = _Secrets(random.Random(rng.getrandbits(64)))
    for module in (saga_store, saga_record, saga_journal):
        module.secrets = ids  # type: ignore[assignment]
    S_THREADS_RESET()


class _Secrets:
    """``secrets`` as the saga store's modules see it: saga and journal ids from the run's
    generator."""

    def __init__(self, rng: Any) -> None:
        self._rng = rng

    def token_hex(self, n: int) -> str:
        return f"{self._rng.getrandbits(8 * n):0{2 * n}x}"


def S_THREADS_RESET() -> None:
    """Forget what an earlier run in this worker left in xatm's process-wide tables."""
    import xatm.core.deadline as deadline

    _THREADS.clear()
    _names.clear()
    deadline._armed.clear()
    deadline._waits.clear()
    DISK.unsynced.clear()
