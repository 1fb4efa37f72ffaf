"""Manual resolution: an operator commits or rolls back one in-doubt transaction.

``tm.resolve(gtrid, "commit" | "rollback", force=False, actor="cli:alice")``. The safe cases
are exactly what recovery would do anyway, and are allowed:

* commit a transaction whose COMMIT decision is logged;
* roll back a transaction with no COMMIT decision whose coordinator is dead.

Everything else is refused (:class:`ResolutionRefused`, saying why) unless ``force=True``:

* the coordinator is alive: it may be deciding right now (rolling back under it can split
  the transaction), and it resolves its own branches anyway;
* its log is not in this log directory: nothing here can tell what it decided;
* an incarnation of its node that the node's log here does not list made it (a process with
  the same node_id and another log directory): the same, as the decision rule says;
* rolling back a transaction whose COMMIT is logged (a heuristic outcome: the branches
  already committed stay committed);
* committing a transaction that never logged COMMIT (presumed abort).

With the coordinator dead, its log is taken over (locked) for the duration, so no sweeper
acts on the same transaction at the same time, and the forced outcome is made durable
first: a forced commit logs a COMMIT decision before committing any branch, a forced
rollback of a transaction decided COMMIT overrules that decision (an ABORT record) before
rolling back any branch, so that recovery finishes any branch left on an unreachable
resource the same way, and a branch a failover brings back prepared is not committed from
the overruled decision. Every branch acted on,
every refusal overridden and every heuristic outcome goes to the audit trail.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from xatm.core import bugs as _bugs
from xatm.core.decide import Action as Act
from xatm.core.decide import (
    Facts,
    Logged,
    Marker,
    Verdict,
    decide,
    judge_request,
    known_decision,
    log_failed_over_since,
    tenure,
    transaction_facts,
)
from xatm.core.logfields import log_fields
from xatm.core.participant import PhaseTwo
from xatm.core.records import LogRecord
from xatm.core.report import RecoveryAction, RecoveryReport
from xatm.core.urls import redact
from xatm.core.xid import Xid, incarnation_of, may_use_marker, parse_gtrid
from xatm.errors import LogError, LogLocked, ResourceError, XatmError
from xatm.log.base import CoordinatorLog, DecisionNotLogged, OwnerState
from xatm.log.view import OpenedLog
from xatm.ops.inspect import Decision, validate_gtrid
from xatm.recovery import markers as _marker_recovery
from xatm.recovery.phase2 import Carried, carry_out
from xatm.recovery.run import locked_pass

if TYPE_CHECKING:
    from xatm.node.context import Context

logger = logging.getLogger("xatm.resolve")

Outcome = Literal["commit", "rollback"]
#: seconds to wait for a dead coordinator's log held by a sweeper pass in another process
TAKE_OVER_WAIT = 3.0


class ResolutionRefused(XatmError):
    """Manual resolution was refused: doing it could break atomicity (see the message)."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a manual resolution did."""

    gtrid: str
    outcome: Outcome
    forced: bool
    owner: OwnerState
    decision: Decision | None  # what was logged (or presumed) before
    actions: tuple[RecoveryAction, ...]
    unreachable: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]
    #: a rollback by hand of a transaction decided COMMIT replaced the decision with ABORT
    #: (the log's record, or the commit-marker row): recovery rolls back what is left
    overruled: bool = False

    @property
    def complete(self) -> bool:
        """Every resource was reached and every branch found was finished."""
        return not self.unreachable and all(
            a.action != "error" and a.outcome != "left" for a in self.actions
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gtrid": self.gtrid,
            "outcome": self.outcome,
            "forced": self.forced,
            "owner": self.owner,
            "decision_before": self.decision,
            "complete": self.complete,
            "actions": [a.to_json() for a in self.actions],
            "unreachable": [{"resource": r, "error": m} for r, m in self.unreachable],
            "notes": list(self.notes),
            "decision_overruled": self.overruled,
        }


def resolve(
    ctx: Context,
    gtrid: str,
    outcome: str,
    *,
    force: bool = False,
    actor: str = "api",
) -> Resolution:
    """Commit or roll back every prepared branch of ``gtrid`` (see the module docstring)."""
    gtrid = validate_gtrid(gtrid)
    if outcome not in ("commit", "rollback"):
        raise XatmError(f"outcome must be 'commit' or 'rollback', got {outcome!r}")
    with ctx.recovery_lock:
        plan = locked_pass(ctx, dry_run=True, only=gtrid, actor=actor)
        rule, why = _rule(plan, gtrid, Act(outcome))
        if rule is not None and why is None:
            # the request is what recovery would do: let recovery do it, for this gtrid only
            prefix = f"manual {outcome} by {actor}: "
            report = locked_pass(ctx, only=gtrid, actor=actor, prefix=prefix)
            return _resolution(ctx, gtrid, outcome, rule, report)
        if rule is not None and not force:
            raise ResolutionRefused(f"refused to {outcome} {gtrid}: {why}")
        decided: Decision | None = None
        if rule is Act.COMMIT:
            decided = "commit"
        elif rule is Act.ROLLBACK:
            decided = "abort"
        forced = _Resolve(ctx, gtrid, outcome, force, actor, decided, why)  # type: ignore[arg-type]
        return forced.run()


def _rule(plan: RecoveryReport, gtrid: str, request: Act) -> tuple[Act | None, str | None]:
    """What the decision rule says of ``gtrid``'s prepared branches (None: none is
    prepared), and why ``request`` disagrees with it (None: it agrees)."""
    verdicts = []
    for a in plan.actions:
        if a.gtrid != gtrid or a.action not in ("commit", "rollback", "skip"):
            continue
        if _bugs.on("resolve_ignores_marker") and "commit-marker" in a.reason:
            continue
        act = Act.LEAVE if a.action == "skip" else Act(a.action)
        verdicts.append(Verdict(act, a.reason))
    if not verdicts:
        return None, None
    for verdict in verdicts:
        why = judge_request(verdict, request)
        if why is not None:
            return verdict.action, why
    return verdicts[0].action, None


def _resolution(
    ctx: Context, gtrid: str, outcome: str, rule: Act, report: RecoveryReport
) -> Resolution:
    notes = [
        f"{a.resource}: left prepared ({a.reason}); recovery finishes it later"
        for a in report.actions
        if a.outcome == "left"
    ]
    if report.problems:
        notes.append("some resources were not reached: recovery finishes their branches later")
    return Resolution(
        gtrid=gtrid,
        outcome=outcome,  # type: ignore[arg-type]
        forced=False,
        owner=ctx.log_view().owner(parse_gtrid(gtrid)[0]),
        decision="commit" if rule is Act.COMMIT else "abort",
        actions=report.actions,
        unreachable=report.problems,
        notes=tuple(notes),
    )


class _Resolve:
    def __init__(
        self,
        ctx: Context,
        gtrid: str,
        outcome: Outcome,
        force: bool,
        actor: str,
        rule: Decision | None = None,
        why: str | None = None,
    ) -> None:
        #: what the decision rule says (None: no branch is prepared), and why it disagrees
        self.rule = rule
        self.why = why
        self.ctx = ctx
        self.gtrid = gtrid
        self.outcome = outcome
        self.force = force
        self.actor = actor
        self.node = parse_gtrid(gtrid)[0]
        self.notes: list[str] = []
        self.overrides: list[str] = []  # refusals overridden (force), audited once acting
        self.judged: set[str] = set()  # the reasons refused or overridden so far
        #: the incarnations the node's log here lists, and whether the log is shared
        self.listed: tuple[frozenset[str] | None, bool, tuple[float, ...]] | None = None
        self.actions: list[RecoveryAction] = []
        self.unreachable: dict[str, str] = {}

    def audit(self, resource: str, action: str, reason: str, result: str) -> None:
        self.ctx.audit.record(self.gtrid, resource, resource, action, reason, result, self.actor)

    def refuse_or_note(self, why: str, where: str = "") -> None:
        """Refuse (no ``force``), or note the override: it is audited once there is
        something to resolve (:meth:`record_overrides`), never for a gtrid that has
        nothing (a transaction that never existed gets no audit entry). A reason already
        noted (the rule asked again once the decision is read) is noted once."""
        if why in self.judged:
            return
        self.judged.add(why)
        if not self.force:
            raise ResolutionRefused(f"refused to {self.outcome} {self.gtrid}: {why}{where}")
        self.notes.append(f"forced although {why}{where}")
        self.overrides.append(why + where)

    def record_overrides(self) -> None:
        for why in self.overrides:
            self.audit("", "override", why, f"forced {self.outcome}")
            logger.warning(
                "manual %s of %s forced although %s",
                self.outcome,
                self.gtrid,
                why,
                extra=log_fields(self.ctx.node_id, self.gtrid),
            )
        self.overrides = []

    def _facts(self, owner: OwnerState, logged: Logged, marker: Marker) -> Facts:
        """The facts of this transaction as its coordinator's log shows them, for the
        decision rule (:func:`xatm.core.decide.transaction_facts`). Its incarnation is
        judged against the incarnations the node's log here lists (none with the shared log,
        where every decision is in the table and a rollback is fenced there). Its age is not
        a fact here: recovery, not an operator, aborts a live coordinator's old transaction."""
        ctx = self.ctx
        if self.listed is None:  # read once: the rule is asked again once the log is open
            fleet = ctx.fleet(dry_run=True)
            try:
                self.listed = (fleet.incarnations(self.node), fleet.shared, fleet.log_switches())
            finally:
                fleet.close()
        listed, shared, switches = self.listed
        own = ctx.incarnation if owner == "this-process" else None
        return transaction_facts(
            coordinator=owner,
            running=owner == "this-process" and ctx.running(self.gtrid) is not None,
            made_by=tenure(incarnation_of(self.gtrid), own, listed),
            logged=logged,
            marker=marker,
            shared=shared,
            log_failover=log_failed_over_since(parse_gtrid(self.gtrid)[1], switches),
        )

    def run(self) -> Resolution:
        ctx = self.ctx
        logs = ctx.log_view()  # the node logs in a directory, or the shared log
        owner = logs.owner(self.node)
        # whose it is, asked of the decision rule before the log is opened: a transaction
        # running here, a live coordinator's, one of a node with no log here, or one of a
        # process its node's log does not list (a twin) is left alone unless forced
        verdict = decide(self._facts(owner, Logged.NONE, Marker.NOT_FLAGGED))
        if verdict.action is Act.LEAVE:
            self.refuse_or_note(verdict.reason, f" (node {self.node!r}, {ctx.store.describe()})")
        with contextlib.ExitStack() as held:
            try:
                # a dead coordinator's file log is taken over (locked) for the duration
                opened = held.enter_context(
                    logs.open_for_decision(self.node, owner, TAKE_OVER_WAIT)
                )
            except LogLocked:
                raise ResolutionRefused(
                    f"refused to {self.outcome} {self.gtrid}: the log of {self.node!r} is"
                    " held by another process (a recovery pass, or its coordinator"
                    " restarting): try again in a moment"
                ) from None
            found = opened.decision(self.gtrid)
            if found == "A":
                if self.outcome == "commit":
                    raise ResolutionRefused(
                        f"refused to commit {self.gtrid}: an ABORT decision is logged in the"
                        " shared log (a sweeper aborted it); it cannot be committed any more"
                    )
                return self._resolve(owner, opened, None, aborted=True)
            record = found if isinstance(found, LogRecord) else None
            return self._resolve(owner, opened, record)

    def _resolve(
        self,
        owner: OwnerState,
        opened: OpenedLog,
        record: LogRecord | None,
        *,
        aborted: bool = False,
    ) -> Resolution:
        log = opened.log  # None: the coordinator's log is not held here
        logged = Logged.NONE
        if record is not None:
            logged = Logged.COMMIT
        elif aborted:
            logged = Logged.ABORT
        # A marker-flagged transaction's decision may be a row in a resource's own table
        # (xatm.participants.marker), which only the decision rule's plan reads: with no plan (none
        # of its branches was listed then: a resource not reached), that row is unread
        marker = Marker.NOT_FLAGGED
        if self.rule is None and may_use_marker(self.gtrid):
            marker = Marker.NOT_FLAGGED if _bugs.on("resolve_ignores_marker") else Marker.UNREAD
        facts = self._facts(owner, logged, marker)
        verdict = decide(facts)
        decision: Decision | None = known_decision(facts, verdict)
        why, unread = self.why, None
        if self.rule is not None:  # what the plan said of its branches, unless logged since
            decision = "commit" if record is not None else self.rule
        elif why is None:  # the plan listed no branch: the same rule, from the log alone
            why = judge_request(verdict, Act(self.outcome))
            if why is not None and self.outcome == "rollback" and marker is Marker.UNREAD:
                why, unread = None, why  # asked once a branch is found to roll back
        if why is not None:
            self.refuse_or_note(why)
        branches = self._find()
        if not branches and record is None:
            where = ", ".join(sorted(self.unreachable))
            raise XatmError(
                f"no prepared branch of {self.gtrid} on any reachable resource"
                + (f" (not reached: {where})" if where else "")
                + " and no pending decision: nothing to resolve"
            )
        if unread is not None:
            self.refuse_or_note(unread)
        self.record_overrides()
        if self.outcome == "rollback" and record is None and not aborted:
            # fence it where the log can (the shared log): an ABORT row makes a late COMMIT
            # of its coordinator lose; a file log's presumed abort writes nothing (None)
            answer = opened.fence_abort(self.gtrid, by=self.actor)
            if answer == "C":
                raise ResolutionRefused(
                    f"refused to roll back {self.gtrid}: its coordinator logged COMMIT just"
                    " now; run the command again to see it"
                )
            if answer == "busy":
                # a session is writing a decision for it and has not committed (a COMMIT
                # batch still open, perhaps of a paused coordinator): no ABORT could be
                # written, so nothing fences that COMMIT; rolling back now could split it
                raise ResolutionRefused(
                    f"refused to roll back {self.gtrid}: another session is writing a decision"
                    " for it in the shared log right now (a COMMIT batch still open), so no"
                    " ABORT could be logged to fence it; run the command again in a moment"
                )
            if answer is not None:
                self.audit("", "decide", "manual rollback: ABORT decision logged", "done")
        # a rollback by hand of what may be decided COMMIT: the decision is overruled first
        overruled = (
            self.outcome == "rollback"
            and (decision == "commit" or (decision is None and may_use_marker(self.gtrid)))
            and bool(branches or self.unreachable)
        )
        if overruled:
            overruled = self._overrule(log, record, certain=decision == "commit")
        if self.outcome == "commit" and record is None and log is not None and branches:
            # make the forced decision durable first: recovery then finishes the rest alike
            resources = sorted(set(branches) | set(self.unreachable))
            try:
                log.log_commit(self.gtrid, resources)
            except DecisionNotLogged as e:
                raise ResolutionRefused(
                    f"refused to commit {self.gtrid}: the COMMIT decision could not be logged ({e})"
                ) from None
            self.audit("", "decide", "manual commit: COMMIT decision logged", "done")
        elif self.outcome == "commit" and record is None:
            self.notes.append(
                "no COMMIT decision could be logged (the coordinator's log is not held here):"
                " its coordinator or a sweeper may roll back branches not committed now"
            )
        for resource, xid in sorted(branches.items()):
            self._finish(resource, xid, decision)
        missing = [r for r in (record.branches if record else ()) if r not in branches]
        for resource in missing:
            if resource not in self.unreachable:
                self.actions.append(
                    RecoveryAction(
                        self.gtrid, resource, resource, "verify", "not prepared", "not-found"
                    )
                )
        if (
            log is not None
            and not self.unreachable
            and all(a.action != "error" and a.outcome != "left" for a in self.actions)
        ):
            pending = opened.decision(self.gtrid)  # read again: it may have ended meanwhile
            if (record is not None or self.outcome == "commit") and pending not in (None, "A"):
                log.log_end(self.gtrid)
                log.flush()
                self.audit("", "end", f"manual {self.outcome}: every branch finished", "done")
                self.actions.append(
                    RecoveryAction(self.gtrid, "", "", "end", "every branch finished", "done")
                )
        elif self.unreachable:
            later = " as decided" if log is not None and not overruled else ""
            self.notes.append(
                "some resources were not reached: recovery finishes their branches later" + later
            )
        return Resolution(
            gtrid=self.gtrid,
            outcome=self.outcome,
            forced=self.force,
            owner=owner,
            decision=decision,
            actions=tuple(self.actions),
            unreachable=tuple(sorted(self.unreachable.items())),
            notes=tuple(self.notes),
            overruled=overruled,
        )

    def _overrule(
        self, log: CoordinatorLog | None, record: LogRecord | None, *, certain: bool
    ) -> bool:
        """Before a branch of a transaction decided COMMIT is rolled back by hand: replace the
        decision with ABORT, durably, so that recovery rolls back the branches not reached
        now, and a branch a failover brings back prepared is not committed from the decision:
        the log's COMMIT record (``log_overrule``; pending, or ended and retained), or, for a
        commit-marker transaction with no record, its decision row (``overrule_row``, on every
        resource that may hold it). A live coordinator's log is not held here: noted.
        Refused, with nothing rolled back, if it cannot be done, unless the decision is not
        ``certain`` (a decision row not read, the rollback forced): then noted. True once
        overruled."""
        if record is None and may_use_marker(self.gtrid):
            return self._overrule_rows(certain)
        # the COMMIT record: pending, or ended and retained (a failover's branch came back)
        if log is None:
            self.notes.append(
                "its COMMIT decision could not be overruled (its log is not held here): its"
                " coordinator may commit the branches not rolled back now"
            )
            return False
        try:
            log.log_overrule(self.gtrid, by=self.actor)
        except LogError as e:
            raise ResolutionRefused(
                f"refused to roll back {self.gtrid}: overruling its COMMIT decision in the log"
                f" failed ({e}); no branch was rolled back by this command (if the overrule"
                " reached the log all the same, recovery rolls the branches back)"
            ) from None
        return self._overruled("COMMIT decision", " (ABORT)", "an ABORT is logged")

    def _overrule_rows(self, certain: bool) -> bool:
        """The commit-marker decision row of this transaction becomes an abort row, on the
        node's recorded commit-marker resources (every resource here if none is recorded)."""
        ctx = self.ctx
        candidates = ctx.log_view().marker_resources(self.node) or frozenset(ctx.resources.names)
        for name in sorted(candidates):
            try:
                participant, _ = self.ctx.resources.get(name)
                _marker_recovery.overrule_row(participant, self.gtrid)
            except Exception as e:
                why = f"{name!r} could not overrule it ({redact(str(e).strip())})"
                if not certain:
                    self.notes.append(
                        f"a commit-marker decision row of it, if there is one, was not overruled:"
                        f" {why}; recovery commits the branches left if the row is there"
                    )
                    return False
                raise ResolutionRefused(
                    f"refused to roll back {self.gtrid}: its commit-marker decision row may be"
                    f" there and {why}; no branch was rolled back by this command (if the"
                    " overrule reached it all the same, recovery rolls the branches back):"
                    " run the command again once it answers"
                ) from None
        return self._overruled(
            "commit-marker decision row", "", "an abort row now, if there was one"
        )

    def _overruled(self, decision: str, audited: str, now: str) -> bool:
        """Audit and note that ``decision`` is overruled (``now``: what it became)."""
        self.audit("", "decide", f"manual rollback: {decision} overruled{audited}", "done")
        self.notes.append(
            f"its {decision} is overruled ({now}): recovery rolls back any branch of it found later"
        )
        return True

    def _find(self) -> dict[str, Xid]:
        """The resources holding a prepared branch of this gtrid, and its XID there."""
        found: dict[str, Xid] = {}
        for name in self.ctx.resources.names:
            try:
                with self.ctx.resources.borrow(name) as (participant, conn):
                    branches = participant.recover(conn)
            except ResourceError as e:
                self.unreachable[name] = str(e)
                continue
            except Exception as e:
                self.unreachable[name] = redact(str(e).strip() or type(e).__name__)
                continue
            for b in branches:
                if b.xid is not None and b.xid.is_xatm and b.xid.gtrid == self.gtrid:
                    found[name] = b.xid
        return found

    def _finish(self, resource: str, xid: Xid, decision: Decision | None) -> None:
        heuristic = self.outcome == "rollback" and decision == "commit"
        reason = f"manual {self.outcome} by {self.actor}"
        if self.force:
            reason += " (forced)"
        try:
            with self.ctx.resources.borrow(resource) as (participant, conn):
                carried = carry_out(participant, conn, xid, self.outcome == "commit")
        except ResourceError as e:
            self.unreachable[resource] = str(e)
            return
        except Exception as e:
            text = f"failed: {redact(str(e).strip() or type(e).__name__)}"
            self.actions.append(
                RecoveryAction(self.gtrid, resource, resource, "error", reason, text)
            )
            self.audit(resource, self.outcome, reason, text)
            return
        if carried is Carried.HELD:
            # MariaDB: a session still attached to it (only it may finish it): not gone
            why = "listed as prepared, but the server answers 'no such branch': a live session"
            self.actions.append(
                RecoveryAction(self.gtrid, resource, resource, "skip", f"{why} holds it", "left")
            )
            self.notes.append(f"{resource}: {why} still holds it; recovery finishes it later")
            return
        result = PhaseTwo.DONE if carried is Carried.DONE else PhaseTwo.NOT_FOUND
        text = "done" if result is PhaseTwo.DONE else "not-found"
        self.actions.append(
            RecoveryAction(self.gtrid, resource, resource, self.outcome, reason, text)
        )
        self.audit(resource, self.outcome, reason, text)
        if heuristic and result is PhaseTwo.DONE:
            logger.error(
                "HEURISTIC OUTCOME: branch %s of %s rolled back by hand although COMMIT was"
                " decided",
                resource,
                self.gtrid,
                extra=log_fields(self.ctx.node_id, self.gtrid, resource),
            )
            self.audit(resource, "heuristic", "decision is COMMIT", "rolled back by hand (xatm)")
            self.actions.append(
                RecoveryAction(
                    self.gtrid,
                    resource,
                    resource,
                    "heuristic",
                    "decision is COMMIT",
                    "rolled back by hand (xatm)",
                )
            )
