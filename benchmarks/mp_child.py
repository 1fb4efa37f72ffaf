"""One child process of a multi-process benchmark mode (``benchmarks.mp``).

Reads its spec (one JSON line) on stdin, sets its mode up (``raw``: hand-written 2PC;
``xatm``: a ``TransactionManager`` with its own node_id and the given log directory or
PostgreSQL log URL) and runs its client threads. Then, on stdout: "ready" once they run;
on stdin "start" opens the window (its own ``time.process_time()``), "stop" closes it;
its result goes back as one JSON line and it exits. EOF on stdin at any point: the
clients stop, the manager is closed, the process exits (status 3 before the window).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from .driver import run_clients
from .env import Urls
from .modes import Mode, RawMode, RunContext, XatmMode


class Abandoned(Exception):
    """The harness closed our stdin before the window opened."""


def make_mode(spec: dict[str, Any]) -> Mode:
    ctx = RunContext(Urls(**spec["urls"]), spec["table"], spec["threads"], Path(spec["workdir"]))
    if spec["kind"] == "raw":
        return RawMode(ctx)
    return XatmMode(ctx, node_id=spec["node_id"], log=spec["log"])


def main() -> int:
    out: IO[str] = sys.stdout
    sys.stdout = sys.stderr  # nothing but the protocol goes to the harness
    spec = json.loads(sys.stdin.readline())

    def expect(word: str) -> None:
        line = sys.stdin.readline()
        if line.strip() != word:
            raise Abandoned(f"expected {word!r}, got {line!r}")

    def ready() -> None:
        out.write("ready\n")
        out.flush()
        expect("start")

    def window(seconds: float) -> None:
        with contextlib.suppress(Abandoned):  # EOF: the window ends, the result is unread
            expect("stop")

    mode = make_mode(spec)
    try:
        result = run_clients(
            f"{spec['kind']}-child",
            mode,
            clients=spec["threads"],
            accounts=spec["accounts"],
            seconds=0.0,
            warmup=0.0,
            round_no=spec["round_no"],
            during_window=window,
            before_window=ready,
            first_index=spec["first_index"],
            total_clients=spec["total_clients"],
        )
    except Abandoned:
        return 3
    finally:
        mode.close()
    try:
        out.write(json.dumps(asdict(result)) + "\n")
        out.flush()
    except BrokenPipeError:
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
