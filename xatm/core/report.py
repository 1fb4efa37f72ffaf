"""What a recovery pass reports: one :class:`RecoveryAction` per branch looked at, and the
:class:`RecoveryReport` of the pass (also what the metrics and the CLI read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal[
    "commit", "rollback", "skip", "error", "heuristic", "verify", "end", "possibly-lost"
]


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    """What a pass did (or, in a dry run, would do) about one branch.

    ``action`` is one of: ``commit``, ``rollback`` (phase 2 sent), ``skip`` (left prepared,
    ``reason`` says why), ``error`` (phase 2 failed), ``verify`` (a logged branch that was not
    prepared any more: ``outcome`` says what is known of it), ``heuristic`` (a branch of a
    committed transaction that was rolled back outside xatm, or lost in a failover of its
    PostgreSQL resource), ``end`` (the decision record closed; ``branch`` is empty),
    ``possibly-lost`` (a transaction committed on a resource before it failed over, whose
    branch the new primary cannot vouch for: ``xatm.node.failover``).
    """

    gtrid: str
    resource: str
    branch: str
    action: Action
    reason: str
    outcome: str  # "done", "not-found", "planned", "left", "committed", "unknown", or an error

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "resource": self.resource,
            "branch": self.branch,
            "action": self.action,
            "reason": self.reason,
            "outcome": self.outcome,
        }


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """The result of one recovery pass."""

    committed: int = 0
    rolled_back: int = 0
    in_doubt: int = 0  # xatm branches left prepared (owner alive, unknown owner, errors)
    foreign: int = 0  # prepared transactions that are not xatm's: untouched
    ended: int = 0  # COMMIT records of a log closed with an END record
    unreachable: tuple[str, ...] = ()  # resources skipped (down, or failing)
    actions: tuple[RecoveryAction, ...] = field(default=(), repr=False)
    heuristics: int = 0  # branches of committed transactions found rolled back outside xatm
    #: transactions committed before a failover whose branch the new primary cannot vouch for
    possibly_lost: int = 0
    problems: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (resource, why)
    dry_run: bool = False
    #: branches of this node_id made by a process its log does not list: left (a twin)
    strangers: int = 0
    #: transactions whose decision names a branch on a resource this pass could not read
    #: (unknown: they wait for it; counted in ``in_doubt`` too, one per such branch)
    waiting: int = 0
    #: the resources this pass read (the others were unreachable, or not in the pass)
    reached: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True if nothing was left in doubt and every resource was reached."""
        return self.in_doubt == 0 and not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "committed": self.committed,
            "rolled_back": self.rolled_back,
            "in_doubt": self.in_doubt,
            "heuristics": self.heuristics,
            "possibly_lost": self.possibly_lost,
            "foreign": self.foreign,
            "strangers": self.strangers,
            "waiting_on_unreachable": self.waiting,
            "ended": self.ended,
            "unreachable": [{"resource": r, "error": m} for r, m in self.problems],
            "actions": [a.to_json() for a in self.actions],
        }
