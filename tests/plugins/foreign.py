"""Foreign prepared transactions (not xatm's) on every server of a test's bank, for the crash
matrices: recovery must leave them alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Bank, prepare_foreign, resolve_foreign


@pytest.fixture
def foreign(bank: Bank) -> Iterator[None]:
    """One foreign prepared transaction per server of ``bank`` (tag ``matrix-<name>``),
    rolled back after the test."""
    for name, url in bank.urls.items():
        prepare_foreign(url, f"matrix-{name}")
    yield
    for name, url in bank.urls.items():
        resolve_foreign(url, f"matrix-{name}")
