"""Test support: a small bank spread over every test server, and invariant checks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg

from xatm import TransactionManager
from xatm.admin import FORMAT_ID, Xid, parse_url
from xatm.testing.servers import ServerSet

#: the repository's root (the working directory and PYTHONPATH of the worker processes)
ROOT = Path(__file__).resolve().parent.parent.parent
#: the ``make_tm`` fixture: builds TransactionManagers on the test servers
MakeTM = Callable[..., TransactionManager]

#: the MySQL driver xatm uses in this test run (``XATM_TEST_MYSQL_DRIVER``): "" is the
#: default (mysql-connector, whichever connection class loads); the others pin one
MYSQL_DRIVER = os.environ.get("XATM_TEST_MYSQL_DRIVER", "")
#: driver -> (URL scheme, query string, SQLAlchemy dialect)
MYSQL_DRIVERS: dict[str, tuple[str, str, str]] = {
    "": ("mysql", "", "mysql+mysqlconnector"),
    "connector-pure": ("mysql", "use_pure=true", "mysql+mysqlconnector"),
    "connector-c": ("mysql", "use_pure=false", "mysql+mysqlconnector"),
    "pymysql": ("mysql+pymysql", "", "mysql+pymysql"),
    "mysqldb": ("mysql+mysqldb", "", "mysql+mysqldb"),
}


def check_mysql_driver() -> str | None:
    """Why the selected driver cannot be tested here (None if it can)."""
    if MYSQL_DRIVER not in MYSQL_DRIVERS:
        return (
            f"XATM_TEST_MYSQL_DRIVER={MYSQL_DRIVER!r}: use one of"
            f" {', '.join(d for d in MYSQL_DRIVERS if d)}"
        )
    if MYSQL_DRIVER == "connector-c":
        from xatm.participants.mysql.drivers import c_extension_loads

        if not c_extension_loads():
            return (
                "XATM_TEST_MYSQL_DRIVER=connector-c but mysql-connector's C extension does not"
                f" load here (mysql-connector-python {mysql.connector.__version__})"
            )
    return None


def with_mysql_driver(url: str) -> str:
    """A ``mysql://`` test URL rewritten for the selected driver."""
    if not url.startswith("mysql://"):
        return url
    scheme, query, _ = MYSQL_DRIVERS[MYSQL_DRIVER]
    url = scheme + url[len("mysql") :]
    if query:
        url += ("&" if "?" in url else "?") + query
    return url


def mysql_errors() -> tuple[type[BaseException], ...]:
    """The exception classes xatm's MySQL driver of this run raises."""
    from xatm.participants.mysql.drivers import DRIVERS

    return DRIVERS[MYSQL_DRIVERS[MYSQL_DRIVER][2].split("+")[1]].errors()


def mysql_errno(e: BaseException) -> int | None:
    """The MySQL error number of a driver error (mysql-connector ``errno``, else ``args[0]``)."""
    from xatm.participants.mysql.drivers import DRIVERS

    return DRIVERS[MYSQL_DRIVERS[MYSQL_DRIVER][2].split("+")[1]].errno(e)


def autocommit_of(conn: Any) -> bool:
    """A driver connection's autocommit mode, for any driver."""
    if isinstance(conn, psycopg.Connection):
        return bool(conn.autocommit)
    from xatm.participants.mysql.drivers import for_connection

    return for_connection(conn).get_autocommit(conn)


def mysql_connection_id(conn: Any) -> int:
    """The server's id of a MySQL driver connection's session (for ``KILL``), any driver."""
    found = getattr(conn, "connection_id", None)  # mysql-connector
    if found is None:
        found = conn.thread_id()  # PyMySQL, MySQLdb
    return int(found)


def add_query(url: str, query: str) -> str:
    """``url`` with ``query`` (``key=value``) appended to its query string."""
    return url + ("&" if "?" in url else "?") + query


@dataclass
class Servers:
    urls: dict[str, str]
    set: ServerSet | None  # None when the tests run against external servers


def connect(url: str) -> Any:
    """An autocommit admin-ish connection as the test role, for setup and checks."""
    spec = parse_url(url)
    if spec.kind == "postgresql":
        return psycopg.connect(
            host=spec.host,
            port=spec.port,
            user=spec.user,
            password=spec.password,
            dbname=spec.database,
            autocommit=True,
        )
    return mysql.connector.connect(
        host=spec.host,
        port=spec.port,
        user=spec.user,
        password=spec.password,
        database=spec.database,
        autocommit=True,
        use_pure=True,  # the test's own checks: always the same, known driver
    )


def run(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    if isinstance(conn, psycopg.Connection):
        cur = conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        cur.close()


class Bank:
    """Account tables ``<table>`` with a journal ``<table>_j`` on every resource."""

    def __init__(self, urls: dict[str, str], table: str) -> None:
        self.urls = dict(urls)
        self.table = table
        self.journal = f"{table}_j"
        self.conns = {name: connect(url) for name, url in urls.items()}

    def reconnect(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.conns[name].close()
        self.conns[name] = connect(self.urls[name])

    def create(self, accounts: int, balance: int) -> None:
        for _name, conn in self.conns.items():
            engine = "" if isinstance(conn, psycopg.Connection) else " ENGINE=InnoDB"
            run(conn, f"DROP TABLE IF EXISTS {self.table}")
            run(conn, f"DROP TABLE IF EXISTS {self.journal}")
            run(conn, f"CREATE TABLE {self.table} (id INT PRIMARY KEY, bal INT NOT NULL){engine}")
            run(conn, f"CREATE TABLE {self.journal} (tid VARCHAR(64) PRIMARY KEY){engine}")
            for i in range(1, accounts + 1):
                run(conn, f"INSERT INTO {self.table} VALUES (%s, %s)", (i, balance))
        self.initial_total = accounts * balance * len(self.conns)

    def balances(self) -> dict[str, dict[int, int]]:
        out = {}
        for name, conn in self.conns.items():
            rows = run(conn, f"SELECT id, bal FROM {self.table} ORDER BY id")
            out[name] = {int(i): int(b) for i, b in rows}
        return out

    def balance(self, resource: str, account: int = 1) -> int:
        return self.balances()[resource][account]

    def total(self) -> int:
        return sum(sum(v.values()) for v in self.balances().values())

    def journal_ids(self) -> dict[str, set[str]]:
        return {
            name: {str(r[0]) for r in run(conn, f"SELECT tid FROM {self.journal}")}
            for name, conn in self.conns.items()
        }

    def prepared(self) -> dict[str, list[Xid | str]]:
        """Every prepared transaction on each resource (xatm's as Xid, others as text)."""
        out: dict[str, list[Xid | str]] = {}
        for name, conn in self.conns.items():
            found: list[Xid | str] = []
            if isinstance(conn, psycopg.Connection):
                rows = run(
                    conn, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
                )
                for (gid,) in rows:
                    xid = Xid.from_pg_gid(gid)
                    found.append(xid if xid is not None and xid.is_xatm else gid)
            else:
                for fid, gl, bl, data in run(conn, "XA RECOVER"):
                    xid = Xid.from_mysql(int(fid), int(gl), int(bl), bytes(data))
                    found.append(
                        xid if xid is not None and xid.is_xatm else f"{fid}:{bytes(data)!r}"
                    )
            out[name] = found
        return out

    def wait_for_dead_sessions(self, timeout: float = 10.0) -> None:
        """Wait until MariaDB has dropped the sessions of clients that are gone: a killed
        coordinator's session may linger a moment, and while it does MariaDB lets no other
        session finish its prepared XA branch (XAER_NOTA; recovery leaves it for a later
        pass). A session whose client still has its socket open (a live manager's pooled or
        identity connection) is not waited for."""
        import time

        deadline = time.monotonic() + timeout
        conn = self.conns["maria"]
        while True:
            rows = run(
                conn,
                "SELECT host FROM information_schema.processlist"
                " WHERE user = 'xatm' AND id <> CONNECTION_ID()",
            )
            live = _established_local_ports()
            gone = [h for (h,) in rows if _client_port(h) not in live]
            if not gone:
                return
            assert time.monotonic() < deadline, f"a dead coordinator's session lingers: {gone}"
            time.sleep(0.02)

    def xatm_prepared_on(self, name: str) -> list[Xid]:
        """xatm's prepared branches on one resource (only that server is asked)."""
        conn = self.conns[name]
        if isinstance(conn, psycopg.Connection):
            rows = run(
                conn, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            )
            xids = [Xid.from_pg_gid(gid) for (gid,) in rows]
        else:
            xids = [
                Xid.from_mysql(int(f), int(g), int(b), bytes(d))
                for f, g, b, d in run(conn, "XA RECOVER")
            ]
        return [x for x in xids if x is not None and x.is_xatm]

    def roll_back_xatm_leftovers(self, timeout: float) -> list[str]:
        """Roll back every prepared xatm branch on the bank's servers (a test's clean-up);
        waits out a killed coordinator's lingering MariaDB session up to ``timeout``.
        Returns the gtrids rolled back or still left."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = False
            for name, xids in self.xatm_prepared().items():
                for xid in xids:
                    seen.append(f"{name}:{xid.gtrid}")
                    sql = (
                        f"ROLLBACK PREPARED '{xid.to_pg_gid()}'"
                        if name.startswith("pg")
                        else f"XA ROLLBACK {xid.to_mysql()}"
                    )
                    try:
                        run(self.conns[name], sql)
                    except Exception:
                        left = True
            if not left or time.monotonic() > deadline:
                return sorted(set(seen))
            time.sleep(0.2)

    def xatm_prepared(self) -> dict[str, list[Xid]]:
        return {
            name: [x for x in found if isinstance(x, Xid)]
            for name, found in self.prepared().items()
        }

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(Exception):
                conn.close()


def prepare_foreign(url: str, tag: str) -> str:
    """Prepare a transaction that is not xatm's on the server of ``url``; return its id."""
    conn = connect(url)
    try:
        if isinstance(conn, psycopg.Connection):
            gid = f"foreign-{tag}"
            run(conn, "CREATE TABLE IF NOT EXISTS foreign_probe (id VARCHAR(64) PRIMARY KEY)")
            run(conn, "BEGIN")
            run(conn, "INSERT INTO foreign_probe VALUES (%s)", (tag,))
            run(conn, f"PREPARE TRANSACTION '{gid}'")
            return gid
        # same formatID as xatm but another namespace: must still be left alone
        gtrid = f"other-app-{tag}".encode().hex()
        run(conn, "CREATE TABLE IF NOT EXISTS foreign_probe (id VARCHAR(64) PRIMARY KEY)")
        run(conn, f"XA START X'{gtrid}',X'01',{FORMAT_ID}")
        run(conn, "INSERT INTO foreign_probe VALUES (%s)", (tag,))
        run(conn, f"XA END X'{gtrid}',X'01',{FORMAT_ID}")
        run(conn, f"XA PREPARE X'{gtrid}',X'01',{FORMAT_ID}")
        return f"other-app-{tag}"
    finally:
        conn.close()


def resolve_foreign(url: str, tag: str) -> None:
    """Roll back what prepare_foreign made."""
    conn = connect(url)
    try:
        if isinstance(conn, psycopg.Connection):
            run(conn, f"ROLLBACK PREPARED 'foreign-{tag}'")
        else:
            gtrid = f"other-app-{tag}".encode().hex()
            run(conn, f"XA ROLLBACK X'{gtrid}',X'01',{FORMAT_ID}")
    finally:
        conn.close()


def _client_port(host: object) -> int | None:
    """The client's port of a processlist ``host`` column (``127.0.0.1:54321``)."""
    text = host.decode() if isinstance(host, bytes) else str(host)
    _, _, port = text.rpartition(":")
    return int(port) if port.isdigit() else None


def _established_local_ports() -> set[int]:
    """Local ports of this machine's established TCP connections (any process's)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "01":  # ESTABLISHED
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def journaled_transfer(tm: Any, bank: Bank, tid: str) -> None:
    """Move 10 from pg1's account 1 to maria's, and journal ``tid`` on both sides."""
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 10 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 10 WHERE id = 1")
        for r in ("pg1", "maria"):
            tx.execute(r, f"INSERT INTO {bank.journal} (tid) VALUES (%s)", (tid,))


class CommitsBlocked:
    """MariaDB's ``BACKUP STAGE BLOCK_COMMIT``: statements run, every commit waits ("Waiting
    for backup lock"); :meth:`interrupt` sends ``KILL QUERY`` to a session once its commit
    waits there, which answers it 1317 (query interrupted)."""

    def __init__(self, url: str) -> None:
        self.admin = connect(url)
        self.blocker = connect(url)
        run(self.blocker, "BACKUP STAGE START")
        run(self.blocker, "BACKUP STAGE BLOCK_COMMIT")

    def interrupt(self, connection_id: Callable[[], int | None]) -> None:
        def waiting() -> bool:
            cid = connection_id()
            if cid is None:
                return False
            rows = run(
                self.admin,
                "SELECT COUNT(*) FROM information_schema.processlist"
                " WHERE id = %s AND state = 'Waiting for backup lock'",
                (cid,),
            )
            return int(rows[0][0]) == 1

        deadline = time.monotonic() + 30
        while not waiting():
            assert time.monotonic() < deadline, "the commit never waited for the backup lock"
            time.sleep(0.05)
        run(self.admin, f"KILL QUERY {connection_id()}")

    def close(self) -> None:
        run(self.blocker, "BACKUP STAGE END")
        self.blocker.close()
        self.admin.close()
