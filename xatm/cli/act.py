"""Commands that change things: ``recover``, ``commit`` and ``rollback`` (``sweep``:
xatm.cli.daemon)."""

from __future__ import annotations

import logging

import click

from xatm import RecoveryReport
from xatm.admin import RecoveryAction, Resolution, ResolutionRefused
from xatm.cli import render
from xatm.cli.session import GTRID, actor, get

logger = logging.getLogger("xatm.cli")


def _actions_table(actions: tuple[RecoveryAction, ...]) -> str:
    ordered = sorted(actions, key=lambda a: (a.gtrid, a.action == "end"))
    rows = [(a.gtrid, a.resource or "-", a.action, a.outcome, a.reason) for a in ordered]
    return render.table(("GTRID", "RESOURCE", "ACTION", "OUTCOME", "REASON"), rows)


def _summary(report: RecoveryReport) -> str:
    verb = "would " if report.dry_run else ""
    planned = [a for a in report.actions if a.outcome == "planned"]
    if report.dry_run:
        commits = sum(1 for a in planned if a.action == "commit")
        rollbacks = sum(1 for a in planned if a.action == "rollback")
        left = report.in_doubt - commits - rollbacks
    else:
        commits, rollbacks, left = report.committed, report.rolled_back, report.in_doubt
    waiting = f" ({report.waiting} transaction(s) waiting for an unreachable resource)"
    parts = [
        f"{verb}commit {commits} branch(es)" if verb else f"{commits} committed",
        f"{verb}roll back {rollbacks}" if verb else f"{rollbacks} rolled back",
        f"{left} left in doubt" + (waiting if report.waiting else ""),
        f"{report.heuristics} heuristic outcome(s)",
        *([f"{report.possibly_lost} possibly lost in a failover"] if report.possibly_lost else []),
        f"{report.foreign} foreign prepared transaction(s) untouched",
    ]
    if not report.dry_run:
        parts.append(f"{report.ended} decision record(s) closed")
    return ("dry run: " if report.dry_run else "") + ", ".join(parts)


@click.command()
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def recover(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Run one recovery pass over every resource.

    Commits the branches of transactions whose COMMIT is logged and rolls back those of
    dead coordinators that decided nothing; leaves live coordinators' transactions alone.
    Exit status 1 if a resource could not be reached, a phase-2 call failed, a heuristic
    outcome or a transaction possibly lost in a failover was found, or the config's sagas
    could not be imported (none was recovered).
    """
    progress = render.Progress()
    c = get(ctx)
    with c.manager("cli", sagas="recover") as tm:
        try:
            report = tm.recover(dry_run=dry_run, actor=actor(), progress=progress)
        finally:
            progress.done()
        sagas = None if dry_run else tm.sagas.last_report
    if as_json:
        render.emit_json({**report.to_json(), **({"sagas": sagas.to_json()} if sagas else {})})
    else:
        if report.actions:
            click.echo(_actions_table(report.actions))
            click.echo("")
        click.echo(_summary(report))
        if sagas is not None and (sagas.finished or sagas.left):
            done = ", ".join(f"{saga_id} {state}" for saga_id, state in sagas.finished)
            click.echo(
                f"sagas: {len(sagas.finished)} finished ({done or '-'}), {len(sagas.left)} left"
            )
    for resource, why in report.problems:
        render.warn(f"resource {resource!r} skipped: {why}")
    if report.heuristics:
        render.warn(
            f"{report.heuristics} HEURISTIC outcome(s): branches of committed transactions were"
            " rolled back outside xatm; see docs/operations.md"
        )
    if report.possibly_lost:
        render.warn(
            f"{report.possibly_lost} transaction(s) possibly lost in a PostgreSQL failover:"
            " `xatm indoubt --lost`; see docs/operations.md"
        )
    lost = sagas.lost if sagas is not None else ()
    for saga_id, ran in lost:
        render.warn(
            f"saga {saga_id}: its record was lost in a failover of the shared log's database;"
            f" its barrier rows show what ran ({ran}): resolve it by hand (docs/sagas.md)"
        )
    for what in c.skipped:
        render.warn(what)
    failed = any(a.action == "error" for a in report.actions)
    skipped = bool(c.skipped) and not dry_run
    attention = report.heuristics or report.possibly_lost or failed or skipped or bool(lost)
    ctx.exit(1 if report.unreachable or attention else 0)


def _resolution(res: Resolution, as_json: bool) -> None:
    if as_json:
        render.emit_json(res.to_json())
    else:
        if res.actions:
            click.echo(_actions_table(res.actions))
            click.echo("")
        forced = " (forced)" if res.forced else ""
        state = "complete" if res.complete else "INCOMPLETE"
        click.echo(f"manual {res.outcome}{forced} of {res.gtrid}: {state}")
        for note in res.notes:
            click.echo(f"note: {note}")
    for resource, why in res.unreachable:
        render.warn(f"resource {resource!r} not reached: {why}")


def _resolve(ctx: click.Context, gtrid: str, outcome: str, force: bool, as_json: bool) -> None:
    with get(ctx).manager("cli") as tm:
        try:
            res = tm.resolve(gtrid, outcome, force=force, actor=actor())
        except ResolutionRefused as e:
            raise click.ClickException(
                f"{e} (--force overrides; read docs/operations.md first)"
            ) from None
    _resolution(res, as_json)
    ctx.exit(0 if res.complete else 1)


_FORCE = click.option(
    "--force", is_flag=True, help="Override a refusal (see docs/operations.md: heuristics)."
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.command()
@click.argument("gtrid", type=GTRID)
@_FORCE
@_JSON
@click.pass_context
def commit(ctx: click.Context, gtrid: str, force: bool, as_json: bool) -> None:
    """Commit every prepared branch of GTRID by hand.

    Allowed without --force only when its COMMIT decision is logged and its coordinator is
    not alive (what recovery would do). Recorded in the audit trail.
    """
    _resolve(ctx, gtrid, "commit", force, as_json)


@click.command()
@click.argument("gtrid", type=GTRID)
@_FORCE
@_JSON
@click.pass_context
def rollback(ctx: click.Context, gtrid: str, force: bool, as_json: bool) -> None:
    """Roll back every prepared branch of GTRID by hand.

    Allowed without --force only when no COMMIT decision is logged and its coordinator is
    dead (what recovery would do). Recorded in the audit trail.
    """
    _resolve(ctx, gtrid, "rollback", force, as_json)
