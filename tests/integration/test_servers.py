"""Private test servers: 2PC works as role xatm and prepared transactions survive kill -9."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mysql.connector
import psycopg
import pytest

from xatm.testing.servers import (
    MARIADBD,
    MariaDBServer,
    PostgresServer,
    external_urls,
    free_port,
    load_or_start,
    make_basedir,
    start_mariadb,
    start_postgres,
)

local_only = pytest.mark.skipif(
    external_urls() is not None, reason="XATM_TEST_*_URL set: external servers cannot be killed"
)


@pytest.fixture(scope="module")
def basedir() -> Iterator[Path]:
    # Not tmp_path_factory: pytest keeps its temp root at mode 0700, which the
    # postgres / mysql OS users cannot traverse.
    path = make_basedir("xatm-test-servers-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pg(basedir: Path) -> Iterator[PostgresServer]:
    server = start_postgres(basedir, "pg", max_prepared_transactions=64)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def maria(basedir: Path) -> Iterator[MariaDBServer]:
    if not MARIADBD.exists():
        pytest.skip("no local mariadbd")
    server = start_mariadb(basedir, "maria")
    try:
        yield server
    finally:
        server.destroy()


def _maria_connect(url: str) -> Any:
    u = urlsplit(url)
    return mysql.connector.connect(
        host=u.hostname,
        port=u.port,
        user=u.username,
        password=u.password,
        database=u.path.lstrip("/"),
        autocommit=True,
        use_pure=True,
    )


def _prepared_gids(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {gid for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()}


def _pg_prepare(url: str, gid: str, value: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (i int PRIMARY KEY)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (%s)", (value,))
        conn.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(psycopg.sql.Literal(gid)))


def test_pg_prepare_as_xatm_over_tcp(pg: PostgresServer) -> None:
    urls = external_urls()
    url = urls["pg1"] if urls else pg.url()
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False,)
    _pg_prepare(url, "xatm-test-1", 1)
    assert "xatm-test-1" in _prepared_gids(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("COMMIT PREPARED 'xatm-test-1'")
        assert conn.execute("SELECT i FROM t WHERE i = 1").fetchone() == (1,)


@local_only
def test_pg_kill_restart_keeps_prepared(pg: PostgresServer) -> None:
    _pg_prepare(pg.url(), "xatm-test-kill", 2)
    old_pid = pg.pid
    pg.kill()
    assert pg.pid is None and not pg.running
    pg.restart()
    assert pg.pid not in (None, old_pid)
    assert "xatm-test-kill" in _prepared_gids(pg.url())
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("ROLLBACK PREPARED 'xatm-test-kill'")
    assert _prepared_gids(pg.url()) == set()


@local_only
def test_pg_without_2pc(basedir: Path) -> None:
    server = start_postgres(basedir, "pg-no2pc", max_prepared_transactions=0)
    try:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            _pg_prepare(server.url(), "xatm-test-no2pc", 1)
    finally:
        server.destroy()
    assert not server.datadir.exists()


@local_only
def test_maria_kill_restart_keeps_xa_prepared(maria: MariaDBServer) -> None:
    conn = _maria_connect(maria.url())
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS t (i INT PRIMARY KEY) ENGINE=InnoDB")
    for stmt in ("XA START 'xatm-kill'", "INSERT INTO t VALUES (1)", "XA END 'xatm-kill'"):
        cur.execute(stmt)
    cur.execute("XA PREPARE 'xatm-kill'")
    conn.close()
    maria.kill()
    assert maria.pid is None and not maria.running
    maria.restart()
    conn = _maria_connect(maria.url())
    cur = conn.cursor()
    cur.execute("XA RECOVER")
    assert [row[3] for row in cur.fetchall()] == [b"xatm-kill"]
    cur.execute("XA ROLLBACK 'xatm-kill'")
    cur.execute("XA RECOVER")
    assert cur.fetchall() == []
    conn.close()


@local_only
def test_load_or_start_reattaches(basedir: Path) -> None:
    servers = load_or_start(basedir / "set")
    try:
        again = load_or_start(basedir / "set")
        assert again.urls() == servers.urls()
        assert [s.pid for s in (again.pg1, again.pg2, again.maria)] == [
            s.pid for s in (servers.pg1, servers.pg2, servers.maria)
        ]
        with psycopg.connect(again.pg2.url()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("xatm",)
    finally:
        servers.destroy()
    assert not (basedir / "set" / "servers.json").exists()


def test_free_port_and_external_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert free_port() != free_port()
    for var in ("XATM_TEST_PG1_URL", "XATM_TEST_PG2_URL", "XATM_TEST_MYSQL_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XATM_TEST_PG1_URL", "postgresql://a")
    assert external_urls() is None
    monkeypatch.setenv("XATM_TEST_PG2_URL", "postgresql://b")
    monkeypatch.setenv("XATM_TEST_MYSQL_URL", "mysql://c")
    assert external_urls() == {
        "pg1": "postgresql://a",
        "pg2": "postgresql://b",
        "maria": "mysql://c",
    }
