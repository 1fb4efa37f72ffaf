"""The decision rule (xatm.core.decide), from tables, without servers.

Every rule of ``RULES`` has rows here, and the safety properties are checked over every
combination of facts: nothing is committed without a COMMIT decision, nothing decided COMMIT
is rolled back, nothing is done to a transaction someone else may still decide, nothing
prepared before a failover beyond the retained decisions is presumed aborted.
"""

from __future__ import annotations

import itertools

import pytest

from tests.support import ROOT
from xatm.core.decide import (
    RULES,
    Action,
    Coordinator,
    Facts,
    Logged,
    Marker,
    NodeLogState,
    Owner,
    Tenure,
    Verdict,
    decide,
    judge_request,
    known_decision,
    log_failed_over_since,
    owner_of,
    past_timeout,
    table_markdown,
    tenure,
    transaction_facts,
)
from xatm.core.xid import new_gtrid

C, R, L, P = Action.COMMIT, Action.ROLLBACK, Action.LEAVE, Action.PROBE
W, G, M = Owner, Logged, Marker

# (owner, logged, marker, expired, shared, known[, failover[, log_failover]])
#   -> (action, fence, rule number)
TABLE: list[tuple[tuple[object, ...], Action, bool, int]] = [
    # 1: a branch qualifier naming no resource here is never acted on
    ((W.DEAD_PEER, G.COMMIT, M.NOT_FLAGGED, False, False, False), L, False, 1),
    ((W.FINISHED, G.NONE, M.NOT_FLAGGED, False, True, False), L, False, 1),
    # 2, 3: running in this process
    ((W.RUNNING, G.NONE, M.NOT_FLAGGED, False, False, True), L, False, 2),
    ((W.RUNNING, G.COMMIT, M.ROW, True, True, True), L, False, 2),
    ((W.EXPIRED, G.NONE, M.UNPROBED, True, False, True), L, False, 3),
    # 4: a live peer decides its own (file log; shared log within its timeout)
    ((W.LIVE_PEER, G.COMMIT, M.NOT_FLAGGED, False, False, True), L, False, 4),
    ((W.LIVE_PEER, G.NONE, M.NOT_FLAGGED, True, False, True), L, False, 4),
    ((W.LIVE_PEER, G.COMMIT, M.NOT_FLAGGED, False, True, True), L, False, 4),
    # 5: no log of the owner here
    ((W.UNKNOWN, G.NONE, M.NOT_FLAGGED, False, False, True), L, False, 5),
    ((W.UNKNOWN, G.NONE, M.ROW, True, False, True), L, False, 5),
    # 6: contradicting decisions are left to a human
    ((W.DEAD_PEER, G.ABORT, M.ROW, False, True, True), L, False, 6),
    # 7: COMMIT logged
    ((W.FINISHED, G.COMMIT, M.NOT_FLAGGED, False, False, True), C, False, 7),
    ((W.DEAD_PEER, G.COMMIT, M.UNREAD, False, False, True), C, False, 7),
    ((W.UNFENCED, G.COMMIT, M.NOT_FLAGGED, False, False, True), C, False, 7),
    ((W.STRANGER, G.COMMIT, M.NOT_FLAGGED, False, False, True), C, False, 7),
    ((W.LIVE_PEER, G.COMMIT, M.NOT_FLAGGED, True, True, True), C, False, 7),
    # 8: ABORT logged (shared log)
    ((W.DEAD_PEER, G.ABORT, M.NOT_FLAGGED, False, True, True), R, False, 8),
    ((W.LIVE_PEER, G.ABORT, M.NOT_FLAGGED, True, True, True), R, False, 8),
    # 9: a decision row
    ((W.FINISHED, G.NONE, M.ROW, False, False, True), C, False, 9),
    ((W.UNFENCED, G.NONE, M.ROW, False, False, True), C, False, 9),
    ((W.DEAD_PEER, G.NONE, M.ROW, False, False, True), C, False, 9),
    ((W.STRANGER, G.NONE, M.ROW, False, False, True), C, False, 9),
    # 10: made by a process its node's log does not list (a twin with another log)
    ((W.STRANGER, G.NONE, M.NOT_FLAGGED, False, False, True), L, False, 10),
    ((W.STRANGER, G.NONE, M.UNPROBED, True, False, True), L, False, 10),
    ((W.STRANGER, G.NONE, M.NO_ROW, False, False, True), L, False, 10),
    # 11: this node's (0.2 gtrid), identity not held here: never presume abort
    ((W.UNFENCED, G.NONE, M.NOT_FLAGGED, False, False, True), L, False, 11),
    ((W.UNFENCED, G.NONE, M.UNPROBED, False, False, True), L, False, 11),
    ((W.UNFENCED, G.NONE, M.NO_ROW, False, True, True), L, False, 11),
    # 12: flagged: read the decision row first
    ((W.FINISHED, G.NONE, M.UNPROBED, False, False, True), P, False, 12),
    ((W.DEAD_PEER, G.NONE, M.UNPROBED, False, False, True), P, False, 12),
    ((W.PREVIOUS, G.NONE, M.UNPROBED, False, False, True), P, False, 12),
    # 13: a resource that may hold the row not read
    ((W.FINISHED, G.NONE, M.UNREAD, False, False, True), L, False, 13),
    ((W.DEAD_PEER, G.NONE, M.UNREAD, True, True, True), L, False, 13),
    # 14: prepared before a failover, and the retained decisions do not reach back
    ((W.FINISHED, G.NONE, M.NOT_FLAGGED, False, False, True, True), L, False, 14),
    ((W.PREVIOUS, G.NONE, M.NOT_FLAGGED, False, False, True, True), L, False, 14),
    ((W.DEAD_PEER, G.NONE, M.NO_ROW, False, True, True, True), L, False, 14),
    ((W.LIVE_PEER, G.NONE, M.NOT_FLAGGED, True, True, True, True), L, False, 14),
    # ... but a COMMIT found (retained, ended or not) is obeyed
    ((W.FINISHED, G.COMMIT, M.NOT_FLAGGED, False, False, True, True), C, False, 7),
    # 15: the shared log's own database failed over since the transaction began
    ((W.FINISHED, G.NONE, M.NOT_FLAGGED, False, True, True, False, True), L, False, 15),
    ((W.DEAD_PEER, G.NONE, M.NOT_FLAGGED, False, True, True, False, True), L, False, 15),
    ((W.PREVIOUS, G.NONE, M.NOT_FLAGGED, False, True, True, False, True), L, False, 15),
    ((W.LIVE_PEER, G.NONE, M.NOT_FLAGGED, True, True, True, False, True), L, False, 15),
    # ... but a decision the new primary does have is obeyed
    ((W.DEAD_PEER, G.COMMIT, M.NOT_FLAGGED, False, True, True, False, True), C, False, 7),
    ((W.DEAD_PEER, G.ABORT, M.NOT_FLAGGED, False, True, True, False, True), R, False, 8),
    # 16: presumed abort (fenced with the shared log)
    ((W.FINISHED, G.NONE, M.NOT_FLAGGED, False, False, True), R, False, 16),
    ((W.PREVIOUS, G.NONE, M.NOT_FLAGGED, False, False, True), R, False, 16),
    ((W.PREVIOUS, G.NONE, M.NOT_FLAGGED, False, True, True), R, True, 16),
    ((W.DEAD_PEER, G.NONE, M.NO_ROW, False, False, True), R, False, 16),
    ((W.FINISHED, G.NONE, M.NOT_FLAGGED, False, True, True), R, True, 16),
    ((W.DEAD_PEER, G.NONE, M.NOT_FLAGGED, False, True, True), R, True, 16),
    ((W.LIVE_PEER, G.NONE, M.NOT_FLAGGED, True, True, True), R, True, 16),
]


def _facts(row: tuple[object, ...]) -> Facts:
    return Facts(*row)  # type: ignore[arg-type]


@pytest.mark.parametrize(("facts", "action", "fence", "rule"), TABLE)
def test_table(facts: tuple[object, ...], action: Action, fence: bool, rule: int) -> None:
    verdict = decide(_facts(facts))
    assert (verdict.action, verdict.fence) == (action, fence)
    assert verdict.reason == RULES[rule - 1].reason


def test_every_rule_has_rows() -> None:
    assert {row[3] for row in TABLE} == set(range(1, len(RULES) + 1))


ALL = [
    Facts(*combo)
    for combo in itertools.product(
        list(Owner),
        list(Logged),
        list(Marker),
        [False, True],
        [False, True],
        [False, True],
        [False, True],
        [False, True],
    )
]


def test_never_commits_without_a_commit_decision() -> None:
    for f in ALL:
        if decide(f).action is Action.COMMIT:
            assert f.logged is Logged.COMMIT or f.marker is Marker.ROW, f


def test_never_rolls_back_a_commit() -> None:
    for f in ALL:
        if f.logged is Logged.COMMIT or f.marker is Marker.ROW:
            assert decide(f).action is not Action.ROLLBACK, f


def test_never_acts_for_an_owner_that_may_still_decide() -> None:
    for f in ALL:
        verdict = decide(f)
        may_decide = f.owner in (Owner.RUNNING, Owner.EXPIRED, Owner.UNKNOWN) or (
            f.owner is Owner.LIVE_PEER and not (f.shared_log and f.expired)
        )
        if may_decide or not f.known_resource:
            assert verdict.action is Action.LEAVE, f
        # a process no log here lists may be alive and may have logged COMMIT elsewhere:
        # only a decision seen here (logged, or a decision row) is acted on
        if f.owner is Owner.STRANGER and f.logged is Logged.NONE and f.marker is not M.ROW:
            assert verdict.action is Action.LEAVE, f


def test_presumed_abort_needs_every_marker_place_read_and_the_node_held() -> None:
    for f in ALL:
        verdict = decide(f)
        if verdict.action is Action.ROLLBACK and f.logged is not Logged.ABORT:
            assert f.marker in (Marker.NOT_FLAGGED, Marker.NO_ROW), f
            assert f.owner not in (Owner.UNFENCED, Owner.STRANGER), f
            assert verdict.fence == f.shared_log, f
        if verdict.action is Action.PROBE:
            assert f.marker is Marker.UNPROBED, f
            assert f.owner not in (Owner.UNFENCED, Owner.STRANGER), f


def test_never_presumes_abort_across_a_failover_beyond_the_retained_decisions() -> None:
    for f in ALL:
        if f.failover and f.logged is Logged.NONE and f.marker is not Marker.ROW:
            assert decide(f).action in (Action.LEAVE, Action.PROBE), f


def test_never_presumes_abort_after_a_failover_of_the_shared_logs_database() -> None:
    """Its COMMIT row may have been lost with the writes the new primary never received:
    only a decision found on the new primary is acted on."""
    for f in ALL:
        if f.log_failover and f.logged is Logged.NONE and f.marker is not Marker.ROW:
            assert decide(f).action in (Action.LEAVE, Action.PROBE), f


@pytest.mark.parametrize(
    ("created", "switches", "expected"),
    [
        (100.0, (), False),  # the log never failed over
        (100.0, (200.0,), True),  # begun before the failover
        (204.0, (200.0,), True),  # within the clock allowance: counted as before
        (206.0, (200.0,), False),  # begun after it: its decision went to the new primary
        (300.0, (200.0, 400.0), True),  # a second failover since
    ],
)
def test_the_log_failover_fact(created: float, switches: tuple[float, ...], expected: bool) -> None:
    assert log_failed_over_since(created, switches) is expected


def test_manual_requests_are_judged_against_the_rule() -> None:
    commit, rollback = Verdict(C, "x"), Verdict(R, "y")
    assert judge_request(commit, C) is None and judge_request(rollback, R) is None
    assert "COMMIT decision is logged" in (judge_request(commit, R) or "")
    assert "presumed aborted" in (judge_request(rollback, C) or "")
    assert judge_request(Verdict(L, "its coordinator is alive"), R) == "its coordinator is alive"


def test_timeout_fact() -> None:
    plain = new_gtrid("n")
    long = new_gtrid("n", long=True)
    assert not past_timeout(plain, 100.0, 130.0, 30.0)
    assert past_timeout(plain, 100.0, 136.0, 30.0)
    assert not past_timeout(long, 100.0, 1e9, 30.0)


def test_docs_print_the_same_table() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    assert table_markdown() in doc


# -- whose branch: tenure (incarnations) and the owner fact -----------------------------------
MINE, OTHER, TWIN = "aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"
LISTED = frozenset({MINE, OTHER})

TENURES = [
    # (incarnation in the gtrid, this process's, listed by the node's log) -> tenure
    (None, MINE, LISTED, "legacy"),
    (MINE, MINE, LISTED, "mine"),
    (OTHER, MINE, LISTED, "previous"),
    (TWIN, MINE, LISTED, "stranger"),
    (OTHER, None, LISTED, "previous"),  # a dead peer's log lists it
    (TWIN, None, LISTED, "stranger"),
    (OTHER, None, None, "stranger"),  # a log that lists nobody (0.2, or unreadable)
    (OTHER, None, frozenset(), "stranger"),
]


@pytest.mark.parametrize(("incarnation", "own", "listed", "expected"), TENURES)
def test_tenure(
    incarnation: str | None, own: str | None, listed: frozenset[str] | None, expected: str
) -> None:
    assert tenure(incarnation, own, listed) == expected


OWNERS = [
    # (own node, made by, the node's log, legacy lock) -> owner
    (True, "mine", "held", False, W.FINISHED),
    (True, "previous", "held", False, W.PREVIOUS),
    (True, "stranger", "held", True, W.STRANGER),  # holding the lock proves nothing
    (True, "legacy", "held", True, W.FINISHED),
    (True, "legacy", "held", False, W.UNFENCED),
    (False, "previous", "held", False, W.DEAD_PEER),
    (False, "stranger", "held", False, W.STRANGER),
    (False, "legacy", "held", False, W.DEAD_PEER),
    (False, "legacy", "held", True, W.LIVE_PEER),
    (False, "previous", "alive", False, W.LIVE_PEER),
    (False, "previous", "unexamined", False, W.LIVE_PEER),
    (False, "previous", "unknown", False, W.UNKNOWN),
    (False, "previous", "corrupt", False, W.UNKNOWN),
    # the shared log fences every presumed abort with a conditional ABORT row
    (True, "mine", "shared", False, W.FINISHED),
    (True, "stranger", "shared", False, W.PREVIOUS),
    (True, "legacy", "shared", False, W.PREVIOUS),
    (False, "stranger", "shared", False, W.DEAD_PEER),
    (False, "stranger", "alive", False, W.LIVE_PEER),
]


@pytest.mark.parametrize(("own", "made_by", "log", "lock", "expected"), OWNERS)
def test_owner_of(
    own: bool, made_by: Tenure, log: NodeLogState, lock: bool, expected: Owner
) -> None:
    assert owner_of(own_node=own, made_by=made_by, log=log, legacy_lock=lock) is expected


def test_a_process_no_log_here_lists_is_never_presumed_aborted() -> None:
    """Whatever the log kind and lock: a file log's stranger is never rolled back without a
    decision seen here (its process may be alive, with a COMMIT in a log of its own)."""
    for own, log, lock in itertools.product(
        [False, True], ["held", "alive", "unknown", "corrupt", "unexamined"], [False, True]
    ):
        owner = owner_of(own_node=own, made_by="stranger", log=log, legacy_lock=lock)  # type: ignore[arg-type]
        for marker, expired, known in itertools.product(list(Marker), [False, True], [False, True]):
            f = Facts(owner, Logged.NONE, marker, expired, False, known)
            if marker is not Marker.ROW:
                assert decide(f).action in (Action.LEAVE,), f


TRANSACTIONS = [
    # whole transactions, as ``xatm indoubt`` and manual resolution see them from the log:
    # (coordinator, running, made by, logged, marker, shared) -> (action, known decision)
    ("this-process", True, "mine", G.NONE, M.NOT_FLAGGED, False, L, None),
    ("this-process", False, "mine", G.NONE, M.NOT_FLAGGED, False, R, "abort"),
    ("this-process", False, "legacy", G.NONE, M.NOT_FLAGGED, False, R, "abort"),
    ("this-process", False, "stranger", G.NONE, M.NOT_FLAGGED, False, L, None),  # a twin's
    ("this-process", False, "stranger", G.NONE, M.NOT_FLAGGED, True, R, "abort"),  # fenced
    ("this-process", False, "previous", G.COMMIT, M.NOT_FLAGGED, False, C, "commit"),
    ("this-process", False, "previous", G.NONE, M.UNREAD, False, L, None),
    ("this-process", False, "previous", G.NONE, M.ROW, False, C, "commit"),
    ("dead", False, "previous", G.NONE, M.NOT_FLAGGED, False, R, "abort"),
    ("dead", False, "stranger", G.NONE, M.NOT_FLAGGED, False, L, None),
    ("dead", False, "previous", G.ABORT, M.NOT_FLAGGED, True, R, "abort"),
    ("alive", False, "previous", G.COMMIT, M.NOT_FLAGGED, False, L, "commit"),
    ("alive", False, "previous", G.NONE, M.NOT_FLAGGED, True, L, None),
    ("unknown", False, "previous", G.NONE, M.NOT_FLAGGED, False, L, None),
    ("unknown", False, "previous", G.NONE, M.NOT_FLAGGED, True, R, "abort"),  # in the table
]


@pytest.mark.parametrize(
    ("coordinator", "running", "made_by", "logged", "marker", "shared", "action", "decision"),
    TRANSACTIONS,
)
def test_a_transaction_judged_from_its_log(
    coordinator: Coordinator,
    running: bool,
    made_by: Tenure,
    logged: Logged,
    marker: Marker,
    shared: bool,
    action: Action,
    decision: str | None,
) -> None:
    facts = transaction_facts(
        coordinator=coordinator,
        running=running,
        made_by=made_by,
        logged=logged,
        marker=marker,
        shared=shared,
    )
    verdict = decide(facts)
    assert verdict.action is action
    assert known_decision(facts, verdict) == decision


def test_an_operator_is_judged_by_the_same_rule_without_a_branch() -> None:
    """Manual resolution asks the rule of a transaction whose branches the plan did not list
    (a resource not reached): a twin's transaction, with nothing logged here, may be neither
    rolled back nor committed without force (the split the simulator found at seed 454)."""
    twin = transaction_facts(
        coordinator="this-process",
        running=False,
        made_by="stranger",
        logged=Logged.NONE,
        marker=Marker.NOT_FLAGGED,
        shared=False,
    )
    verdict = decide(twin)
    assert judge_request(verdict, Action.ROLLBACK) is not None
    assert judge_request(verdict, Action.COMMIT) is not None
