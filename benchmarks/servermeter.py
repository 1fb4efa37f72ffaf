"""What the two database servers spent during a measured window: CPU time and fsyncs.

* **CPU** (private servers only, whose process ids the harness knows): user + system time
  from ``/proc/<pid>/stat`` of the server process and every descendant (PostgreSQL's
  backends, WAL writer, checkpointer...; MariaDB is one process), children already reaped
  included (``cutime``/``cstime``), read at the window's start and end.
* **fsyncs** (any server): PostgreSQL's ``pg_stat_wal.wal_sync`` (WAL fsyncs by backends
  and the WAL writer, cluster-wide) and MariaDB's ``Innodb_data_fsyncs`` (InnoDB's fsyncs,
  the redo log's included: 10.11 has no ``Innodb_os_log_fsyncs``), read at the window's
  start and end over connections opened before the window. PostgreSQL backends publish
  their counters at most once a second, so a window of a few seconds is off by up to a
  second's worth at each end (the errors at the two ends cancel on average).

The harness calls :meth:`ServerMeter.window` in place of sleeping through the window;
``last`` then holds that window's :class:`ServerUsage`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .env import Urls, mysql_connect, mysql_run, pg_connect

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ServerUsage:
    """Server CPU seconds and fsyncs during one window (None: could not be read)."""

    pg_cpu: float | None
    maria_cpu: float | None
    pg_fsyncs: int | None
    maria_fsyncs: int | None


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17
    ticks = sum(int(x) for x in fields[11:15])
    return int(fields[1]), ticks / _TICK


def tree_cpu(root: int) -> float | None:
    """CPU seconds of ``root`` and all its live descendants (and their reaped children)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = st
    if root not in cpu:
        return None
    total = 0.0
    for pid in cpu:
        p = pid
        while p not in (root, 0, 1) and p in parents:
            p = parents[p]
        if p == root:
            total += cpu[pid]
    return total


class ServerMeter:
    """Reads the servers' CPU time and fsync counters around a window."""

    def __init__(self, urls: Urls, pids: dict[str, int]) -> None:
        self.urls = urls
        self.pids = pids
        self.last: ServerUsage | None = None

    def _fsyncs(self, pg: Any, my: Any) -> tuple[int | None, int | None]:
        pg_n = my_n = None
        with contextlib.suppress(Exception):
            row = pg.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
            pg_n = int(row[0]) if row else None
        with contextlib.suppress(Exception):
            rows = mysql_run(my, "SHOW GLOBAL STATUS LIKE 'Innodb_data_fsyncs'")
            my_n = int(rows[0][1]) if rows else None
        return pg_n, my_n

    def _cpu(self) -> tuple[float | None, float | None]:
        pg = self.pids.get("pg")
        maria = self.pids.get("maria")
        return (
            tree_cpu(pg) if pg is not None else None,
            tree_cpu(maria) if maria is not None else None,
        )

    def window(self, seconds: float) -> None:
        """Sleep ``seconds``, reading the counters at both ends into ``last``."""
        self.last = None
        pg, my = pg_connect(self.urls.pg), mysql_connect(self.urls.mysql)
        try:
            f0, c0 = self._fsyncs(pg, my), self._cpu()
            time.sleep(seconds)
            c1, f1 = self._cpu(), self._fsyncs(pg, my)
        finally:
            pg.close()
            my.close()

        def delta(a: Any, b: Any) -> Any:
            return None if a is None or b is None else b - a

        self.last = ServerUsage(
            pg_cpu=delta(c0[0], c1[0]),
            maria_cpu=delta(c0[1], c1[1]),
            pg_fsyncs=delta(f0[0], f1[0]),
            maria_fsyncs=delta(f0[1], f1[1]),
        )
