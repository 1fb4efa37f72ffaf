"""Multi-process modes: N coordinator processes, each with its own node_id and manager.

* ``raw-mp``          N processes of ``raw`` (hand-written 2PC): the baseline
* ``xatm-mp``         N processes of ``xatm``, each its own ``TransactionManager`` and
                      node_id (``bench-mp0``, ``bench-mp1``...), sharing ONE log directory
                      (the file log keeps one subdirectory per node)
* ``xatm-mp-shared``  the same on the shared PostgreSQL log (``log=`` a PostgreSQL URL:
                      one ``decisions`` table for every node; ``--log-url``, by default a
                      database ``benchlog`` on the private PostgreSQL server)

``--clients`` is the *total* number of client threads, spread evenly over ``--processes``
processes (8 clients, 2 processes: 4 threads each), so a multi-process mode is compared
with the single-process modes at the same concurrency. Each thread keeps its own account
partition over the total (as in ``benchmarks.driver``).

The children (``python -m benchmarks.mp_child``) are started with ``subprocess`` in a
session of their own (a terminal's Ctrl-C reaches only the harness) and driven over their
stdin/stdout: spec -> "ready" (clients connected and running) -> "start" (window opens:
each child reads its own ``process_time``) -> "stop" -> the child's result as JSON. The
harness sums the children's transactions, CPU time and log fsyncs. EOF on a child's stdin
(the harness gone, or giving up) makes it stop its clients, close its manager and exit;
one that does not is terminated, then killed, by its pid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from .env import PURE
from .modes import Client, RunContext
from .results import RunResult

_ids = itertools.count(1)

#: mode name -> what each child runs
KINDS = {"raw-mp": "raw", "xatm-mp": "xatm", "xatm-mp-shared": "xatm-shared"}

#: seconds a child may take to connect its clients and open its manager
READY_TIMEOUT = 120.0
#: seconds a child may take to stop its clients and report, once told to stop
REPORT_TIMEOUT = 60.0

_ROOT = Path(__file__).resolve().parent.parent


def split(clients: int, processes: int) -> list[int]:
    """Client threads per process: ``clients`` spread over ``processes`` (none empty)."""
    n = max(1, min(clients, processes))
    return [clients // n + (1 if i < clients % n else 0) for i in range(n)]


def merge(name: str, clients: int, round_no: int, parts: list[RunResult]) -> RunResult:
    """One result for the whole run: transactions, CPU and log fsyncs summed over the
    processes; the window is their mean (they open and close within milliseconds)."""
    forces = [p.log_forces for p in parts if p.log_forces is not None]
    records = [p.log_records for p in parts if p.log_records is not None]
    errors = [p.first_error for p in parts if p.first_error]
    return RunResult(
        mode=name,
        clients=clients,
        round=round_no,
        window=sum(p.window for p in parts) / len(parts),
        transactions=sum(p.transactions for p in parts),
        errors=sum(p.errors for p in parts),
        latencies_ms=tuple(x for p in parts for x in p.latencies_ms),
        cpu_seconds=sum(p.cpu_seconds for p in parts),
        log_forces=sum(forces) if forces else None,
        log_records=sum(records) if records else None,
        committed_total=sum(p.committed_total for p in parts),
        first_error=errors[0] if errors else None,
        mysql=parts[0].mysql,
        processes=len(parts),
    )


class ChildFailed(RuntimeError):
    """A child process did not answer as the protocol says (its stderr's tail attached)."""


class _Child:
    """One child process: its pid, pipes and stderr file."""

    def __init__(self, errfile: Path) -> None:
        self.errfile = errfile
        self.err = errfile.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.mp_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            cwd=_ROOT,
            start_new_session=True,  # Ctrl-C in a terminal reaches only the harness
        )

    def send(self, line: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        try:
            assert stdin is not None
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.failed(f"could not send {line[:20]!r}") from None

    def read(self, deadline: float, what: str) -> str:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise self.failed(f"no {what} in time")
        line = stdout.readline().decode()
        if not line.endswith("\n"):
            raise self.failed(f"exited instead of sending {what}")
        return line.rstrip("\n")

    def failed(self, why: str) -> ChildFailed:
        self.err.flush()
        tail = self.errfile.read_text(errors="replace")[-2000:]
        return ChildFailed(f"benchmark child pid {self.proc.pid}: {why}; its stderr:\n{tail}")

    def stop(self) -> None:
        """Ask it to finish (EOF), then terminate and kill it by pid if it does not."""
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for sig_wait, action in ((15.0, proc.terminate), (5.0, proc.kill), (5.0, None)):
            try:
                proc.wait(sig_wait)
                break
            except subprocess.TimeoutExpired:
                if action is not None:
                    action()
        if proc.stdout is not None:
            proc.stdout.close()
        self.err.close()


class MultiProcessMode:
    """A mode run as ``ctx.processes`` child processes (see the module docstring)."""

    mysql_kind = PURE

    def __init__(self, ctx: RunContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.run_dir = ctx.workdir / f"mp-{kind}-{next(_ids)}"

    def client(self) -> Client:
        raise TypeError("a multi-process mode runs its clients in child processes")

    def log_counters(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spec(self, index: int, threads: int, offset: int, **run: Any) -> dict[str, Any]:
        ctx = self.ctx
        log: str | None = None
        if self.kind == "xatm":
            log = str(self.run_dir / "log")  # one directory, one subdirectory per node
        elif self.kind == "xatm-shared":
            log = ctx.urls.shared_log
        return {
            "kind": self.kind,
            "urls": asdict(ctx.urls),
            "table": ctx.table,
            "workdir": str(self.run_dir),
            "node_id": f"bench-mp{index}",
            "log": log,
            "threads": threads,
            "first_index": offset,
            "total_clients": ctx.clients,
            **run,
        }

    def measure(
        self,
        name: str,
        *,
        accounts: int,
        seconds: float,
        warmup: float,
        round_no: int,
        during_window: Callable[[float], None] | None,
    ) -> RunResult:
        """Start the children, open and close their window together, merge their results."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        children: list[_Child] = []
        try:
            offset = 0
            for i, threads in enumerate(split(self.ctx.clients, self.ctx.processes)):
                spec = self._spec(i, threads, offset, accounts=accounts, round_no=round_no)
                children.append(_Child(self.run_dir / f"child-{i}.stderr"))
                children[-1].send(json.dumps(spec))
                offset += threads
            deadline = time.monotonic() + READY_TIMEOUT
            for child in children:
                if child.read(deadline, '"ready"') != "ready":
                    raise child.failed('expected "ready"')
            time.sleep(warmup)
            for child in children:
                child.send("start")
            if during_window is None:
                time.sleep(seconds)
            else:
                during_window(seconds)
            for child in children:
                child.send("stop")
            deadline = time.monotonic() + REPORT_TIMEOUT
            parts = [_result(json.loads(c.read(deadline, "its result"))) for c in children]
        finally:
            for child in children:
                child.stop()
        return merge(name, self.ctx.clients, round_no, parts)


def _result(data: dict[str, Any]) -> RunResult:
    data["latencies_ms"] = tuple(data["latencies_ms"])
    return RunResult(**data)


def mp_mode(name: str) -> Callable[[RunContext], MultiProcessMode]:
    def factory(ctx: RunContext) -> MultiProcessMode:
        return MultiProcessMode(ctx, KINDS[name])

    return factory


def is_multiprocess(mode: str) -> bool:
    return mode in KINDS


#: the multi-process modes by name
MODES = {name: mp_mode(name) for name in KINDS}

__all__ = ["MODES", "MultiProcessMode", "is_multiprocess", "merge", "split"]
