"""Failpoints: crash the coordinator process at a named step of the protocol.

A testing aid. With ``XATM_FAILPOINT=<name>`` in its environment, a coordinator process kills
itself with SIGKILL (no cleanup, no buffered output flushed, exactly like a crash) when it
reaches that step. The names, in protocol order:

``before_prepare``      the block ended normally; no branch is prepared yet
``after_prepare``       every branch is prepared; no decision is logged
``before_decision``     the transaction passed its own timeout check; the COMMIT record is
                        about to be written (a pause here tests fencing with the shared log)
``after_decision``      the COMMIT decision is durable (in the log, or as the marker branch's
                        commit); no prepared branch is committed. Also reached with no
                        decision logged when only one branch wrote (it alone decides)
``after_first_commit``  one branch is committed; the others are prepared, or committed too
                        (phase 2 runs the branches in parallel)

``commit_batch_open`` (shared log only) a group-commit batch's COMMIT rows are inserted but
not committed yet: with ``:stop`` the rows' locks stay held, as by a frozen coordinator

Inside sagas (``xatm.sagas.runner``; the saga crash matrix, ``SAGA_NAMES``):

``saga_after_barrier``       a step's barrier rows are inserted; its body has not run and its
                             transaction is open
``saga_after_step``          a step's transaction committed; the saga's record does not say so
``saga_after_compensation``  a compensation committed (the first one: mid-compensation); the
                             saga's record does not say so

``XATM_FAILPOINT=<name>:stop`` stops the process with SIGSTOP instead (a paused coordinator:
resume it with SIGCONT). The variable is read once, at import: when unset, a failpoint costs
one comparison. A value that names no failpoint (a typo) is refused when a manager is built
(:func:`check`: ConfigurationError listing the valid names), never silently ignored.
"""

from __future__ import annotations

import os
import signal

from xatm.errors import ConfigurationError

NAMES = ("before_prepare", "after_prepare", "after_decision", "after_first_commit")
SAGA_NAMES = ("saga_after_barrier", "saga_after_step", "saga_after_compensation")
# before_decision is valid too, but not in NAMES: it is the crash matrix's after_prepare state
#: every failpoint the code has
ALL = (*NAMES, "before_decision", "commit_batch_open", *SAGA_NAMES)

_SETTING = (os.environ.get("XATM_FAILPOINT") or "").partition(":")
_ACTIVE = _SETTING[0] or None
_SIGNAL = signal.SIGSTOP if _SETTING[2] == "stop" else signal.SIGKILL


def check() -> None:
    """Raise ConfigurationError if ``XATM_FAILPOINT`` is set to something that names no
    failpoint (a typo would otherwise test nothing, silently)."""
    value = os.environ.get("XATM_FAILPOINT") or ""
    if not value:
        return
    name, colon, how = value.partition(":")
    if name not in ALL or (colon and how != "stop"):
        raise ConfigurationError(
            f"XATM_FAILPOINT={value!r} names no failpoint; the valid values are"
            f" {', '.join(ALL)}, each optionally followed by ':stop'"
        )


def hit(name: str) -> None:
    """Crash (or pause) the process here if the failpoint ``name`` is active."""
    if _ACTIVE is not None and name == _ACTIVE:
        os.kill(os.getpid(), _SIGNAL)
