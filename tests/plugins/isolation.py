"""Per-test bank tables, and the autouse clean-up that keeps one failed test from failing
the next ones (managers a failed test left open are closed, prepared branches left are
rolled back)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
from collections.abc import Iterator

import pytest

from tests.support import Bank, Servers
from xatm import TransactionManager

logger = logging.getLogger("tests")


_table_numbers = itertools.count(1)


#: the banks of the running test, cleaned up after its managers are closed
_banks: list[Bank] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Note on the test item whether any of its phases failed (read by ``_isolated``)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        item.stash[_FAILED] = True


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _isolated(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keep one failed test from failing the next ones. After a test that failed: close every
    manager it left open (it keeps its node's identity locks, and the next test of that
    node_id would find its node in use). After every test: roll back xatm's prepared branches
    it left on its bank's servers (later tests check that nothing is prepared)."""
    try:
        yield
    finally:
        if request.node.stash.get(_FAILED, False):
            gc.collect()
            for tm in [o for o in gc.get_objects() if isinstance(o, TransactionManager)]:
                if not tm.closed:
                    logger.warning("closing manager %r, left open by the test", tm.node_id)
                    with contextlib.suppress(Exception):
                        tm.close()
        while _banks:
            b = _banks.pop()
            with contextlib.suppress(Exception):
                left = b.roll_back_xatm_leftovers(timeout=15.0)
                if left:
                    logger.warning("rolled back prepared branches the test left: %s", left)
            b.close()


def _revive(servers: Servers) -> None:
    """Start again a private server that died under an earlier test and stayed down (MariaDB
    10.11 has been seen to abort on an InnoDB assertion in purge after crash recovery of XA
    branches): one server crash must not fail every later test."""
    if servers.set is None:
        return
    for name in ("pg1", "pg2", "maria"):
        server = getattr(servers.set, name)
        if server.running:
            continue
        logger.warning("the private %s server is down (it died earlier): starting it again", name)
        with contextlib.suppress(Exception):
            server.start()


@pytest.fixture
def bank(servers: Servers, request: pytest.FixtureRequest) -> Iterator[Bank]:
    """Fresh account tables (its own table name per test) on pg1, pg2 and maria; closed,
    and cleaned of what the test left prepared, by ``_isolated``."""
    _revive(servers)
    name = f"acc_{os.getpid()}_{next(_table_numbers)}"
    b = Bank(servers.urls, name)
    _banks.append(b)
    b.create(accounts=4, balance=1000)
    yield b
