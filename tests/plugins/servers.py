"""Session fixtures: the private database servers (and a database for the shared log).

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

from collections.abc import Iterator

import pytest

from tests.support import Servers, check_mysql_driver, with_mysql_driver
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
