"""The simulated world's scheduler: greenlets, a seeded order and a virtual clock.

Every simulated coordinator thread is a greenlet. A greenlet runs until it makes a simulated
I/O call (or sleeps, or waits on a simulated lock), which parks it until a virtual time; the
scheduler then resumes the parked greenlet with the earliest wake time (ties broken by the
seeded generator). Nothing here reads the real clock: one seed, one run.

A *process* groups greenlets: crashing it throws :class:`SimCrash` into each of them (so that
no further I/O of theirs happens: every seam raises it again for a dead process).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from greenlet import greenlet


class SimCrash(BaseException):
    """The simulated process died (SIGKILL): unwinds its greenlets, which do no more I/O."""


class Stuck(Exception):
    """The simulation makes no progress in virtual time (a livelock of the world)."""


class Proc:
    """A simulated OS process (a coordinator): its greenlets and its open things."""

    __slots__ = ("alive", "data", "fds", "host", "name", "paused_until", "tasks")

    def __init__(self, name: str, host: str) -> None:
        self.name = name
        self.host = host
        self.alive = True
        self.tasks: list[Task] = []
        self.fds: dict[int, Any] = {}  # real file descriptors it opened (crash: closed)
        self.data: dict[str, Any] = {}
        self.paused_until = 0.0  # SIGSTOP: its greenlets are not resumed before this

    def __repr__(self) -> str:
        return f"<Proc {self.name} {'alive' if self.alive else 'dead'}>"


class Task:
    """One greenlet, as the scheduler sees it."""

    __slots__ = ("done", "g", "name", "proc", "token", "waiting")

    def __init__(self, g: greenlet, proc: Proc | None, name: str) -> None:
        self.g = g
        self.proc = proc
        self.name = name
        self.token = 0  # bumped at each park: a stale heap entry is ignored
        self.done = False
        self.waiting: WaitQ | None = None


class WaitQ:
    """Greenlets parked until something happens (a lock released, an event set)."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def wake_all(self) -> None:
        sched = SCHED
        tasks, self.tasks = self.tasks, []
        for t in tasks:
            t.waiting = None
            sched.wake(t, sched.now)


class Sched:
    def __init__(self, seed: int) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self._heap: list[tuple[float, float, int, Any, int]] = []
        self._seq = 0
        self.main = greenlet.getcurrent()
        self.current: Task | None = None
        self.steps = 0

    # -- tasks --------------------------------------------------------------------------------
    def spawn(
        self, fn: Callable[[], Any], proc: Proc | None, name: str, at: float | None = None
    ) -> Task:
        def run() -> None:
            try:
                fn()
            except SimCrash:
                pass
            finally:
                task.done = True

        g = greenlet(run, parent=self.main)
        task = Task(g, proc, name)
        if proc is not None:
            proc.tasks.append(task)
        self.wake(task, self.now if at is None else at)
        return task

    def call_at(self, at: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the scheduler (not in a greenlet) at virtual time ``at``."""
        self._seq += 1
        heapq.heappush(self._heap, (at, self.rng.random(), self._seq, fn, -1))

    def wake(self, task: Task, at: float) -> None:
        task.token += 1
        self._seq += 1
        heapq.heappush(self._heap, (at, self.rng.random(), self._seq, task, task.token))

    # -- called inside a greenlet --------------------------------------------------------------
    def _park(self) -> None:
        task = self.current
        assert task is not None, "a simulated wait outside a simulated greenlet"
        self.main.switch()
        # resumed: a crash of the process is thrown in by the scheduler instead
        proc = task.proc
        if proc is not None and not proc.alive:
            raise SimCrash()

    def sleep(self, dt: float) -> None:
        task = self.current
        if task is None:
            raise RuntimeError("simulated sleep outside the simulation")
        proc = task.proc
        if proc is not None and not proc.alive:
            raise SimCrash()
        self.wake(task, self.now + max(dt, 0.0))
        self._park()

    def wait(self, q: WaitQ, timeout: float | None) -> None:
        """Park on ``q`` until woken or ``timeout`` seconds pass (the caller re-checks)."""
        task = self.current
        if task is None:
            raise RuntimeError("simulated wait outside the simulation")
        proc = task.proc
        if proc is not None and not proc.alive:
            raise SimCrash()
        q.tasks.append(task)
        task.waiting = q
        task.token += 1
        if timeout is not None:
            self.wake(task, self.now + max(timeout, 0.0))
        try:
            self._park()
        finally:
            if task.waiting is q:
                task.waiting = None
                if task in q.tasks:
                    q.tasks.remove(task)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        heap = self._heap
        same = 0
        last = -1.0
        while heap:
            at, _, _, obj, token = heap[0]
            if at > until:
                self.now = until
                return
            heapq.heappop(heap)
            if token == -1:
                self.now = max(self.now, at)
                obj()
                continue
            task: Task = obj
            if task.done or token != task.token:
                continue
            self.now = max(self.now, at)
            if self.now == last:
                same += 1
                if same > 200_000:
                    raise Stuck(f"no virtual time passes: {task.name} keeps running at {at}")
            else:
                same, last = 0, self.now
            proc = task.proc
            if proc is not None and proc.paused_until > self.now:
                self.wake(task, proc.paused_until)
                continue
            self.steps += 1
            self.current = task
            try:
                task.g.switch()
            finally:
                self.current = None
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

    def kill(self, proc: Proc) -> None:
        """Crash ``proc``: every greenlet of it unwinds with SimCrash (no more I/O)."""
        proc.alive = False
        for task in list(proc.tasks):
            if task.done:
                continue
            if task.waiting is not None:
                if task in task.waiting.tasks:
                    task.waiting.tasks.remove(task)
                task.waiting = None
            task.token += 1  # its heap entries are stale now
            if task is self.current:
                continue  # the caller raises SimCrash in it
            prev = self.current
            self.current = task
            try:
                if task.g:  # started: throw into it; never started: just drop it
                    task.g.throw(SimCrash())
                else:
                    task.done = True
            finally:
                self.current = prev
        proc.tasks = [t for t in proc.tasks if not t.done]


#: the scheduler of the run in progress (one per worker process at a time)
SCHED: Sched = None  # type: ignore[assignment]


def current_proc() -> Proc | None:
    s = SCHED
    if s is None or s.current is None:
        return None
    return s.current.proc
