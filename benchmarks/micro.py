"""Micro-costs behind xatm's per-transaction overhead: ``python -m benchmarks.micro``.

Single-threaded, against private servers (or ``--pg-url``/``--mysql-url``): the wall and
CPU time of the driver calls xatm makes, next to cheaper ways to make the same calls, so
that the gains of the recommendations in ``docs/benchmarks.md`` can be estimated:

* MariaDB: a statement through a new cursor per statement (xatm's ``_run``), through one
  reused cursor, and through ``connection.cmd_query`` (no cursor);
* PostgreSQL: one statement; the gid composed with ``psycopg.sql`` vs pre-quoted text; two
  statements in a pipeline (xatm's prepare) vs two statements in one simple-query string vs
  one statement alone;
* threads: handing a no-op to a ``ThreadPoolExecutor`` and waiting for it (xatm's fan-out);
* ``xatm._xid.new_gtrid``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from psycopg import sql

from xatm._xid import new_gtrid

from .env import BenchServers, mysql_connect, pg_connect


def measure(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call, after a short warm-up."""
    for _ in range(min(50, n)):
        fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - w0) / n, 1e6 * (time.process_time() - c0) / n


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
        rows.append(("MariaDB: statement via a new cursor (xatm _run)", *measure(new_cursor, n)))
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
        my.close()

        pg = pg_connect(servers.urls.pg)
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
        rows.append(("PG: two statements in a pipeline (xatm prepare)", *measure(pipelined, n)))
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

    print("| call (one thread, idle machine as far as possible) | wall µs | CPU µs |")
    print("|---|---:|---:|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.0f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
