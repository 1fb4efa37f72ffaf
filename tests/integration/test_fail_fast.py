"""A fail-fast start (``fail_fast=True``): every resource reachable and fit, or one error.

By default a manager starts whatever state its resources are in (a resource that is down
is retried, and recovery goes on on the others); with ``fail_fast`` a wrong password, a
server that is down and a PostgreSQL without prepared transactions are all reported at
once, by the constructor, in one error: nothing logged twice, nothing left open.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support import Servers
from xatm import ResourceNotFit, ResourceUnavailable, TransactionManager
from xatm.aio import AsyncTransactionManager
from xatm.testing.servers import free_port

WRONG = "not-the-password"


def wrong_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{WRONG}@{host}"))


def broken(servers: Servers, pg_no2pc: str) -> dict[str, str]:
    return {
        "pg1": servers.urls["pg1"],
        "maria": wrong_password(servers.urls["maria"]),
        "down": f"postgresql://xatm:{WRONG}@127.0.0.1:{free_port()}/xatm",
        "no2pc": pg_no2pc,
    }


def test_every_problem_in_one_error_at_construction(
    servers: Servers, pg_no2pc: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="xatm")
    with pytest.raises(ResourceUnavailable) as raised:
        TransactionManager(
            broken(servers, pg_no2pc), tmp_path / "log", "ff", sweeper=False, fail_fast=True
        )
    e = raised.value
    assert set(e.problems) == {"maria", "down", "no2pc"}
    assert "3 of 4 resource(s) not ready" in str(e)
    assert "max_prepared_transactions" in e.problems["no2pc"]
    for name in ("maria", "down", "no2pc"):
        assert repr(name) in str(e)
    assert WRONG not in str(e) and all(WRONG not in v for v in e.problems.values())
    assert not [r for r in caplog.records if r.name.startswith("xatm")]  # reported once
    # nothing was left open: the node's log is free for the next start at once
    TransactionManager(
        {"pg1": servers.urls["pg1"]}, tmp_path / "log", "ff", sweeper=False, lock_timeout=0
    ).close()


def test_a_resource_only_unfit_is_resource_not_fit(
    servers: Servers, pg_no2pc: str, tmp_path: Path
) -> None:
    resources = {"pg1": servers.urls["pg1"], "no2pc": pg_no2pc}
    with pytest.raises(ResourceNotFit) as raised:
        TransactionManager(resources, tmp_path / "log", "ff2", sweeper=False, fail_fast=True)
    assert set(raised.value.problems) == {"no2pc"} and raised.value.resource == "no2pc"


def test_ready_resources_start_and_are_checked_once(servers: Servers, tmp_path: Path) -> None:
    tm = TransactionManager(servers.urls, tmp_path / "log", "ff3", sweeper=False, fail_fast=True)
    try:
        assert all(pool.checked for pool in tm.context.resources.pools.values())
        with tm.transaction() as tx:
            tx.execute("pg1", "SELECT 1")
    finally:
        tm.close()


def test_the_default_starts_anyway(servers: Servers, pg_no2pc: str, tmp_path: Path) -> None:
    """Without fail_fast a manager starts (recovery must go on where it can); the bad
    resource's error comes with its first use."""
    tm = TransactionManager(broken(servers, pg_no2pc), tmp_path / "log", "ff4", sweeper=False)
    try:
        with tm.transaction() as tx:
            tx.execute("pg1", "SELECT 1")
        with pytest.raises(ResourceUnavailable), tm.transaction() as tx:
            tx.execute("maria", "SELECT 1")
    finally:
        tm.close()


def test_asyncio_and_the_config_file(servers: Servers, pg_no2pc: str, tmp_path: Path) -> None:
    from tests.support.recovery import write_config

    config = write_config(tmp_path / "xatm.toml", broken(servers, pg_no2pc), tmp_path / "log")
    config.write_text("fail_fast = true\n" + config.read_text())
    with pytest.raises(ResourceUnavailable) as raised:
        TransactionManager.from_config(config)
    assert set(raised.value.problems) == {"maria", "down", "no2pc"}

    async def main() -> None:
        tm = AsyncTransactionManager.from_config(config)
        with pytest.raises(ResourceUnavailable) as raised:
            await tm.open()
        assert set(raised.value.problems) == {"maria", "down", "no2pc"}

    asyncio.run(main())
