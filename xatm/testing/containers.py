"""Throwaway PostgreSQL 16 and MySQL 8 servers in Docker containers (testcontainers), for tests.

The private servers of ``xatm.testing.servers`` come from local binaries, and there is no
MySQL among them; with Docker, these containers add MySQL 8 (the ``XA_RECOVER_ADMIN`` case)::

    reason = docker_skip_reason()          # None when the containers can run
    with postgres_container() as pg_url, mysql_container() as mysql_url:
        ...                                # URLs with user, password, host and mapped port
    with container_set() as urls:          # {"pg1", "pg2", "maria"}: the test suite's shape,
        ...                                # with MySQL 8 where the private set has MariaDB

The containers run only when ``XATM_TEST_DOCKER=1`` and a Docker engine answers; otherwise
:func:`docker_skip_reason` says why not, in one line, for ``pytest.skip``. They are removed
when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

from xatm.core.text import first_line

USER = "xatm"
PASSWORD = "xatm-secret"
ROOT_PASSWORD = "root-secret"
DATABASE = "xatm"
POSTGRES_IMAGE = "postgres:16"
MYSQL_IMAGE = "mysql:8.4"
ENABLE_ENV = "XATM_TEST_DOCKER"


def docker_engine_reason() -> str | None:
    """None if a Docker engine answers, else why not (one line)."""
    try:
        # imported by name: a checkout's docker/ directory must not pass for the package
        docker: Any = importlib.import_module("docker")
    except ImportError:
        return "the docker Python package is not installed (pip install 'xatm[docker]')"
    try:
        client = docker.from_env()
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        text = first_line(str(e), type(e).__name__)
        return f"no Docker engine is reachable ({text})"
    return None


def docker_skip_reason() -> str | None:
    """None if the container tests may run, else why they are skipped (one line)."""
    if os.environ.get(ENABLE_ENV) != "1":
        return f"{ENABLE_ENV}=1 is not set: the tests that start Docker containers are off"
    try:
        importlib.import_module("testcontainers.core.container")
    except ImportError:
        return "testcontainers is not installed (pip install 'xatm[docker]')"
    return docker_engine_reason()


def _container_class(module: str, name: str) -> Any:
    """``name`` from testcontainers' ``community.<module>`` (4.x) or ``<module>`` (older)."""
    for path in (f"testcontainers.community.{module}", f"testcontainers.{module}"):
        with contextlib.suppress(ImportError):
            return getattr(importlib.import_module(path), name)
    raise ImportError(f"testcontainers has no {module} module")


@contextlib.contextmanager
def postgres_container(image: str = POSTGRES_IMAGE) -> Iterator[str]:
    """A PostgreSQL server with ``max_prepared_transactions=64``; yields its URL."""
    postgres = _container_class("postgres", "PostgresContainer")
    container = postgres(image, username=USER, password=PASSWORD, dbname=DATABASE, driver=None)
    container.with_command("postgres -c max_prepared_transactions=64")
    with container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5432)
        yield f"postgresql://{USER}:{PASSWORD}@{host}:{port}/{DATABASE}"


@contextlib.contextmanager
def mysql_container(image: str = MYSQL_IMAGE) -> Iterator[str]:
    """A MySQL 8 server whose user may run XA RECOVER (``XA_RECOVER_ADMIN``); yields its URL."""
    mysql = _container_class("mysql", "MySqlContainer")
    container = mysql(
        image, username=USER, password=PASSWORD, root_password=ROOT_PASSWORD, dbname=DATABASE
    )
    with container:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(3306))
        grant_xa_recover(host, port)
        yield f"mysql://{USER}:{PASSWORD}@{host}:{port}/{DATABASE}"


def grant_xa_recover(host: str, port: int) -> None:
    """As root: let the xatm user list prepared XA transactions (MySQL 8 needs it)."""
    import mysql.connector

    conn = mysql.connector.connect(
        host=host, port=port, user="root", password=ROOT_PASSWORD, use_pure=True
    )
    try:
        cur = conn.cursor()
        cur.execute(f"GRANT XA_RECOVER_ADMIN ON *.* TO '{USER}'@'%'")
        cur.close()
    finally:
        conn.close()


@contextlib.contextmanager
def container_set() -> Iterator[dict[str, str]]:
    """Two PostgreSQL servers and a MySQL 8 server (started one after the other), as the URLs
    the test fixtures use: ``pg1``, ``pg2``, and ``maria`` for the MySQL-family server."""
    with contextlib.ExitStack() as stack:
        pg1 = stack.enter_context(postgres_container())
        pg2 = stack.enter_context(postgres_container())
        mysql = stack.enter_context(mysql_container())
        yield {"pg1": pg1, "pg2": pg2, "maria": mysql}
