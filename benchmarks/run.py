"""The benchmark command: ``python -m benchmarks.run`` (``make bench``).

Starts a private durable PostgreSQL and MariaDB (or uses ``--pg-url``/``--mysql-url``),
creates the account tables, then for each client count runs every mode once per round, in
an order rotated each round so that drift (caches, checkpoints, disk) hits every mode alike.
After every run the books are checked. The C-extension modes are skipped, with the reason
in the report, where mysql-connector's C extension does not load; the multi-process modes
run at the client counts of at least ``--processes`` (one thread per process at least).
Prints the Markdown table, writes it into ``docs/benchmarks.md`` (``--doc``), and optionally
JSON (``--json``) and a plot (``--plot``).
Exit status: 0, 1 if the books did not balance, 2 on a usage error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .catalog import MODES
from .driver import run_once
from .env import BenchServers, ConservationError, Ledger, cext_unavailable
from .modes import RunContext, needs_cext
from .mp import is_multiprocess
from .report import plot, render, summarize, to_json, write_doc
from .results import RunResult
from .servermeter import ServerMeter

DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,8,32, got {text!r}")
    return values


def _mode_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or text!r}; known: {', '.join(MODES)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Transfer benchmark: PostgreSQL debit + MariaDB credit, per commit mode.",
    )
    p.add_argument(
        "--clients",
        type=_int_list,
        help="client counts (default 1,8,32,48): threads, asyncio tasks, or for the"
        " multi-process modes threads in all processes together",
    )
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 4)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1)")
    p.add_argument("--rounds", type=int, help="rounds per client count (default 2)")
    p.add_argument(
        "--processes",
        type=int,
        help="coordinator processes of the multi-process modes (default 2)",
    )
    p.add_argument("--modes", type=_mode_list, help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--accounts", type=int, help="accounts per side (default 10000)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput vs clients here")
    p.add_argument(
        "--doc",
        default=str(DEFAULT_DOC),
        help="Markdown file whose results section is replaced ('-' for none;"
        " default docs/benchmarks.md, or none with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny runs (for the smoke test)")
    p.add_argument("--pg-url", help="use this PostgreSQL database instead of a private one")
    p.add_argument("--mysql-url", help="use this MariaDB/MySQL database instead")
    p.add_argument(
        "--log-url",
        help="PostgreSQL database of xatm-mp-shared's shared log (default: a database"
        " benchlog on the private server, or --pg-url's database)",
    )
    p.add_argument("--table", default="bench_acc", help="account table name (default bench_acc)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "clients": [1, 2] if quick else [1, 8, 32, 48],
        "seconds": 0.3 if quick else 4.0,
        "warmup": 0.1 if quick else 1.0,
        "rounds": 1 if quick else 2,
        "processes": 2,
        "modes": list(MODES),
        "accounts": 200 if quick else 10_000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick and args.doc == str(DEFAULT_DOC):
        args.doc = "-"
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0 or args.processes < 1:
        p.error("--rounds and --processes must be >= 1, --seconds > 0 and --warmup >= 0")
    if args.accounts < 2 * max(args.clients):
        p.error(f"--accounts must be at least twice the largest client count ({max(args.clients)})")
    if (args.pg_url is None) != (args.mysql_url is None):
        p.error("give both --pg-url and --mysql-url, or neither")
    if not args.table.isidentifier():
        p.error(f"--table {args.table!r} is not a plain identifier")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def skipped_modes(args: argparse.Namespace) -> dict[str, str]:
    """Modes asked for that cannot run here at all: name -> why."""
    why = cext_unavailable()
    return {m: why for m in args.modes if needs_cext(m) and why is not None}


def runs_at(mode: str, clients: int, processes: int) -> bool:
    """A multi-process mode needs at least one client thread per process."""
    return not is_multiprocess(mode) or clients >= processes


def measure(args: argparse.Namespace, servers: BenchServers) -> tuple[list[RunResult], list[str]]:
    """Every round of every mode at every client count; checks the books after each run."""
    assert servers.urls is not None
    ledger = Ledger(servers.urls, args.table, args.accounts)
    ledger.create()
    meter = ServerMeter(servers.urls, servers.server_pids())
    workdir = Path(tempfile.mkdtemp(prefix="xatm-bench-work-"))
    results: list[RunResult] = []
    books: list[str] = []
    skipped = skipped_modes(args)
    modes: list[str] = [m for m in args.modes if m not in skipped]
    try:
        for clients in args.clients:
            ctx = RunContext(servers.urls, args.table, clients, workdir, args.processes)
            here = [m for m in modes if runs_at(m, clients, args.processes)]
            for round_no in range(args.rounds):
                shift = round_no % len(here) if here else 0
                for name in here[shift:] + here[:shift]:
                    result = run_once(
                        name,
                        MODES[name],
                        ctx,
                        accounts=args.accounts,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        round_no=round_no,
                        meter=meter,
                    )
                    results.append(result)
                    what = f"{name} x{clients} round {round_no + 1}"
                    try:
                        books.append(ledger.check(result.committed_total, what))
                    except ConservationError as e:
                        books.append(f"NOT conserved: {e}")
                        _progress(f"!! {e}")
                    _progress(
                        f"{what}: {result.throughput:8.1f} tx/s"
                        f" ({result.transactions} tx, {result.errors} errors)"
                        + (f" first error: {result.first_error}" if result.first_error else "")
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not servers.private:
            ledger.drop()
    return results, books


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {
        "clients": ",".join(map(str, args.clients)),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "accounts per side": args.accounts,
        "modes": ",".join(args.modes),
        "processes (multi-process modes)": args.processes,
        "xatm log": "temp dir on the servers' disk (xatm-mp-shared: PostgreSQL, --log-url)",
    }
    skipped = skipped_modes(args)
    for mode, why in skipped.items():
        _progress(f"skipping {mode}: {why}")
    notes = [f"`{m}` not run: {why}." for m, why in skipped.items()]
    if any(is_multiprocess(m) for m in args.modes) and min(args.clients) < args.processes:
        notes.append(
            f"The multi-process modes ran only at client counts of at least {args.processes}"
            f" (--processes: one client thread per process at least)."
        )
    load0 = os.getloadavg()[0]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    try:
        _progress("starting servers..." if args.pg_url is None else "using the given servers")
        with BenchServers(args.pg_url, args.mysql_url, args.log_url) as servers:
            info = servers.describe()
            results, books = measure(args, servers)
    except KeyboardInterrupt:
        _progress("interrupted: servers stopped and removed")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    settings["total run time"] = f"{time.monotonic() - started:.0f} s"
    settings["1-min load average at start/end"] = f"{load0:.1f}/{os.getloadavg()[0]:.1f}"
    summaries = summarize(results)
    section = render(summaries, args.modes, info, settings, books, notes)
    print(section)
    if args.doc != "-":
        write_doc(Path(args.doc), section)
        _progress(f"results written to {args.doc}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = to_json(results, summaries, info, settings, books, notes)
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        _progress(f"JSON written to {args.json}")
    if args.plot is not None:
        _progress(plot(summaries, args.modes, args.plot, f"{info['date']}, {info['cores']} cores"))
    balanced = not any(b.startswith("NOT") for b in books)
    if not balanced:
        _progress("FAILED: the books did not balance (see above)")
    return 0 if balanced else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
