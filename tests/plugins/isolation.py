"""Per-test bank tables, and the autouse clean-up that keeps one failed test from failing
the next ones (managers left open are closed, prepared branches left are rolled back)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Bank, Servers
from xatm import events

logger = logging.getLogger("tests")


_table_numbers = itertools.count(1)


#: the banks of the running test, cleaned up after its managers are closed
_banks: list[Bank] = []


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Keep one failed test from failing the next ones. After each test: close every manager
    it opened and left open (it keeps its node's identity locks, and the next test of that
    node_id would find its node in use); then roll back xatm's prepared branches it left on
    its bank's servers (later tests check that nothing is prepared)."""
    opened: weakref.WeakSet[Any] = weakref.WeakSet()

    def note(event: events.Event) -> None:
        if isinstance(event, events.ManagerOpened):
            opened.add(event.manager)
        elif isinstance(event, events.ManagerClosed):
            opened.discard(event.manager)

    events.subscribe(note)
    try:
        yield
    finally:
        events.unsubscribe(note)
        for tm in list(opened):
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


@pytest.fixture
def bank(servers: Servers, request: pytest.FixtureRequest) -> Iterator[Bank]:
    """Fresh account tables (its own table name per test) on pg1, pg2 and maria; closed,
    and cleaned of what the test left prepared, by ``_isolated``."""
    name = f"acc_{os.getpid()}_{next(_table_numbers)}"
    b = Bank(servers.urls, name)
    _banks.append(b)
    b.create(accounts=4, balance=1000)
    yield b
