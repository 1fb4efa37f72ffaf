"""Transaction managers on the test servers, and actions run at the coordinator's failpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Servers
from xatm import TransactionManager


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
