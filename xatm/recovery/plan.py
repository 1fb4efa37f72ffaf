"""One transaction's plan: settle its prepared branches, wait for a resource, close it, or nothing.

The branch verdict (commit, roll back or leave one prepared branch) is
:func:`xatm.core.decide.decide`'s. This is the verdict on the whole transaction that the recovery
pass acts on and that ``xatm show``, ``xatm indoubt`` and ``xatm recover --dry-run`` print:
the same function, given the same facts, so that the plan an operator reads is the pass's.

The facts: whether a COMMIT decision is pending for it (and the resources its record names),
the resources where a branch of it is still prepared (with their branch verdict), and the
resources that could not be read now (unreachable, or not reached in this pass). A branch
named by the decision on a resource that could not be read is **unknown**, never "gone": the
transaction waits for that resource, and its decision record stays open until the resource
answers and the branch is found finished. No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass


class Step(enum.Enum):
    """What recovery does next about one transaction."""

    SETTLE = "settle"  # some branch is prepared: each gets its branch verdict
    WAIT = "wait"  # a branch named by the decision is on a resource that cannot be read now
    END = "end"  # decided, every branch is finished: the decision record is closed (END)
    NOTHING = "nothing"  # no decision pending and no branch prepared


@dataclass(frozen=True, slots=True)
class TransactionPlan:
    step: Step
    #: resources that could not be read and that hold (or may hold) a branch of it
    waiting_on: tuple[str, ...]
    text: str

    @property
    def in_doubt(self) -> bool:
        """A branch is prepared, or may be (on a resource that cannot be read)."""
        return self.step in (Step.SETTLE, Step.WAIT)


def plan_transaction(
    *,
    decided: bool,
    logged_branches: Collection[str],
    prepared: Mapping[str, str],
    unread: Collection[str],
) -> TransactionPlan:
    """The plan of one transaction.

    ``decided``: a COMMIT decision of it is pending (a log record or a decision row);
    ``logged_branches``: the resources that record names; ``prepared``: resource -> the
    branch verdict's text, for each resource where a branch of it is found prepared now;
    ``unread``: the resources that could not be read now (unreachable, or skipped)."""
    waiting = tuple(sorted(r for r in logged_branches if r in unread and r not in prepared))
    parts = [f"{r}: {text}" for r, text in sorted(prepared.items())]
    if waiting:
        names = ", ".join(repr(r) for r in waiting)
        what = "commits it" if decided else "settles it"
        parts.append(
            f"{names}: unreachable, its branch there is unknown: waits for it (recovery then"
            f" {what} and closes the decision record)"
        )
        return TransactionPlan(Step.WAIT, waiting, "; ".join(parts))
    if prepared:
        if len(prepared) == 1 or len(set(prepared.values())) == 1:
            return TransactionPlan(Step.SETTLE, (), next(iter(prepared.values())))
        return TransactionPlan(Step.SETTLE, (), "; ".join(parts))
    if decided:
        return TransactionPlan(
            Step.END, (), "no branch is prepared: recovery closes the decision record (END)"
        )
    return TransactionPlan(Step.NOTHING, (), "nothing to do: no branch is prepared")
