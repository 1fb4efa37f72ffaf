"""The one sync and one asyncio runner of the participants' I/O-free branch operations.

An operation (``xatm.participants.postgres.operations``, ``xatm.participants.mysql.operations``)
is a generator: it yields commands, is sent each command's answer or has the error that
performing it raised thrown into it, and returns its result. A runner loops over that with
an executor, which performs one command on one connection (the only code that calls the
driver for these operations; it interprets nothing). ``start`` is ``run`` for a caller that
overlaps branches: it sends the first command the executor can put on the wire without
waiting, and returns a call that waits for that answer and runs the rest of the operation.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)
R = TypeVar("R")


class Executor(Protocol[C_contra]):
    """Performs an operation's commands on a connection, blocking."""

    def perform(self, conn: Any, command: C_contra) -> Any:
        """The answer to ``command``; raises what the driver raised."""


class Sender(Executor[C_contra], Protocol[C_contra]):
    """An executor that can also put a command on the wire without waiting."""

    def send(self, conn: Any, command: C_contra) -> Callable[[], Any] | None:
        """Send ``command`` and return a call that waits for its answer; None (nothing
        sent) for a command that is performed at once instead."""


class AsyncExecutor(Protocol[C_contra]):
    """Performs an operation's commands on an asyncio connection."""

    async def perform(self, conn: Any, command: C_contra) -> Any:
        """The answer to ``command``; raises what the driver raised."""


def run(executor: Executor[C], conn: Any, op: Generator[C, Any, R]) -> R:
    """Run the operation ``op`` on ``conn``: its result, or the error it raises."""
    return _resume(executor, conn, op, None, None)


async def arun(executor: AsyncExecutor[C], conn: Any, op: Generator[C, Any, R]) -> R:
    """``run`` on an asyncio connection."""
    try:
        command = next(op)
        while True:
            try:
                answer = await executor.perform(conn, command)
            except Exception as e:
                command = op.throw(e)
            else:
                command = op.send(answer)
    except StopIteration as stop:
        result: R = stop.value
        return result


def start(executor: Sender[C], conn: Any, op: Generator[C, Any, R]) -> Callable[[], R]:
    """Run ``op`` up to the first command ``executor`` can send without waiting, send it,
    and return a call that waits for its answer and runs the rest of ``op`` (its result,
    or its error). An operation that ends before is run whole now."""
    answer: Any = None
    error: Exception | None = None
    try:
        while True:
            command = op.send(answer) if error is None else op.throw(error)
            error = None
            try:
                wait = executor.send(conn, command)
                if wait is None:
                    answer = executor.perform(conn, command)
                    continue
            except Exception as e:
                error = e
                continue
            break
    except StopIteration as stop:
        done: R = stop.value
        return lambda: done
    sent = wait

    def finish() -> R:
        try:
            reply = sent()
        except Exception as e:
            return _resume(executor, conn, op, None, e)
        return _resume(executor, conn, op, reply, None)

    return finish


def _resume(
    executor: Executor[C],
    conn: Any,
    op: Generator[C, Any, R],
    answer: Any,
    error: Exception | None,
) -> R:
    """Send ``op`` ``answer`` (or throw ``error`` into it), then run it to its end."""
    perform = executor.perform
    try:
        command = op.send(answer) if error is None else op.throw(error)
        while True:
            try:
                answer = perform(conn, command)
            except Exception as e:
                command = op.throw(e)
            else:
                command = op.send(answer)
    except StopIteration as stop:
        result: R = stop.value
        return result
