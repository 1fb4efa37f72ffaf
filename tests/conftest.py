"""Session fixtures: private database servers, per-test tables and transaction managers.

The servers (two PostgreSQL clusters with max_prepared_transactions > 0, one MariaDB) are
started once per test session from the local binaries, on free loopback ports, and destroyed
at the end. With XATM_TEST_PG1_URL, XATM_TEST_PG2_URL and XATM_TEST_MYSQL_URL set, the tests
use those servers instead, and the tests that must kill a server are skipped.

XATM_TEST_MYSQL_DRIVER picks the MySQL driver xatm uses (``connector-pure``, ``connector-c``,
``pymysql``, ``mysqldb``; unset: mysql-connector's default class): the ``maria`` URL is
rewritten for it (``tests.support.with_mysql_driver``). A driver that cannot be used here
(the C extension does not load, say) stops the run at once rather than testing another one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, Servers, check_mysql_driver, with_mysql_driver
from xatm import TransactionManager
from xatm.testing import servers as devservers


def pytest_configure(config: pytest.Config) -> None:
    problem = check_mysql_driver()
    if problem is not None:
        raise pytest.UsageError(problem)


def _driver_urls(urls: dict[str, str]) -> dict[str, str]:
    return {name: with_mysql_driver(url) for name, url in urls.items()}


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    external = devservers.external_urls()
    if external is not None:
        yield Servers(_driver_urls(external), None)
        return
    base = devservers.make_basedir("xatm-test-servers-")
    started = devservers.start_all(base)
    try:
        yield Servers(_driver_urls(started.urls()), started)
    finally:
        started.destroy()


@pytest.fixture(scope="session")
def pg_no2pc(servers: Servers) -> Iterator[str]:
    """A PostgreSQL cluster with max_prepared_transactions = 0 (2PC disabled)."""
    if servers.set is None:
        pytest.skip("external servers: no private cluster with 2PC disabled")
    base = devservers.make_basedir("xatm-test-no2pc-")
    server = devservers.start_postgres(base, "pg0", max_prepared_transactions=0)
    try:
        yield server.url()
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def log_url(servers: Servers) -> str:
    """A database of its own on pg2 for the shared coordinator log."""
    if servers.set is None:
        return servers.urls["pg2"]
    servers.set.pg2.create_database("xatmlog")
    return servers.set.pg2.url("xatmlog")


@pytest.fixture
def at_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Callable[[], None]]]:
    """Run an action when the coordinator reaches a failpoint (instead of crashing there):
    ``at_step["after_decision"] = fn`` runs ``fn`` once at that step."""
    import xatm.core.failpoint

    actions: dict[str, Callable[[], None]] = {}

    def hit(name: str) -> None:
        action = actions.pop(name, None)
        if action is not None:
            action()

    monkeypatch.setattr(xatm.core.failpoint, "hit", hit)
    yield actions


_table_numbers = itertools.count(1)


@pytest.fixture
def bank(servers: Servers, request: pytest.FixtureRequest) -> Iterator[Bank]:
    """Fresh account tables (its own table name per test) on pg1, pg2 and maria."""
    name = f"acc_{os.getpid()}_{next(_table_numbers)}"
    b = Bank(servers.urls, name)
    b.create(accounts=4, balance=1000)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def make_tm(servers: Servers, tmp_path: Path) -> Iterator[Callable[..., TransactionManager]]:
    """Build TransactionManagers on the test servers with a log in tmp_path; closed after."""
    made: list[TransactionManager] = []

    def make(node_id: str = "test", **kwargs: Any) -> TransactionManager:
        kwargs.setdefault("resources", servers.urls)
        kwargs.setdefault("log", tmp_path / "log")
        tm = TransactionManager(node_id=node_id, **kwargs)
        made.append(tm)
        return tm

    yield make
    for tm in made:
        tm.close()
