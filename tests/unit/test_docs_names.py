"""Every Python name the docs spell ``xatm.<...>`` exists where they say: a documented name
that is not importable from there is a broken promise (issue 20, item 5)."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.support import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: ``xatm.<...>`` in the docs that are not Python names: loggers, span and attribute names,
#: tables and files
NOT_PYTHON = {
    # loggers
    "xatm.transaction",
    "xatm.recovery",
    "xatm.sweeper",
    "xatm.log",
    "xatm.audit",
    "xatm.inspect",
    "xatm.resolve",
    "xatm.identity",
    "xatm.saga",
    "xatm.cli",
    "xatm.failover",
    "xatm.deadline",
    "xatm.retention",
    # spans and their attributes
    "xatm.prepare",
    "xatm.decide",
    "xatm.commit",
    "xatm.rollback",
    "xatm.branch",
    "xatm.node",
    "xatm.gtrid",
    "xatm.outcome",
    "xatm.resource",
    "xatm.resources",
    "xatm.recovery.actor",
    "xatm.recovery.action",
    "xatm.recovery.committed",
    # files and tables
    "xatm.toml",
    "xatm.decisions",
    "xatm.timelines",
    "xatm.meta",
    "xatm.sagas",
    "xatm.api",
}

_NAME_RE = re.compile(r"\bxatm(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def _names() -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for name in _NAME_RE.findall(doc.read_text()):
            if not any(name == n or name.startswith(n + ".") for n in NOT_PYTHON):
                found.add((doc.name, name))
    return sorted(found)


@pytest.mark.parametrize(("doc", "name"), _names())
def test_a_documented_name_exists(doc: str, name: str) -> None:
    assert _resolves(name), f"{doc} names {name}, which does not exist"
