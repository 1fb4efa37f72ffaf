"""Test-only switches that re-introduce historical atomicity bugs, one line each in the code.

The deterministic simulator (tests/sim) proves it would have found each of them: a test
switches one on in its own worker process and checks that a fixed seed budget finds a split.
Production never turns one on: :data:`ENABLED` is empty, and nothing reads it from the
environment, a file or a setting; only the simulator's workers assign it.
"""

from __future__ import annotations

#: every switch, by name (docs/testing.md lists what each re-introduces)
NAMES = frozenset(
    {
        "resolve_ignores_marker",  # a manual rollback ignores a marker row saying commit
        "nota_is_gone",  # XAER_NOTA read as "branch gone" while its session lingers
        "presume_before_probe",  # presumed abort before reading the marker holder
        "twin_is_previous",  # a twin's branches taken as a previous incarnation's
        "lock_is_proof",  # holding the identity lock taken as proof a branch is finished
    }
)

#: the switches on in this process (always empty outside the simulator)
ENABLED: frozenset[str] = frozenset()


def on(name: str) -> bool:
    """Is the bug ``name`` re-introduced in this process? (Never, outside the simulator.)"""
    return name in ENABLED
