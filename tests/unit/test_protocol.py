"""The commit protocol (``TransactionCore``) driven with scripted outcomes: no server, no thread.

Each case enlists branches whose connections are plain strings, runs the protocol's
generator, answers every operation it yields from the case's script (what is not scripted
succeeds), and checks the operations in order, the final state, the branches' states and
what was raised. Failpoints appear in the trace as ``@name``, at the step where the process
would crash; the decision fence as ``fence`` (answered as the drivers do, by
``try_decide``, unless scripted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from xatm.core import failpoint
from xatm.core.parallel import Outcome
from xatm.core.participant import BranchVotedNo, Participant, PhaseTwo, Prepared, Vote
from xatm.core.steps import (
    AwaitWork,
    Branch,
    BranchState,
    CommitOnePhase,
    CommitPrepared,
    Failpoint,
    LogCommit,
    LogEnd,
    Operation,
    PassFence,
    Prepare,
    Rollback,
    Steps,
)
from xatm.core.xid import branch_xid
from xatm.errors import (
    IdentityNotHeld,
    LogError,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
)
from xatm.log.base import DecisionNotLogged
from xatm.transactions.protocol import TransactionCore, TransactionState

GTRID = "unit-0001"
COMMITTED, PREPARED, ROLLED_BACK, UNKNOWN = (
    BranchState.COMMITTED,
    BranchState.PREPARED,
    BranchState.ROLLED_BACK,
    BranchState.UNKNOWN,
)


class Pool:
    """Where branches' connections go back: recorded."""

    def __init__(self) -> None:
        self.put_back: list[str] = []
        self.discarded: list[str] = []

    def put(self, conn: str) -> None:
        self.put_back.append(conn)

    def discard(self, conn: str) -> None:
        self.discarded.append(conn)


@dataclass
class Hooks:
    """The process the protocol runs in, scripted (``xatm.transactions.protocol.Hooks``)."""

    marker: str | None = None  # the resource carrying the decision (commit-marker path)
    lost: BaseException | None = None  # the node's identity lease is not held
    phases: list[str] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)
    incomplete: list[list[str]] = field(default_factory=list)

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def unheld(self, resources: Iterable[str]) -> BaseException | None:
        return self.lost

    def marker_candidate(self, branches: list[Branch]) -> str | None:
        return self.marker

    def finished_markers(self, resource: str) -> list[str]:
        return []

    def marker_finished(self, resource: str, gtrid: str) -> None:
        self.finished.append((resource, gtrid))

    def phase_two_incomplete(self, gtrid: str, pending: list[str]) -> None:
        self.incomplete.append(list(pending))


def begin(*resources: str, hooks: Hooks | None = None) -> tuple[TransactionCore, Pool]:
    """A transaction with an active branch on each of ``resources`` (no I/O: the
    connections are strings, the participant is never called by the protocol)."""
    core = TransactionCore(GTRID, 30.0, hooks or Hooks())
    pool = Pool()
    for r in resources:
        participant = cast("Participant", object())
        core.add_branch(Branch(r, branch_xid(GTRID, r), participant, pool, f"conn-{r}"))
    return core, pool


Answer = object  # a value, or an exception the operation raised


def label(op: Operation) -> list[str]:
    """What the trace shows for ``op`` (one entry per branch for Prepare, CommitPrepared)."""
    if isinstance(op, Prepare):
        return [f"prepare {b.resource}" for b in op.branches]
    if isinstance(op, CommitPrepared):
        return [f"commit {b.resource}" for b in op.branches]
    if isinstance(op, CommitOnePhase):
        decision = any(sql.startswith("INSERT") for sql, _ in op.before)
        return [f"commit one phase {op.branch.resource}" + (" with decision" if decision else "")]
    if isinstance(op, Rollback):
        return [f"rollback {'prepared ' if op.prepared else ''}{op.branch.resource}"]
    if isinstance(op, LogCommit):
        return [f"log COMMIT {','.join(op.resources)}"]
    if isinstance(op, LogEnd):
        return ["log END"]
    if isinstance(op, PassFence):
        return ["fence"]
    if isinstance(op, Failpoint):
        return [f"@{op.name}"]
    assert isinstance(op, AwaitWork)
    return ["await work"]


def outcome(answer: Answer) -> Outcome[Any]:
    return Outcome(None, answer) if isinstance(answer, BaseException) else Outcome(answer)


DEFAULTS: dict[str, Answer] = {"prepare": Prepared(Vote.PREPARED, 7), "commit": PhaseTwo.DONE}


def answer(core: TransactionCore, op: Operation, script: dict[str, Answer]) -> Any:
    """What a driver would send back for ``op``: from the script, else success."""
    names = label(op)
    if isinstance(op, PassFence):
        return script["fence"] if "fence" in script else core.try_decide(op.refuse)
    if isinstance(op, Prepare | CommitPrepared):
        return [outcome(script.get(n, DEFAULTS[n.split()[0]])) for n in names]
    if isinstance(op, Failpoint):
        return None
    return outcome(script.get(names[0]))


def drive(
    core: TransactionCore,
    steps: Steps[None],
    script: dict[str, Answer],
    ops: list[Operation] | None = None,
) -> tuple[list[str], BaseException | None]:
    """Run ``steps`` to their end; the operations in order (also into ``ops``), and what
    they raised."""
    trace: list[str] = []
    result: Any = None
    while True:
        try:
            op = steps.send(result)
        except StopIteration:
            return trace, None
        except Exception as e:
            return trace, e
        trace += label(op)
        if ops is not None:
            ops.append(op)
        result = answer(core, op, script)


def run_until(core: TransactionCore, steps: Steps[None], kind: type[Any]) -> Any:
    """Run ``steps`` with every operation succeeding until one of ``kind`` is yielded."""
    op = steps.send(None)
    while not isinstance(op, kind):
        op = steps.send(answer(core, op, {}))
    return op


# -- the cases ------------------------------------------------------------------------------
BEFORE_DECISION = ["@before_prepare", "prepare a", "prepare b", "@after_prepare", "fence"]
DECIDED = [*BEFORE_DECISION, "@before_decision", "log COMMIT a,b", "@after_decision"]
COMMIT = [*DECIDED, "commit a", "commit b", "log END"]
MARKER = ["@before_prepare", "prepare b", "@after_prepare", "fence"]
MARKER_COMMIT = [*MARKER, "commit one phase a with decision", "@after_decision", "commit b"]


@dataclass
class Case:
    name: str
    resources: tuple[str, ...]
    script: dict[str, Answer]
    trace: list[str]
    state: TransactionState
    branches: dict[str, BranchState]
    raises: type[BaseException] | None = None
    marker: str | None = None
    setup: Callable[[TransactionCore, Hooks], None] | None = None


def lose_identity(core: TransactionCore, hooks: Hooks) -> None:
    hooks.lost = IdentityNotHeld("the lease lapsed", resource="a")


def expire(core: TransactionCore, hooks: Hooks) -> None:
    core.deadline = time.monotonic() - 1


def rollback_only(core: TransactionCore, hooks: Hooks) -> None:
    core.set_rollback_only("the application said so")


def cancelled(core: TransactionCore, hooks: Hooks) -> None:
    assert core.try_refuse("cancelled")


CONN_LOST = ConnectionError("server closed the connection")
C, RB, DOUBT = TransactionState.COMMITTED, TransactionState.ROLLED_BACK, TransactionState.IN_DOUBT

CASES = [
    # commit ------------------------------------------------------------------------------
    Case("two-branch commit", ("a", "b"), {}, COMMIT, C, {"a": COMMITTED, "b": COMMITTED}),
    Case("no branch", (), {}, [], C, {}),
    Case("one branch: one phase", ("a",), {}, ["fence", "commit one phase a"], C, {"a": COMMITTED}),
    Case(
        "one branch votes no",
        ("a",),
        {"commit one phase a": BranchVotedNo("duplicate key")},
        ["fence", "commit one phase a"],
        RB,
        {"a": ROLLED_BACK},
        TransactionRolledBack,
    ),
    Case(
        "one branch: connection lost in its commit",
        ("a",),
        {"commit one phase a": CONN_LOST},
        ["fence", "commit one phase a"],
        DOUBT,
        {"a": UNKNOWN},
        TransactionInDoubt,
    ),
    Case(
        "one branch: refused at the fence",
        ("a",),
        {},
        ["fence", "rollback a"],
        RB,
        {"a": ROLLED_BACK},
        TransactionRolledBack,
        setup=cancelled,
    ),
    Case(
        "a read-only vote leaves one writer: no decision logged",
        ("a", "b"),
        {"prepare a": Prepared(Vote.READ_ONLY)},
        [*BEFORE_DECISION, "@after_decision", "commit b"],
        C,
        {"a": COMMITTED, "b": COMMITTED},
    ),
    # phase 1 fails: rolled back, no COMMIT logged -------------------------------------------
    Case(
        "vote no",
        ("a", "b"),
        {"prepare b": BranchVotedNo("serialization failure")},
        ["@before_prepare", "prepare a", "prepare b", "rollback prepared a"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
    ),
    Case(
        "a prepare fails midway: left to recovery",
        ("a", "b"),
        {"prepare b": CONN_LOST},
        ["@before_prepare", "prepare a", "prepare b", "rollback prepared a"],
        RB,
        {"a": ROLLED_BACK, "b": UNKNOWN},
        TransactionRolledBack,
    ),
    Case(
        "vote no, and the other's rollback fails",
        ("a", "b"),
        {"prepare b": BranchVotedNo("no"), "rollback prepared a": CONN_LOST},
        ["@before_prepare", "prepare a", "prepare b", "rollback prepared a"],
        RB,
        {"a": UNKNOWN, "b": ROLLED_BACK},
        TransactionRolledBack,
    ),
    Case(
        "timeout before prepare",
        ("a", "b"),
        {},
        ["rollback a", "rollback b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionTimeout,
        setup=expire,
    ),
    Case(
        "set_rollback_only",
        ("a", "b"),
        {},
        ["rollback a", "rollback b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
        setup=rollback_only,
    ),
    # the decision -----------------------------------------------------------------------
    Case(
        "refused at the fence (recovery or a cancelled caller)",
        ("a", "b"),
        {},
        [*BEFORE_DECISION, "rollback prepared a", "rollback prepared b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
        setup=cancelled,
    ),
    Case(
        "past its deadline at the fence",
        ("a", "b"),
        {"fence": "timeout"},
        [*BEFORE_DECISION, "rollback prepared a", "rollback prepared b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionTimeout,
    ),
    Case(
        "the node's identity lease is not held at the fence",
        ("a", "b"),
        {},
        [*BEFORE_DECISION, "rollback prepared a", "rollback prepared b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
        setup=lose_identity,
    ),
    Case(
        "the decision is certainly not logged: rolled back",
        ("a", "b"),
        {"log COMMIT a,b": DecisionNotLogged("disk full")},
        [*DECIDED[:-1], "rollback prepared a", "rollback prepared b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
    ),
    Case(
        "forcing the decision fails midway: in doubt, branches kept prepared",
        ("a", "b"),
        {"log COMMIT a,b": LogError("fsync failed")},
        DECIDED[:-1],
        DOUBT,
        {"a": PREPARED, "b": PREPARED},
        TransactionInDoubt,
    ),
    # phase 2 fails: committed all the same, the rest left to recovery, no END -------------
    Case(
        "phase 2: the first branch's commit fails",
        ("a", "b"),
        {"commit a": CONN_LOST},
        COMMIT[:-1],
        C,
        {"a": UNKNOWN, "b": COMMITTED},
    ),
    Case(
        "phase 2: the second branch's commit fails",
        ("a", "b"),
        {"commit b": CONN_LOST},
        COMMIT[:-1],
        C,
        {"a": COMMITTED, "b": UNKNOWN},
    ),
    Case(
        "phase 2: every commit fails",
        ("a", "b"),
        {"commit a": CONN_LOST, "commit b": TimeoutError("no answer")},
        COMMIT[:-1],
        C,
        {"a": UNKNOWN, "b": UNKNOWN},
    ),
    Case(
        "phase 2: a branch is not found prepared (heuristic)",
        ("a", "b"),
        {"commit b": PhaseTwo.NOT_FOUND},
        COMMIT[:-1],
        C,
        {"a": COMMITTED, "b": UNKNOWN},
    ),
    Case(
        "phase 2: the only writer's commit fails (no decision logged)",
        ("a", "b"),
        {"prepare a": Prepared(Vote.READ_ONLY), "commit b": CONN_LOST},
        [*BEFORE_DECISION, "@after_decision", "commit b"],
        DOUBT,
        {"a": COMMITTED, "b": UNKNOWN},
        TransactionInDoubt,
    ),
    Case(
        "the END record cannot be written: committed all the same",
        ("a", "b"),
        {"log END": LogError("disk full")},
        COMMIT,
        C,
        {"a": COMMITTED, "b": COMMITTED},
    ),
    # the commit-marker path ----------------------------------------------------------------
    Case(
        "marker: the decision is the marker branch's commit",
        ("a", "b"),
        {},
        MARKER_COMMIT,
        C,
        {"a": COMMITTED, "b": COMMITTED},
        marker="a",
    ),
    Case(
        "marker: the marker branch votes no",
        ("a", "b"),
        {"commit one phase a with decision": BranchVotedNo("unique violation")},
        [*MARKER, "commit one phase a with decision", "rollback prepared b"],
        RB,
        {"a": ROLLED_BACK, "b": ROLLED_BACK},
        TransactionRolledBack,
        marker="a",
    ),
    Case(
        "marker: its commit fails midway: in doubt",
        ("a", "b"),
        {"commit one phase a with decision": CONN_LOST},
        [*MARKER, "commit one phase a with decision"],
        DOUBT,
        {"a": UNKNOWN, "b": PREPARED},
        TransactionInDoubt,
        marker="a",
    ),
    Case(
        "marker: phase 2 fails after the decision",
        ("a", "b"),
        {"commit b": CONN_LOST},
        MARKER_COMMIT,
        C,
        {"a": COMMITTED, "b": UNKNOWN},
        marker="a",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_commit(case: Case) -> None:
    hooks = Hooks(marker=case.marker)
    core, pool = begin(*case.resources, hooks=hooks)
    if case.setup is not None:
        case.setup(core, hooks)
    trace, raised = drive(core, core.commit_steps(), case.script)
    assert trace == case.trace
    assert core.state is case.state
    assert core.branches == case.branches
    assert type(raised) is case.raises if case.raises else raised is None
    # every connection went back: to the pool if its branch is finished, else closed
    # (a prepared or unknown branch is another session's to finish: recovery's)
    assert sorted(pool.put_back + pool.discarded) == [f"conn-{r}" for r in case.resources]
    for r, state in case.branches.items():
        if state in (PREPARED, UNKNOWN):
            assert f"conn-{r}" in pool.discarded
    # committed with branches left to recovery: reported (and no END in the trace)
    pending = [r for r, state in case.branches.items() if state is UNKNOWN]
    assert core.pending_branches == pending
    assert hooks.incomplete == ([pending] if pending and case.state is C else [])


def test_failpoints_are_yielded_in_protocol_order() -> None:
    core, _ = begin("a", "b")
    trace, _ = drive(core, core.commit_steps(), {})
    fired = [t[1:] for t in trace if t.startswith("@")]
    # after_first_commit is hit by the drivers, inside phase 2 (CommitPrepared)
    assert fired == ["before_prepare", "after_prepare", "before_decision", "after_decision"]
    assert set(fired) | {"after_first_commit"} == set(failpoint.NAMES) | {"before_decision"}


def test_phases_for_metrics() -> None:
    hooks = Hooks()
    core, _ = begin("a", "b", hooks=hooks)
    drive(core, core.commit_steps(), {})
    assert hooks.phases == ["prepare", "decide", "commit"]


def test_the_marker_branch_carries_the_decision_row() -> None:
    hooks = Hooks(marker="a")
    core, _ = begin("a", "b", hooks=hooks)
    ops: list[Operation] = []
    script: dict[str, Answer] = {"prepare b": Prepared(Vote.PREPARED, 42)}
    trace, raised = drive(core, core.commit_steps(), script, ops)
    assert raised is None and trace == MARKER_COMMIT
    [marker] = [op for op in ops if isinstance(op, CommitOnePhase)]
    sql, params = marker.before[0]
    assert sql.startswith("INSERT INTO xatm_decisions")
    assert params[0] == GTRID and '"x":{"b":42}' in params[1]
    assert hooks.finished == [("a", GTRID)]


def test_rollback() -> None:
    core, pool = begin("a", "b")
    trace, raised = drive(core, core.abort_steps(), {"rollback b": CONN_LOST})
    assert trace == ["rollback a", "rollback b"]
    assert raised is None and core.state is TransactionState.ROLLED_BACK
    # a failed rollback of unprepared work: its connection is closed, which rolls it back
    assert core.branches == {"a": ROLLED_BACK, "b": ROLLED_BACK}
    assert pool.put_back == ["conn-a"] and pool.discarded == ["conn-b"]


def test_a_commit_that_finds_work_running_waits_for_it_then_rolls_back() -> None:
    class Busy:
        def locked(self) -> bool:
            return True

    core, _ = begin("a", "b")
    core._locks["a"] = Busy()  # a statement runs on a in another thread
    trace, raised = drive(core, core.commit_steps(), {})
    assert trace == ["await work", "rollback a", "rollback b"]
    assert isinstance(raised, TransactionRolledBack) and "still running" in str(raised)


def test_no_new_work_once_the_end_began() -> None:
    core, _ = begin("a")
    assert core.open
    drive(core, core.commit_steps(), {})
    assert not core.open


def test_recovery_aborts_an_expired_transaction_only_before_its_decision() -> None:
    core, _ = begin("a", "b")
    assert not core.try_abort()  # not past its deadline
    core.deadline = time.monotonic() - 1
    assert core.try_abort()
    trace, raised = drive(core, core.commit_steps(), {})
    assert trace == ["rollback a", "rollback b"]  # past its deadline: never prepared
    assert isinstance(raised, TransactionTimeout)

    core, _ = begin("a", "b")
    fence = run_until(core, core.commit_steps(), PassFence)
    assert core.try_decide(fence.refuse) is None  # the decision is being made
    core.deadline = time.monotonic() - 1
    assert not core.try_abort()
    assert not core.try_refuse("cancelled")


def test_a_commit_of_an_ended_transaction_is_refused() -> None:
    core, _ = begin("a")
    drive(core, core.commit_steps(), {})
    _, raised = drive(core, core.commit_steps(), {})
    assert type(raised) is TransactionError
