"""The decision rule: given what is known about one prepared branch, commit, roll back or leave it.

This is the only place where that rule is written. It does no I/O. Recovery gathers the facts
and carries the verdict out; ``xatm indoubt`` / ``xatm show`` print it as the plan; manual
resolution acts without ``--force`` only when the operator's request agrees with it.

The facts about a branch found prepared (:class:`Facts`):

* ``owner``: whose transaction it is, seen from here (:class:`Owner`);
* ``logged``: the decision found in the coordinator log (:class:`Logged`);
* ``marker``: whether a commit-marker decision row exists (:class:`Marker`);
* ``expired``: older than its timeout plus the clock-skew allowance, and not a long-timeout
  transaction (only used with the shared log, where any host may abort an old transaction);
* ``shared_log``: the log is the shared PostgreSQL table (a presumed abort is then first
  written as a conditional ABORT row, which a late COMMIT loses: fencing);
* ``known_resource``: the branch qualifier names a resource configured here;
* ``failover``: the branch's resource failed over (a new PostgreSQL timeline) after the
  branch was created, and the log's retained decisions do not reach back to its creation
  (``xatm.node.failover``): an ended COMMIT decision of it may have been dropped already;
* ``log_failover``: the shared log's own database failed over (a new timeline) after the
  transaction began (:func:`log_failed_over_since`): its COMMIT row may have been lost with
  the writes the new primary never received (a decision found there all the same comes
  first in the table).

:data:`RULES` is the table, read top to bottom; the first rule that matches gives the verdict.
docs/protocol.md prints the same table (a test checks that it matches :func:`table_markdown`).
A verdict of ``probe`` asks the caller to read the commit-marker decision row (which fences it
when absent) and decide again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from xatm.core import bugs as _bugs
from xatm.core.xid import has_long_timeout

#: seconds allowed for clock differences between hosts sharing a log, on top of the timeout
SKEW = 5.0


def log_failed_over_since(created_at: float, switches: Sequence[float]) -> bool:
    """The ``log_failover`` fact: the shared log's database came up on a new timeline (first
    seen at one of ``switches``, the log server's clock) after a transaction created at
    ``created_at`` (its coordinator's clock) began, allowing :data:`SKEW` between clocks."""
    return any(created_at <= seen + SKEW for seen in switches)


def past_timeout(gtrid: str, created_at: float, now: float, timeout: float) -> bool:
    """The ``expired`` fact: a transaction older than ``timeout`` plus :data:`SKEW`, unless
    it carries the long-timeout flag (then only its own coordinator judges its age)."""
    return now - created_at > timeout + SKEW and not has_long_timeout(gtrid)


class Owner(enum.Enum):
    """Whose transaction a branch belongs to, seen from the process deciding."""

    RUNNING = "running"  # this process runs it, within its timeout
    EXPIRED = "expired"  # this process runs it, past its timeout, undecided: marked aborted
    FINISHED = "finished"  # made by this process (its incarnation), not running any more
    PREVIOUS = "previous"  # this node's, made by an earlier process of it that held this
    # node's log (its incarnation is listed there) and has ended; with the shared log, any
    # other process of this node (a presumed abort there is a fenced ABORT write)
    STRANGER = "stranger"  # this node's (or a dead peer's), made by a process whose
    # incarnation the node's log does not list: a second process with the same node_id and
    # another log. Nothing here knows what it decided
    UNFENCED = "unfenced"  # a gtrid without incarnation (xatm 0.2) of this node, not running
    # here, whose node identity lock on the branch's resource is not held by this process
    LIVE_PEER = "live-peer"  # another node whose coordinator is alive
    DEAD_PEER = "dead-peer"  # another node whose coordinator is dead (its log held here)
    UNKNOWN = "unknown"  # no log of its node here: nothing can tell what it decided


#: whose tenure made a gtrid, seen from the log that holds its node: ``mine`` (this process),
#: ``previous`` (an incarnation that log lists), ``stranger`` (one it does not list),
#: ``legacy`` (a gtrid without incarnation, made by xatm 0.2)
Tenure = Literal["mine", "previous", "stranger", "legacy"]
#: the log of a gtrid's node, seen from here: ``held`` (this node's log, or a dead peer's
#: taken over by this pass), ``shared`` (the shared table), ``alive`` (a live peer holds it),
#: ``unknown`` (no log of the node here), ``corrupt``, ``unexamined`` (not looked at yet)
NodeLogState = Literal["held", "shared", "alive", "unknown", "corrupt", "unexamined"]


def tenure(incarnation: str | None, own: str | None, listed: frozenset[str] | None) -> Tenure:
    """Whose tenure made a gtrid of ``incarnation``: ``own`` is this process's (None when
    the node is not this one), ``listed`` the incarnations the node's log lists."""
    if incarnation is None:
        return "legacy"
    if incarnation == own:
        return "mine"
    if (listed is not None and incarnation in listed) or _bugs.on("twin_is_previous"):
        return "previous"
    return "stranger"


def owner_of(
    *,
    own_node: bool,
    made_by: Tenure,
    log: NodeLogState,
    legacy_lock: bool = False,
) -> Owner:
    """The ``owner`` fact of a branch that this process is not running.

    ``legacy_lock`` matters only for gtrids without incarnation: for this node's, whether
    this process holds the node's identity lock on the branch's resource; for a peer's,
    whether some session holds that peer's identity lock there (it then counts as alive)."""
    if log == "shared":
        if own_node:
            return Owner.FINISHED if made_by == "mine" else Owner.PREVIOUS
        return Owner.DEAD_PEER  # the caller asked the log: a peer alive there is LIVE_PEER
    if log in ("unknown", "corrupt"):
        return Owner.UNKNOWN
    if log in ("alive", "unexamined"):
        return Owner.LIVE_PEER
    if made_by == "legacy":
        if own_node:
            return Owner.FINISHED if legacy_lock else Owner.UNFENCED
        return Owner.LIVE_PEER if legacy_lock else Owner.DEAD_PEER
    if made_by == "stranger":
        return Owner.STRANGER
    if own_node:
        return Owner.FINISHED if made_by == "mine" else Owner.PREVIOUS
    return Owner.DEAD_PEER


#: a transaction's coordinator as its node's log shows it (``OwnerState`` of the logs):
#: this process, another live process, dead (its log can be held), or no log of it here
Coordinator = Literal["this-process", "alive", "dead", "unknown"]


def log_state(coordinator: Coordinator, shared: bool) -> NodeLogState:
    """The ``log`` of :func:`owner_of` for a transaction whose coordinator is ``coordinator``."""
    if coordinator == "alive":
        return "alive"
    if shared:
        return "shared"
    return "unknown" if coordinator == "unknown" else "held"


class Logged(enum.Enum):
    """The decision found in the coordinator log."""

    COMMIT = "commit"
    ABORT = "abort"  # an ABORT row of the shared log (a fenced abort)
    NONE = "none"  # no decision (presumed abort, once the owner can no longer decide)


class Marker(enum.Enum):
    """What is known of a commit-marker decision row for the transaction."""

    NOT_FLAGGED = "not-flagged"  # its gtrid has no marker flag: the log alone decides
    UNPROBED = "unprobed"  # flagged, not read yet
    ROW = "row"  # the decision row is committed: the decision is COMMIT
    NO_ROW = "no-row"  # every resource that may hold it was read (and fenced): no row
    UNREAD = "unread"  # a resource that may hold it cannot be read (down or not configured)


class Action(enum.Enum):
    COMMIT = "commit"
    ROLLBACK = "rollback"
    LEAVE = "leave"
    PROBE = "probe"  # read the commit-marker row, then decide again


@dataclass(frozen=True, slots=True)
class Facts:
    owner: Owner
    logged: Logged = Logged.NONE
    marker: Marker = Marker.NOT_FLAGGED
    expired: bool = False
    shared_log: bool = False
    known_resource: bool = True
    failover: bool = False
    log_failover: bool = False


def transaction_facts(
    *,
    coordinator: Coordinator,
    running: bool,
    made_by: Tenure,
    logged: Logged,
    marker: Marker,
    shared: bool,
    expired: bool = False,
    known_resource: bool = True,
    failover: bool = False,
    log_failover: bool = False,
) -> Facts:
    """The facts of a whole transaction, read from its coordinator's log rather than from
    one branch (``xatm indoubt`` and manual resolution, which may see no branch at all).
    A gtrid without incarnation of this process's node counts as fenced: the node's
    identity locks are this process's."""
    own = coordinator == "this-process"
    owner = (
        Owner.RUNNING
        if running
        else owner_of(
            own_node=own, made_by=made_by, log=log_state(coordinator, shared), legacy_lock=own
        )
    )
    return Facts(
        owner,
        logged=logged,
        marker=marker,
        expired=expired,
        shared_log=shared,
        known_resource=known_resource,
        failover=failover,
        log_failover=log_failover,
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one branch, and why (the reason is shown to operators)."""

    action: Action
    reason: str
    #: roll back only after writing a conditional ABORT to the shared log (a COMMIT that
    #: wins that race is obeyed instead)
    fence: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: ``when`` (in words, for the docs) and its test, then the verdict."""

    when: str
    test: Callable[[Facts], bool]
    action: Action
    reason: str
    fence_if_shared: bool = False


def _may_abort_live(f: Facts) -> bool:
    """A live peer's transaction that any host may abort: shared log, past its timeout."""
    return f.shared_log and f.expired


RULES: tuple[Rule, ...] = (
    Rule(
        "the branch qualifier names no resource configured here",
        lambda f: not f.known_resource,
        Action.LEAVE,
        "its branch qualifier names no resource configured here",
    ),
    Rule(
        "running in this process",
        lambda f: f.owner is Owner.RUNNING,
        Action.LEAVE,
        "its transaction is still running in this process",
    ),
    Rule(
        "running in this process, past its timeout and undecided",
        lambda f: f.owner is Owner.EXPIRED,
        Action.LEAVE,
        "past its timeout: marked aborted, its coordinator rolls it back",
    ),
    Rule(
        "owner is a live peer (file log; or shared log within its timeout)",
        lambda f: f.owner is Owner.LIVE_PEER and not _may_abort_live(f),
        Action.LEAVE,
        "its coordinator is alive and resolves its own branches",
    ),
    Rule(
        "owner unknown (no log of its node here)",
        lambda f: f.owner is Owner.UNKNOWN,
        Action.LEAVE,
        "no log of its coordinator here: nothing can tell what it decided",
    ),
    Rule(
        "ABORT logged and a commit-marker decision row found (they contradict)",
        lambda f: f.logged is Logged.ABORT and f.marker is Marker.ROW,
        Action.LEAVE,
        "contradicting decisions (an ABORT logged and a commit-marker row): resolve by hand",
    ),
    Rule(
        "COMMIT logged",
        lambda f: f.logged is Logged.COMMIT,
        Action.COMMIT,
        "decision COMMIT is logged",
    ),
    Rule(
        "ABORT logged (shared log)",
        lambda f: f.logged is Logged.ABORT,
        Action.ROLLBACK,
        "decision ABORT is logged (fenced)",
    ),
    Rule(
        "commit-marker decision row found",
        lambda f: f.marker is Marker.ROW,
        Action.COMMIT,
        "its commit-marker decision row is committed",
    ),
    Rule(
        "made by a process its node's log does not list (a twin with another log)",
        lambda f: f.owner is Owner.STRANGER,
        Action.LEAVE,
        "made by a process of its node_id that its node's log does not list (a second"
        " process with the same node_id, with another log): nothing here knows its decision",
    ),
    Rule(
        "this node's (made by xatm 0.2), identity lock on the resource not held here",
        lambda f: f.owner is Owner.UNFENCED,
        Action.LEAVE,
        "this process does not hold its node's identity lock on the resource: another"
        " process with the same node_id may own it",
    ),
    Rule(
        "marker-flagged, decision row not read yet",
        lambda f: f.marker is Marker.UNPROBED,
        Action.PROBE,
        "its decision may be a commit-marker row: read it first",
    ),
    Rule(
        "marker-flagged, a resource that may hold the row not read",
        lambda f: f.marker is Marker.UNREAD,
        Action.LEAVE,
        "its decision may be a commit-marker row on a resource not read",
    ),
    Rule(
        "no decision found; its resource failed over since, beyond the decisions retained",
        lambda f: f.failover,
        Action.LEAVE,
        "its resource failed over after it was prepared and the log no longer holds the"
        " decisions of that time: it may have been decided COMMIT (resolve by hand)",
    ),
    Rule(
        "no decision found; the shared log's database failed over since it began",
        lambda f: f.log_failover,
        Action.LEAVE,
        "the shared log's database failed over (a new timeline) after it began: its COMMIT"
        " decision may have been lost with the writes the new primary never received"
        " (resolve by hand)",
    ),
    Rule(
        "no decision; owner finished, ended (an earlier process of the node), dead, or"
        " (shared log) past its timeout",
        lambda f: True,
        Action.ROLLBACK,
        "no COMMIT decision: presumed abort",
        fence_if_shared=True,
    ),
)


def decide(facts: Facts) -> Verdict:
    """The verdict of the first rule of :data:`RULES` that matches ``facts``."""
    for rule in RULES:
        if rule.test(facts):
            return Verdict(rule.action, rule.reason, rule.fence_if_shared and facts.shared_log)
    raise AssertionError("the last rule matches everything")  # pragma: no cover


def judge_request(verdict: Verdict, request: Action) -> str | None:
    """Why an operator's ``commit`` / ``rollback`` request disagrees with the rule (None if
    it agrees: it may then be carried out without ``--force``)."""
    if verdict.action is request:
        return None
    if verdict.action is Action.COMMIT:
        return (
            f"its COMMIT decision is logged ({verdict.reason}): rolling it back leaves the"
            " branches committed so far committed (a heuristic outcome)"
        )
    if verdict.action is Action.ROLLBACK:
        return (
            "no COMMIT decision is logged: the transaction is presumed aborted and recovery"
            f" rolls it back ({verdict.reason})"
        )
    return verdict.reason


def known_decision(facts: Facts, verdict: Verdict) -> Literal["commit", "abort"] | None:
    """The transaction's decision as far as ``facts`` and their verdict tell it: ``commit``
    (logged, or a commit-marker row), ``abort`` (an ABORT logged, or presumed by the rule),
    None (nothing here can tell)."""
    if facts.logged is Logged.COMMIT or facts.marker is Marker.ROW:
        return "commit"
    if facts.logged is Logged.ABORT or verdict.action is Action.ROLLBACK:
        return "abort"
    return None


def describe(verdict: Verdict) -> str:
    """The verdict as the plan ``xatm indoubt`` shows."""
    if verdict.action is Action.COMMIT:
        return f"commit ({verdict.reason})"
    if verdict.action is Action.ROLLBACK:
        fenced = "; an ABORT is logged first" if verdict.fence else ""
        return f"roll back ({verdict.reason}{fenced})"
    if verdict.action is Action.PROBE:
        return "read its commit-marker decision row, then commit (row) or roll back (none)"
    return f"left prepared: {verdict.reason}"


def table_markdown() -> str:
    """:data:`RULES` as the Markdown table printed in docs/protocol.md."""
    lines = ["| # | when (first match wins) | action | reason |", "|---|---|---|---|"]
    for i, rule in enumerate(RULES, 1):
        action = rule.action.value + (
            " (fenced ABORT first, shared log)" if rule.fence_if_shared else ""
        )
        lines.append(f"| {i} | {rule.when} | {action} | {rule.reason} |")
    return "\n".join(lines)
