"""Saga commands: ``sagas`` (the list), ``saga show``, ``saga retry`` and ``saga abort``.

Listing and showing need only the config; ``retry`` and ``abort`` run the saga's steps, so
the config's ``sagas = [...]`` must name its definition (importable by this command).
"""

from __future__ import annotations

import time

import click

from xatm import ConfigurationError, SagaError, SagaResult
from xatm.admin import Inspector, SagaInfo, SagaView, validate_saga_id
from xatm.cli import render
from xatm.cli.session import UsageMistake, actor, get


def _saga_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_saga_id(value)
    except ConfigurationError as e:
        raise UsageMistake(str(e)) from None


def _owner(info: SagaInfo) -> str:
    if info.record.final:
        return info.record.node
    return f"{info.record.node} ({'alive' if info.owner_alive else 'dead'})"


def _view(ctx: click.Context) -> tuple[SagaView, Inspector]:
    c = get(ctx)
    inspector = c.inspector()
    return SagaView.from_inspector(inspector, c.settings.node_id), inspector


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include finished sagas.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def sagas(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List the sagas that are not over: running, compensating and stuck, oldest first.

    Each with its age, the step it is at and its owner (alive or dead: a dead owner's saga is
    finished by the next recovery pass of a manager that has its definition). Exit status 1
    if a saga is stuck (a compensation keeps failing: see docs/sagas.md).
    """
    view, inspector = _view(ctx)
    with inspector:
        infos = view.sagas(include_final=show_all)
        view.close()
    if as_json:
        render.emit_json([i.to_json() for i in infos])
    elif not infos:
        click.echo("no sagas" if show_all else "no running, compensating or stuck sagas")
    else:
        rows = [
            (
                i.record.saga_id,
                i.status,
                i.record.step or "-",
                render.age(i.age_s),
                _owner(i),
                i.record.key or "-",
                i.record.error or "",
            )
            for i in infos
        ]
        click.echo(render.table(("SAGA", "STATUS", "STEP", "AGE", "OWNER", "KEY", "ERROR"), rows))
    ctx.exit(1 if any(i.status == "stuck" for i in infos) else 0)


@click.group()
def saga() -> None:
    """Show, retry or abort one saga."""


@saga.command()
@click.argument("saga_id", callback=_saga_id)
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@click.pass_context
def show(ctx: click.Context, saga_id: str, as_json: bool) -> None:
    """Show one saga: its state, its steps, and its audit trail."""
    view, inspector = _view(ctx)
    with inspector:
        info = view.show(saga_id)
        view.close()
    if info is None:
        raise click.ClickException(f"no saga {saga_id} in this log")
    if as_json:
        render.emit_json(info.to_json())
        return
    r = info.record
    click.echo(f"saga {r.saga_id} ({r.name}): {info.status}")
    click.echo(f"  key: {r.key or '-'}")
    click.echo(f"  owner: {_owner(info)}")
    click.echo(f"  started: {render.when(r.created_at)} ({render.age(info.age_s)} ago)")
    click.echo(
        f"  updated: {render.when(r.updated_at)} ({render.age(time.time() - r.updated_at)} ago)"
    )
    click.echo(f"  at step: {r.step or '-'}")
    click.echo(f"  done: {', '.join(r.done) or '-'}")
    if r.to_compensate:
        click.echo(f"  to compensate: {', '.join(r.to_compensate)}")
        click.echo(f"  compensated: {', '.join(r.compensated) or '-'}")
    if r.error:
        click.echo(f"  error: {r.error}")
    click.echo("")
    if info.history:
        rows = [
            (e.time, e.branch or "-", e.action, e.outcome, e.actor, e.reason) for e in info.history
        ]
        click.echo(render.table(("TIME", "STEP", "ACTION", "OUTCOME", "ACTOR", "REASON"), rows))
    else:
        click.echo("no audit trail")


def _act(ctx: click.Context, saga_id: str, what: str, force: bool, as_json: bool) -> None:
    with get(ctx).manager("cli", sagas="need") as tm:
        try:
            result: SagaResult = tm.saga_action(saga_id, what, force=force, actor=actor())
        except SagaError as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        render.emit_json(result.to_json())
    elif result.state == "completed":
        click.echo(f"saga {result.saga_id}: completed")
    elif result.state == "compensated":
        click.echo(f"saga {result.saga_id}: compensated (every step done is undone)")
        if result.error:
            click.echo(f"why it compensated: {result.error}")
    else:
        still = " (still stuck: recovery retries it)" if result.stuck else ""
        click.echo(f"saga {result.saga_id}: {result.state}{still}")
        if result.error:
            click.echo(f"error: {result.error}")
    ctx.exit(0 if result.state in ("completed", "compensated") else 1)


_FORCE = click.option("--force", is_flag=True, help="Override a refusal (docs/sagas.md).")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@saga.command()
@click.argument("saga_id", callback=_saga_id)
@_FORCE
@_JSON
@click.pass_context
def retry(ctx: click.Context, saga_id: str, force: bool, as_json: bool) -> None:
    """Run a saga on now, from where it is: forward, or on with its compensation.

    Refused while its owner is alive (the owner finishes it), unless --force (shared log
    only: a file log's saga lock cannot be broken). Exit status 1 unless it ends completed or
    compensated.
    """
    _act(ctx, saga_id, "retry", force, as_json)


@saga.command()
@click.argument("saga_id", callback=_saga_id)
@_FORCE
@_JSON
@click.pass_context
def abort(ctx: click.Context, saga_id: str, force: bool, as_json: bool) -> None:
    """Stop a saga going forward and compensate what it did.

    Refused while its owner is alive, unless --force (shared log only). A saga already
    compensating is refused too; with --force its compensation is abandoned: it ends failed,
    and what is left to undo is for you to clean up (the audit trail says what).
    """
    _act(ctx, saga_id, "abort", force, as_json)
