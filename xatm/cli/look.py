"""Log and inspection commands: ``doctor``, ``indoubt``, ``show`` and ``log`` (and
``log compact``, ``log salvage``, the only ones here that change anything)."""

from __future__ import annotations

import time

import click

from xatm.admin import (
    BranchInfo,
    InDoubtReport,
    TransactionInfo,
    log_is_shared,
    redact,
    salvage_log,
)
from xatm.cli import render
from xatm.cli.session import GTRID, actor, get


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check every resource and the log directory are fit for two-phase commit.

    Exit status 0 when everything fits, 1 otherwise (each failing check says what to change).
    """
    with get(ctx).inspector() as inspector:
        report = inspector.doctor()
    if as_json:
        render.emit_json(report.to_json())
    else:
        status = {(True, False): "ok", (True, True): "advice"}
        rows = [
            (c.subject, c.name, status.get((c.ok, c.advice), "FAIL"), c.detail)
            for c in report.checks
        ]
        click.echo(render.table(("SUBJECT", "CHECK", "STATUS", "DETAIL"), rows))
        bad = len(report.problems)
        click.echo("")
        click.echo("all checks passed" if report.ok else f"{bad} check(s) failed")
    ctx.exit(0 if report.ok else 1)


def _branch_line(b: BranchInfo) -> str:
    parts = [f"{b.resource}: {b.state}"]
    if b.prepared_at is not None:
        parts[0] += f" {render.age(time.time() - b.prepared_at)} ago"
    if b.locks is not None:
        held = f"holds {b.locks} lock(s)"
        if b.locked:
            held += f" on {', '.join(b.locked)}"
        parts.append(held)
    if b.txid is not None:
        parts.append(f"txid {b.txid}")
    return ", ".join(parts)


def _decision(value: str | None) -> str:
    return value if value is not None else "none yet"


def _unreachable(report_unreachable: tuple[tuple[str, str], ...]) -> None:
    for resource, why in report_unreachable:
        render.warn(f"resource {resource!r} could not be asked: {why}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option(
    "--lost",
    is_flag=True,
    help="List the transactions that recent PostgreSQL failovers lost or may have lost instead.",
)
@click.pass_context
def indoubt(ctx: click.Context, as_json: bool, lost: bool) -> None:
    """List every in-doubt global transaction across all resources, oldest first.

    One row per transaction: its gtrid, the node that created it, its age, the logged
    decision and what recovery will do; under it, each branch with its resource and state.
    Then the transactions that a recent failover of a PostgreSQL resource lost, or may have
    lost (``--lost`` lists only those). Exit status 1 if a resource could not be asked (the
    list may then be incomplete).
    """
    with get(ctx).inspector() as inspector:
        report: InDoubtReport = inspector.indoubt()
    if lost:
        _possibly_lost(report, as_json)
        _unreachable(report.unreachable)
        ctx.exit(1 if report.unreachable else 0)
    if as_json:
        render.emit_json([t.to_json() for t in report.transactions])
    elif not report.transactions:
        click.echo("no in-doubt transactions")
    else:
        rows = [
            (t.gtrid, t.node, render.age(t.age_s), _decision(t.decision), t.plan)
            for t in report.transactions
        ]
        lines = render.table(("GTRID", "NODE", "AGE", "DECISION", "RECOVERY WILL"), rows)
        out = lines.splitlines()
        click.echo("\n".join(out[:2]))
        for line, t in zip(out[2:], report.transactions, strict=True):
            click.echo(line)
            for b in t.branches:
                click.echo(f"    {_branch_line(b)}")
        click.echo(f"\n{len(report.transactions)} in-doubt transaction(s)")
    if report.possibly_lost and not as_json:
        click.echo("")
        _possibly_lost(report, False)
    _unreachable(report.unreachable)
    ctx.exit(1 if report.unreachable else 0)


def _possibly_lost(report: InDoubtReport, as_json: bool) -> None:
    """The transactions recent PostgreSQL failovers lost or may have lost."""
    if as_json:
        render.emit_json([x.to_json() for x in report.possibly_lost])
        return
    if not report.possibly_lost:
        click.echo("no transaction lost in a recent failover")
        return
    rows = [
        (
            x.gtrid,
            x.resource,
            f"{x.timeline[0]}->{x.timeline[1]}",
            render.when(x.decided_at),
            "LOST" if x.status == "lost" else "possibly lost",
            x.detail,
        )
        for x in report.possibly_lost
    ]
    click.echo("committed before a PostgreSQL failover, missing from the new primary:")
    click.echo(render.table(("GTRID", "RESOURCE", "TIMELINE", "DECIDED", "STATUS", "WHY"), rows))
    click.echo(
        f"\n{len(report.possibly_lost)} transaction(s): check their data on that resource"
        " (docs/operations.md, 'After a PostgreSQL failover')"
    )


def _show_human(info: TransactionInfo) -> None:
    click.echo(f"transaction  {info.gtrid}")
    click.echo(f"node         {info.node} (coordinator {info.owner})")
    click.echo(f"created      {render.when(info.created_at)} ({render.age(info.age_s)} ago)")
    decision = _decision(info.decision) if info.in_doubt or info.decision else "none pending"
    if info.decided_at is not None:
        decision += f" (logged {render.when(info.decided_at)})"
    click.echo(f"decision     {decision}")
    if info.logged_branches:
        click.echo(f"logged with  {', '.join(info.logged_branches)}")
    click.echo(f"in doubt     {'yes' if info.in_doubt else 'no'}")
    click.echo(f"recovery     {info.plan}")
    click.echo("branches")
    if not info.branches:
        click.echo("    none prepared")
    for b in info.branches:
        click.echo(f"    {_branch_line(b)}")
    click.echo("audit trail")
    if not info.audit:
        click.echo("    (no entries)")
    else:
        rows = [
            (e.time, e.actor, e.resource or "-", e.action, e.outcome, e.reason) for e in info.audit
        ]
        click.echo(
            render.table(("TIME", "ACTOR", "RESOURCE", "ACTION", "OUTCOME", "REASON"), rows, "    ")
        )


@click.command()
@click.argument("gtrid", type=GTRID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def show(ctx: click.Context, gtrid: str, as_json: bool) -> None:
    """Everything known about one global transaction, with its audit trail."""
    with get(ctx).inspector() as inspector:
        info = inspector.show(gtrid)
    if as_json:
        render.emit_json(info.to_json())
    else:
        _show_human(info)
    _unreachable(info.unreachable)
    ctx.exit(1 if info.unreachable else 0)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def log(ctx: click.Context, as_json: bool) -> None:
    """Inspect the coordinator logs: records, segments and sizes per node."""
    if ctx.invoked_subcommand is not None:
        return
    with get(ctx).inspector() as inspector:
        logs = inspector.logs()
    if as_json:
        render.emit_json([n.to_json() for n in logs])
        return
    if not logs:
        where = redact(get(ctx).settings.log)
        shared = log_is_shared(where)
        click.echo(
            f"the coordinator log is shared, in {where}"
            if shared
            else f"no coordinator log under {where}"
        )
        return
    rows = [
        (
            n.node,
            n.owner,
            len(n.segments),
            n.records,
            n.pending,
            n.size,
            render.when(n.oldest_pending_at),
        )
        for n in logs
    ]
    headers = ("NODE", "COORDINATOR", "SEGMENTS", "RECORDS", "PENDING", "BYTES", "OLDEST PENDING")
    click.echo(render.table(headers, rows))
    torn = [(n.node, s) for n in logs for s in n.segments if s.torn_bytes]
    for node, seg in torn:
        if seg.corrupt is None:
            render.warn(f"{node}/{seg.name}: {seg.torn_bytes} bytes of torn tail (ignored)")
            continue
        offset = seg.size - seg.torn_bytes
        render.warn(
            f"{node}/{seg.name}: CORRUPT at offset {offset}: {seg.corrupt}; this log is not"
            f" used until an operator acts (docs/operations.md: `xatm log salvage {node}`)"
        )
    if any(s.corrupt for n in logs for s in n.segments):
        ctx.exit(1)


@log.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def compact(ctx: click.Context, as_json: bool) -> None:
    """Compact the logs of dead coordinators (live ones compact their own)."""
    with get(ctx).inspector() as inspector:
        done = inspector.compact_logs()
    if as_json:
        render.emit_json([c.to_json() for c in done])
        return
    if not done:
        click.echo("no coordinator log to compact")
        return
    rows = [
        (c.node, "yes" if c.compacted else "no", c.bytes_before, c.bytes_after, c.note)
        for c in done
    ]
    click.echo(render.table(("NODE", "COMPACTED", "BYTES BEFORE", "BYTES AFTER", "NOTE"), rows))


@log.command()
@click.argument("node")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_context
def salvage(ctx: click.Context, node: str, yes: bool, as_json: bool) -> None:
    """Rebuild the corrupt log of a stopped NODE from every record still readable.

    The old segments are moved aside into <log>/NODE/salvaged-<time>/, never deleted; a
    decision that was in a damaged part is lost, so check the transactions of the time
    window printed here before starting NODE again (docs/operations.md). Audited.
    """
    context = get(ctx)
    settings = context.settings
    if log_is_shared(settings.log):
        raise click.ClickException("the shared log has no segments to salvage")
    if not yes:
        click.confirm(
            f"rebuild the log of node {node!r} from its readable records (old segments are"
            " kept aside)?",
            abort=True,
        )
    done = salvage_log(settings.log, node, actor=actor(), audit_node=context.own_node_id("cli"))
    if as_json:
        render.emit_json(
            {
                "node": done.node,
                "kept": done.kept,
                "records": done.records,
                "damaged": [
                    {"segment": name, "start": start, "end": end}
                    for name, start, end in done.damaged
                ],
                "moved_to": None if done.moved_to is None else str(done.moved_to),
            }
        )
        return
    click.echo(
        f"node {node}: kept {done.kept} pending decision(s) of {done.records} readable"
        f" record(s); old segments moved to {done.moved_to}"
    )
    for (name, start, end), (before, after) in zip(done.damaged, done.around, strict=True):
        click.echo(
            f"damaged: {name} bytes {start}-{end}; decisions around it:"
            f" {render.when(before)} .. {render.when(after)}"
        )
    if done.damaged:
        render.warn(
            "a COMMIT decision in a damaged part is lost: before starting the node, check"
            " its transactions of those times with `xatm indoubt` (docs/operations.md)"
        )
