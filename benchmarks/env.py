"""The benchmark's environment: the two servers and the account tables on them.

``BenchServers`` either starts a private durable PostgreSQL cluster (fsync on) and a MariaDB
server (``innodb_flush_log_at_trx_commit=1``) under a fresh temp directory and destroys them
when the block ends (even on Ctrl-C), or uses servers given by URL. ``Ledger`` creates one
account table per side and checks, after each run, that money was conserved and that each
side moved by exactly the amount the clients say they committed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mysql.connector
import psycopg

from xatm.admin import parse_url, redact
from xatm.testing import servers as devservers

INITIAL_BALANCE = 1_000_000


class ConservationError(AssertionError):
    """Money appeared, vanished, or a side moved by other than what was committed."""


@dataclass(frozen=True)
class Urls:
    """Where the two sides live."""

    pg: str
    mysql: str
    log: str = ""  # a PostgreSQL database for the shared coordinator log ("": pg's)

    @property
    def shared_log(self) -> str:
        return self.log or self.pg


def pg_connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=autocommit)


class CExtensionUnavailable(RuntimeError):
    """A mode asked for mysql-connector's C extension and got the pure-Python class."""


#: what ``mysql_kind`` calls the two connection classes of mysql-connector
C_EXTENSION, PURE = "C extension", "pure Python"


def mysql_kind(conn: Any) -> str:
    """``C_EXTENSION`` if ``conn`` is mysql-connector's ``CMySQLConnection``, else ``PURE``."""
    return C_EXTENSION if type(conn).__name__ == "CMySQLConnection" else PURE


def cext_unavailable() -> str | None:
    """Why mysql-connector's C extension cannot be measured here, or None if it loads."""
    if mysql.connector.HAVE_CEXT:
        return None
    return (
        f"the C extension of mysql-connector-python {mysql.connector.__version__} does not"
        " load in this interpreter (26.x needs OpenSSL 3.2; `make bench` runs from"
        " .venv-cext, which has 9.5.0)"
    )


def require_kind(conn: Any, pure: bool, what: str) -> str:
    """The connection's kind; CExtensionUnavailable if the C extension was asked for and
    this is not it (a C-extension mode never silently runs pure)."""
    kind = mysql_kind(conn)
    if not pure and kind != C_EXTENSION:
        raise CExtensionUnavailable(
            f"{what}: asked for mysql-connector's C extension, got {type(conn).__name__}"
            f" ({cext_unavailable() or 'HAVE_CEXT is true'})"
        )
    return kind


def with_use_pure(url: str, pure: bool) -> str:
    """``url`` with ``use_pure=true|false`` (xatm passes URL options to the driver)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}use_pure={'true' if pure else 'false'}"


def mysql_connect(url: str, *, autocommit: bool = True, pure: bool = True) -> Any:
    """A mysql-connector connection: pure Python, or the C extension (or an error)."""
    spec = parse_url(url)
    conn = mysql.connector.connect(
        host=spec.host,
        port=spec.port,
        user=spec.user or "",
        password=spec.password or "",
        database=spec.database,
        autocommit=autocommit,
        use_pure=pure,
    )
    try:
        require_kind(conn, pure, "mysql_connect")
    except CExtensionUnavailable:
        conn.close()
        raise
    return conn


def mysql_run(conn: Any, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        cur.close()


class BenchServers:
    """The servers of one benchmark run: private ones (default) or the given URLs."""

    def __init__(
        self, pg_url: str | None = None, mysql_url: str | None = None, log_url: str | None = None
    ) -> None:
        if (pg_url is None) != (mysql_url is None):
            raise ValueError("give both --pg-url and --mysql-url, or neither")
        self.urls = Urls(pg_url, mysql_url, log_url or "") if pg_url and mysql_url else None
        self.private = self.urls is None
        self._started: list[Any] = []
        self.basedir: Path | None = None

    def __enter__(self) -> BenchServers:
        if self.urls is None:
            self.basedir = devservers.make_basedir("xatm-bench-")
            with ThreadPoolExecutor(2) as pool:
                pg = pool.submit(devservers.start_postgres, self.basedir, "pg1", fsync=True)
                maria = pool.submit(devservers.start_mariadb, self.basedir, "maria", durable=True)
                for future in (pg, maria):
                    with contextlib.suppress(Exception):
                        self._started.append(future.result())
            if len(self._started) != 2:
                self.__exit__(None, None, None)
                pg.result()
                maria.result()  # re-raises the failure
            pg.result().create_database("benchlog")  # the shared coordinator log's
            self.urls = Urls(pg.result().url(), maria.result().url(), pg.result().url("benchlog"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in self._started:
            with contextlib.suppress(Exception):
                server.destroy()
        self._started = []
        if self.basedir is not None:
            with contextlib.suppress(OSError):
                self.basedir.rmdir()

    def describe(self) -> dict[str, Any]:
        """Machine and server facts for the report (no secrets)."""
        assert self.urls is not None
        info: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "servers": "private (started by the harness)" if self.private else "given by URL",
            "pg_url": redact(self.urls.pg),
            "mysql_url": redact(self.urls.mysql),
            "log_url": redact(self.urls.shared_log),
        }
        with pg_connect(self.urls.pg) as conn:
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method"):
                row = conn.execute(f"SHOW {name}").fetchone()
                info[f"pg_{name}"] = row[0] if row else "?"
        conn2 = mysql_connect(self.urls.mysql)
        try:
            info["mariadb_version"] = mysql_run(conn2, "SELECT VERSION()")[0][0]
            for name in ("innodb_flush_log_at_trx_commit", "log_bin", "sync_binlog"):
                rows = mysql_run(conn2, f"SHOW VARIABLES LIKE '{name}'")
                info[f"mariadb_{name}"] = rows[0][1] if rows else "?"
        finally:
            conn2.close()
        info["drivers"] = _driver_versions()
        return info

    def server_pids(self) -> dict[str, int]:
        """The private servers' process ids ("pg": the postmaster, "maria"); {} if given by
        URL (their CPU time cannot be read then)."""
        pids: dict[str, int] = {}
        for server, name in zip(self._started, ("pg", "maria"), strict=False):
            if server.pid is not None:
                pids[name] = int(server.pid)
        return pids


def _xid_bytes(data: Any) -> bytes:
    return data.encode("latin-1") if isinstance(data, str) else bytes(data)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _driver_versions() -> str:
    import sqlalchemy

    cext = "its C extension loads" if mysql.connector.HAVE_CEXT else "no C extension here"
    return (
        f"psycopg {psycopg.__version__}, mysql-connector-python {mysql.connector.__version__}"
        f" ({cext}), SQLAlchemy {sqlalchemy.__version__}"
    )


class Ledger:
    """``accounts`` accounts on each side in table ``table``."""

    def __init__(self, urls: Urls, table: str, accounts: int) -> None:
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.urls = urls
        self.table = table
        self.accounts = accounts
        self.expected_pg = accounts * INITIAL_BALANCE
        self.expected_mysql = accounts * INITIAL_BALANCE
        self._before: tuple[set[str], set[str]] = (set(), set())

    def create(self) -> None:
        """(Re)create the tables; prepared transactions already there are not ours."""
        self._before = self.prepared()
        t = self.table
        with pg_connect(self.urls.pg) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {t}")
            conn.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, bal BIGINT NOT NULL)")
            conn.execute(
                f"INSERT INTO {t} SELECT g, %s FROM generate_series(1, %s) g",
                (INITIAL_BALANCE, self.accounts),
            )
            conn.execute(f"VACUUM ANALYZE {t}")
        conn2 = mysql_connect(self.urls.mysql)
        try:
            mysql_run(conn2, f"DROP TABLE IF EXISTS {t}")
            mysql_run(
                conn2,
                f"CREATE TABLE {t} (id INT PRIMARY KEY, bal BIGINT NOT NULL) ENGINE=InnoDB",
            )
            chunk = 1000
            for start in range(1, self.accounts + 1, chunk):
                ids = range(start, min(start + chunk, self.accounts + 1))
                values = ",".join(f"({i},{INITIAL_BALANCE})" for i in ids)
                mysql_run(conn2, f"INSERT INTO {t} VALUES {values}")
        finally:
            conn2.close()

    def totals(self) -> tuple[int, int]:
        with pg_connect(self.urls.pg) as conn:
            row = conn.execute(f"SELECT COALESCE(SUM(bal), 0) FROM {self.table}").fetchone()
            pg_total = int(row[0]) if row else 0
        conn2 = mysql_connect(self.urls.mysql)
        try:
            mysql_total = int(mysql_run(conn2, f"SELECT SUM(bal) FROM {self.table}")[0][0])
        finally:
            conn2.close()
        return pg_total, mysql_total

    def prepared(self) -> tuple[set[str], set[str]]:
        """Ids of the prepared transactions on (PostgreSQL's database, the MariaDB server)."""
        with pg_connect(self.urls.pg) as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
            pg_ids = {str(r[0]) for r in rows}
        conn2 = mysql_connect(self.urls.mysql)
        try:
            my_ids = {f"{r[0]}:{_xid_bytes(r[3]).hex()}" for r in mysql_run(conn2, "XA RECOVER")}
        finally:
            conn2.close()
        return pg_ids, my_ids

    def prepared_left(self) -> tuple[int, int]:
        """Prepared transactions left since ``create`` (others' are not counted): (PG, MariaDB)."""
        pg_ids, my_ids = self.prepared()
        return len(pg_ids - self._before[0]), len(my_ids - self._before[1])

    def check(self, committed_amount: int, what: str) -> str:
        """Check the books after ``what`` committed transfers worth ``committed_amount``.

        Returns a one-line verdict; raises ConservationError if the books are wrong.
        """
        pg_total, mysql_total = self.totals()
        pg_left, mysql_left = self.prepared_left()
        self.expected_pg -= committed_amount
        self.expected_mysql += committed_amount
        problems = []
        if pg_total + mysql_total != self.expected_pg + self.expected_mysql:
            problems.append(
                f"total is {pg_total + mysql_total}, expected"
                f" {self.expected_pg + self.expected_mysql}"
            )
        if pg_total != self.expected_pg or mysql_total != self.expected_mysql:
            problems.append(
                f"PostgreSQL side {pg_total} (expected {self.expected_pg}), MariaDB side"
                f" {mysql_total} (expected {self.expected_mysql})"
            )
        if pg_left or mysql_left:
            problems.append(
                f"prepared transactions left: PostgreSQL {pg_left}, MariaDB {mysql_left}"
            )
        # re-base on what is really there, so one failure does not cascade into every check
        self.expected_pg, self.expected_mysql = pg_total, mysql_total
        if problems:
            raise ConservationError(f"{what}: books do not balance: {'; '.join(problems)}")
        return f"{what}: conserved (total {pg_total + mysql_total})"

    def drop(self) -> None:
        with contextlib.suppress(Exception), pg_connect(self.urls.pg) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        with contextlib.suppress(Exception):
            conn2 = mysql_connect(self.urls.mysql)
            try:
                mysql_run(conn2, f"DROP TABLE IF EXISTS {self.table}")
            finally:
                conn2.close()
