"""The in-doubt backlog (xatm.recovery.backlog), from tables: what the logs and the last listings
say, whatever the resources answer now."""

from __future__ import annotations

import random

from xatm.core.records import LogRecord
from xatm.core.report import RecoveryAction, RecoveryReport
from xatm.recovery.backlog import Backlog, left_by_resource, measure

NOW = 1_800_000_000.0


def gtrid(node: str, age: float) -> str:
    """A gtrid of ``node`` created ``age`` seconds before NOW."""
    ms = int((NOW - age) * 1000)
    return f"xatm.{node}.{ms:011x}0{random.getrandbits(60):015x}"


def commit(g: str, *branches: str, at: float) -> LogRecord:
    return LogRecord("COMMIT", g, branches, at)


def test_decided_from_the_logs_whatever_the_resources_answer() -> None:
    old, young, peer_old, peer_young = (
        gtrid("app", 60),
        gtrid("app", 0.1),
        gtrid("peer", 60),
        gtrid("peer", 0.1),
    )
    pending = {
        "app": {old: commit(old, "pg", "my", at=NOW - 59), young: commit(young, "pg", at=NOW)},
        "peer": {
            peer_old: commit(peer_old, "pg", at=NOW - 50),
            peer_young: commit(peer_young, "pg", at=NOW - 0.1),
        },
    }
    b = measure(
        pending=pending,
        own_node="app",
        listings={"pg": frozenset()},  # pg reached: nothing prepared there
        unreachable={"my"},
        running=lambda g: g == young,
        now=NOW,
        grace=30.0,
    )
    # app's old one (not running), peer's old one; not the running one, not the peer's young
    assert (b.decided, b.undecided, b.total) == (2, 0, 2)
    assert b.by_log == {"app": 1, "peer": 1}
    assert b.by_resource == {"my": 1}  # pg finished both; my unknown (unreachable)
    assert b.oldest_created is not None and abs(b.oldest_created - (NOW - 60)) < 0.01


def test_undecided_from_the_last_listings_kept_while_unreachable() -> None:
    a, b_, young = gtrid("x", 100), gtrid("x", 40), gtrid("x", 1)
    b = measure(
        pending={},
        own_node="me",
        listings={"pg": frozenset({a, young}), "my": frozenset({a, b_})},
        unreachable={"my"},  # its listing is the last one seen: still counted
        running=lambda g: False,
        now=NOW,
        grace=30.0,
    )
    assert (b.decided, b.undecided) == (0, 2)
    assert b.by_resource == {"pg": 1, "my": 2}


def test_no_listing_yet_means_unknown_per_resource() -> None:
    g = gtrid("dead", 100)
    b = measure(
        pending={"dead": {g: commit(g, "pg", "my", at=NOW - 100)}},
        own_node="me",
        listings={},
        unreachable=set(),
        running=lambda g: False,
        now=NOW,
        grace=30.0,
    )
    assert b.by_resource == {"pg": 1, "my": 1} and b.total == 1
    assert measure(
        pending={}, own_node="me", listings={}, unreachable=(), running=lambda g: False,
        now=NOW, grace=1.0,
    ) == Backlog()  # fmt: skip


def test_a_pass_listing() -> None:
    a, b = gtrid("x", 1), gtrid("x", 2)
    report = RecoveryReport(
        reached=("pg", "pg2"),
        unreachable=("my",),
        actions=(
            RecoveryAction(a, "pg", "pg", "skip", "alive", "left"),
            RecoveryAction(b, "pg", "pg", "commit", "logged", "done"),
            RecoveryAction(b, "pg2", "pg2", "error", "logged", "failed: x"),
            RecoveryAction(b, "my", "my", "skip", "unknown", "left"),
        ),
    )
    assert left_by_resource(report) == {"pg": frozenset({a}), "pg2": frozenset({b})}
