"""Micro-costs behind xatm's per-transaction overhead: ``python -m benchmarks.micro``.

Single-threaded, against private servers (or ``--pg-url``/``--mysql-url``): the wall and
CPU time of the driver calls xatm makes, next to cheaper ways to make the same calls, so
that the gains of the recommendations in ``docs/benchmarks.md`` can be estimated:

* MariaDB: a statement through a new cursor per statement (what xatm's first version did),
  through one reused cursor, and through ``connection.cmd_query`` (no cursor);
* PostgreSQL: one statement; the gid composed with ``psycopg.sql`` vs pre-quoted text; two
  statements in a pipeline (xatm's prepare) vs two statements in one simple-query string vs
  one statement alone;
* threads: handing a no-op to a ``ThreadPoolExecutor`` and waiting for it (the first
  version's fan-out of the branches; they are now overlapped on one thread, ``xatm.core.parallel``);
* ``xatm.core.xid.new_gtrid``;
* the file log's forced COMMIT (write + fsync in a preallocated segment), next to the same
  bytes appended and fsynced to a growing file;
* the client-side deadline (``xatm.core.deadline``): arming and disarming a connection's watch
  (a branch's, once per branch), marking a call in flight on it (once per call), and a
  ``bounded`` block, on a PostgreSQL and a MariaDB connection; the watchdog thread running;
* the event hooks of one two-branch transaction (``xatm.core.events``: a timeline, its phase marks
  and six branch operations through the watched participants), with nobody listening, with
  the Prometheus collector listening, and with OpenTelemetry spans (SDK, no exporter). The
  participants here do nothing, so only the hooks' own cost is measured.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from psycopg import sql

from xatm.admin import parse_url
from xatm.core import deadline as _deadline
from xatm.core import events as _events
from xatm.core.participant import PhaseTwo, Prepared, Vote
from xatm.core.records import LogRecord
from xatm.core.xid import branch_xid, new_gtrid
from xatm.log.file import FileLog
from xatm.participants.adapters import make_participant

from .env import BenchServers, mysql_connect, pg_connect
from .modes import listen


def measure(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call, after a short warm-up."""
    for _ in range(min(50, n)):
        fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - w0) / n, 1e6 * (time.process_time() - c0) / n


class _Idle:
    """A participant that does nothing: what remains is the cost of xatm's hooks."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.spec = name, parse_url(url)
        self.kind = self.spec.kind

    def begin(self, conn: Any, xid: Any, timeout: float | None = None) -> None:
        pass

    def start_prepare(self, conn: Any, xid: Any) -> Callable[[], Prepared]:
        return lambda: Prepared(Vote.PREPARED)

    def start_commit_prepared(self, conn: Any, xid: Any) -> Callable[[], PhaseTwo]:
        return lambda: PhaseTwo.DONE


class _Committed:
    value = "committed"


def transaction_hooks() -> None:
    """The hooks of one two-branch transaction, in the order the protocol runs them."""
    gtrid = "xatm.bench.0000000000000000000000000000"
    timeline = _events.timeline("bench", gtrid)
    watched = [timeline.watch(p) for p in _PARTICIPANTS]  # type: ignore[arg-type]
    xids = [branch_xid(gtrid, p.name) for p in watched]
    for p, xid in zip(watched, xids, strict=True):
        p.begin(None, xid)
    timeline.phase("prepare")
    for p, xid in zip(watched, xids, strict=True):
        p.start_prepare(None, xid)()
    timeline.phase("decide")
    timeline.phase("commit")
    for p, xid in zip(watched, xids, strict=True):
        p.start_commit_prepared(None, xid)()
    timeline.finish(_Committed())


def bare_calls() -> None:
    """The same participant calls as :func:`transaction_hooks`, with no hook at all."""
    gtrid = "xatm.bench.0000000000000000000000000000"
    xids = [branch_xid(gtrid, p.name) for p in _PARTICIPANTS]
    for p, xid in zip(_PARTICIPANTS, xids, strict=True):
        p.begin(None, xid)
    for p, xid in zip(_PARTICIPANTS, xids, strict=True):
        p.start_prepare(None, xid)()
    for p, xid in zip(_PARTICIPANTS, xids, strict=True):
        p.start_commit_prepared(None, xid)()


_PARTICIPANTS = [
    _Idle("pg", "postgresql://u@127.0.0.1:5432/db"),
    _Idle("maria", "mysql://u@127.0.0.1:3306/db"),
]


def hook_rows(n: int) -> list[tuple[str, float, float]]:
    restore = listen("none")
    try:
        rows = [("a 2-branch transaction's participant calls, no hooks", *measure(bare_calls, n))]
    finally:
        restore()
    for exporter, label in (
        ("none", "nobody listening"),
        ("prometheus", "Prometheus collector"),
        ("otel", "OpenTelemetry spans, SDK"),
    ):
        restore = listen(exporter)
        try:
            rows.append(
                (
                    f"event hooks of one 2-branch transaction: {label}",
                    *measure(transaction_hooks, n),
                )
            )
        finally:
            restore()
    return rows


def log_rows(n: int) -> list[tuple[str, float, float]]:
    """The file log's forced COMMIT (and its lazy END) on one thread, next to the same
    bytes appended and fsynced to a file that grows with each write (what the log did
    before its segments were preallocated): a temp dir on the disk the servers use."""
    workdir = Path(tempfile.mkdtemp(prefix="xatm-micro-log-"))
    try:
        log = FileLog(workdir / "log", "micro")
        count = itertools.count()

        def commit() -> None:
            gtrid = new_gtrid("micro")
            log.log_commit(gtrid, ("pg", "maria"), {"pg": next(count)})
            log.log_end(gtrid)

        rows = [("file log: log_commit + log_end (preallocated segment)", *measure(commit, n))]
        log.close()
        frame = LogRecord("COMMIT", new_gtrid("micro"), ("pg", "maria"), time.time()).encode()
        fd = os.open(workdir / "growing", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:

            def append() -> None:
                os.write(fd, frame)
                os.fsync(fd)

            rows.append(("the same bytes: append + fsync to a growing file", *measure(append, n)))
        finally:
            os.close(fd)
        return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Owner:
    """A participant as ``xatm.core.deadline`` sees it: a name, and the socket of a connection."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.participant = make_participant(name, parse_url(url))

    def socket_of(self, conn: Any) -> int | None:
        return self.participant.socket_of(conn)


def deadline_rows(name: str, owner: _Owner, conn: Any, n: int) -> list[tuple[str, float, float]]:
    """The deadline's own costs on one real connection (no call is made on it)."""
    far = time.monotonic() + 3600.0

    def arm_disarm() -> None:
        _deadline.disarm(_deadline.arm(owner, conn, far, "a bench", busy=0))

    watch = _deadline.arm(owner, conn, far, "a bench", busy=0)
    try:

        def calling() -> None:
            with _deadline.calling(watch):
                pass

        rows = [
            (f"deadline, {name}: arm + disarm (once per branch)", *measure(arm_disarm, n)),
            (f"deadline, {name}: a call marked in flight (once per call)", *measure(calling, n)),
        ]
    finally:
        _deadline.disarm(watch)

    def bounded() -> None:
        with _deadline.bounded(owner, conn, 3600.0, "a bench"):
            pass

    rows.append((f"deadline, {name}: a bounded() block", *measure(bounded, n)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__)
    p.add_argument("-n", type=int, default=2000, help="calls per measurement")
    p.add_argument("--pg-url")
    p.add_argument("--mysql-url")
    args = p.parse_args(argv)
    n = args.n
    rows: list[tuple[str, float, float]] = []
    with BenchServers(args.pg_url, args.mysql_url) as servers:
        assert servers.urls is not None
        my = mysql_connect(servers.urls.mysql)
        stmt = "SET @xatm_micro = 1"

        def new_cursor() -> None:
            cur = my.cursor()
            try:
                cur.execute(stmt)
            finally:
                cur.close()

        def new_buffered_cursor() -> None:
            cur = my.cursor(buffered=True)
            cur.execute(stmt)
            cur.close()

        reused = my.cursor()
        rows.append(("MariaDB: statement via a new cursor per statement", *measure(new_cursor, n)))
        rows.append(
            ("MariaDB: statement via a new buffered cursor", *measure(new_buffered_cursor, n))
        )
        rows.append(
            ("MariaDB: statement via one reused cursor", *measure(lambda: reused.execute(stmt), n))
        )
        rows.append(
            (
                "MariaDB: statement via cmd_query (no cursor)",
                *measure(lambda: my.cmd_query(stmt), n),
            )
        )
        rows += deadline_rows("MariaDB", _Owner("maria", servers.urls.mysql), my, n)
        my.close()

        pg = pg_connect(servers.urls.pg)
        rows += deadline_rows("PG", _Owner("pg", servers.urls.pg), pg, n)
        gid = "1145324612_eGF0bS5iZW5jaC4wMTIzNDU2Nzg5YWJjZGVm_cGc="
        quoted = "'" + gid.replace("'", "''") + "'"

        def composed() -> None:
            pg.execute(sql.SQL("SELECT {}").format(sql.Literal(gid)))

        def pipelined() -> None:
            with pg.pipeline():
                pg.execute("SELECT pg_current_xact_id_if_assigned()::text")
                pg.execute("SELECT 1")

        def multi() -> None:
            cur = pg.execute("SELECT pg_current_xact_id_if_assigned()::text; SELECT 1")
            cur.fetchone()
            cur.nextset()

        rows.append(("PG: one statement (text)", *measure(lambda: pg.execute("SELECT 1"), n)))
        rows.append(("PG: one statement, gid via sql.Literal (xatm)", *measure(composed, n)))
        rows.append(
            (
                "PG: one statement, gid pre-quoted text",
                *measure(lambda: pg.execute(f"SELECT {quoted}"), n),
            )
        )
        rows.append(("PG: two statements in a pipeline", *measure(pipelined, n)))
        rows.append(("PG: two statements in one simple-query string", *measure(multi, n)))
        pg.close()

    with ThreadPoolExecutor(4) as pool:
        rows.append(
            (
                "thread hand-off: submit a no-op and wait for it",
                *measure(lambda: pool.submit(lambda: None).result(), n),
            )
        )
    rows.append(("new_gtrid()", *measure(lambda: new_gtrid("bench"), n)))
    rows += log_rows(n)
    rows += hook_rows(n)

    print("| call (one thread, idle machine as far as possible) | wall µs | CPU µs |")
    print("|---|---:|---:|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
