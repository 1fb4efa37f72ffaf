"""Carrying out a verdict on one prepared branch: the phase-2 call and what its answer means.

Recovery and manual resolution both finish branches through :func:`carry_out`, so they
read the server's answers alike. A branch that the listing showed a moment ago may answer
"no such branch": on PostgreSQL it was finished in between (by its coordinator or another
pass); on MariaDB it may still be held by a session attached to it (only that session may
finish it), so it is *held*, never finished: the next pass looks again, and a branch that is
really gone is then simply not listed.
"""

from __future__ import annotations

import enum

from xatm.core import bugs as _bugs
from xatm.core.participant import Connection, Participant, PhaseTwo
from xatm.core.xid import Xid


class Carried(enum.Enum):
    """What carrying a verdict out on one listed branch came to."""

    DONE = "done"  # committed / rolled back now
    GONE = "gone"  # no longer prepared: finished by someone else
    HELD = "held"  # "no such branch", but it may still be held by another session


def carry_out(participant: Participant, conn: Connection, xid: Xid, commit: bool) -> Carried:
    """COMMIT or ROLLBACK one listed prepared branch. Errors are raised as they come (a
    connection error means the outcome is unknown)."""
    if commit:
        result = participant.commit_prepared(conn, xid)
    else:
        result = participant.rollback_prepared(conn, xid)
    if result is PhaseTwo.DONE:
        return Carried.DONE
    held = participant.nota_may_be_held and not _bugs.on("nota_is_gone")
    return Carried.HELD if held else Carried.GONE
