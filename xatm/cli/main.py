"""Entry point of the ``xatm`` command: inspect and resolve in-doubt global transactions.

Every command reads the TOML config given by ``--config PATH`` (or ``$XATM_CONFIG``). User
mistakes (bad config, unreachable resource, unknown or malformed gtrid, a refused manual
resolution) print one line and exit non-zero; no traceback, no password. ``XATM_DEBUG=1``
shows the traceback of an unexpected error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from xatm import XatmError
from xatm.admin import Wait, describe_error, redact, report_waits
from xatm.cli import act, daemon, logs, look, sagas
from xatm.cli.session import Session

#: the exit status of a command whose reader went away (``xatm indoubt | head -1``): a
#: process killed by SIGPIPE reports 128 + 13, as every Unix tool in a pipe does
EXIT_BROKEN_PIPE = 128 + 13


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: whatever is still buffered for a reader that went away
    is dropped (its flush at exit would raise BrokenPipeError again)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's runner)
        pass


class _Group(click.Group):
    """Turns xatm's errors (and any unexpected one) into a one-line message and exit 1; a
    closed pipe on stdout ends the command quietly (status 141, like SIGPIPE)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a reader gone before the last write: raised here
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except SystemExit as e:
            # click's own handling of a closed pipe (while it printed help, say): status 1
            if e.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
                sys.exit(EXIT_BROKEN_PIPE)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return self._invoke(ctx)
        except click.ClickException as e:
            if not logs.is_json():
                raise
            # a JSON line like every other one on stderr (the text format: click's own)
            logs.notice(logs.one_line(e.format_message()), logging.ERROR)
            raise click.exceptions.Exit(e.exit_code) from None

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            _quiet_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        except XatmError as e:
            raise click.ClickException(logs.one_line(redact(str(e))) or type(e).__name__) from None
        except Exception as e:
            if os.environ.get("XATM_DEBUG"):
                raise
            text = describe_error(e) if str(e).strip() else ""
            raise click.ClickException(
                f"unexpected error: {type(e).__name__}: {text} (XATM_DEBUG=1 shows more)"
            ) from None


@click.group(cls=_Group)
@click.option(
    "--config",
    "config_path",
    envvar="XATM_CONFIG",
    metavar="PATH",
    help="The TOML config file (default: $XATM_CONFIG).",
)
@click.option(
    "--node-id",
    metavar="ID",
    help="node_id of this command's own log (default: the config's node_id + '-cli').",
)
@click.option(
    "--app-dir",
    envvar="XATM_APP_DIR",
    default=".",
    show_default=True,
    metavar="DIR",
    help="Import the config's sagas (sagas = [...]) from DIR first, as the application does"
    " (default: the current directory; $XATM_APP_DIR).",
)
@click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    envvar="XATM_LOG_FORMAT",
    default="text",
    show_default=True,
    help="stderr as text lines with a UTC timestamp, or one JSON object per line"
    " ($XATM_LOG_FORMAT).",
)
@click.version_option(package_name="xatm")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    node_id: str | None,
    app_dir: str,
    verbose: int,
    log_format: str,
) -> None:
    """xatm: inspect and resolve in-doubt global transactions.

    docs/operations.md is the on-call runbook.
    """
    logs.configure(verbose, log_format)
    _app_dir(app_dir)
    ctx.obj = Session(config_path, node_id)
    report_waits(_waiting(ctx.obj))


def _waiting(obj: Session) -> Callable[[Wait], None]:
    """Say on stderr, once a wait on a resource has lasted a second, what the command is
    waiting for: a silent or unreachable server shows at once, not when the command ends."""

    said: dict[tuple[str, str], float] = {}

    def notice(wait: Wait) -> None:
        now = time.monotonic()
        if now - said.get((wait.resource, wait.what), -60.0) < 10.0:
            return  # the same wait, by another thread of the command (once is enough)
        said[(wait.resource, wait.what)] = now
        try:
            spec = obj.settings.resources.get(wait.resource)
            where = f" ({spec.redacted()})" if spec is not None else ""
        except Exception:  # never let a notice fail the command
            where = ""
        limit = (
            f"gives up after {wait.limit:.3g} s"
            if wait.limit is not None
            else "gives up at the connect timeout"
        )
        logs.notice(
            f"xatm: waiting for resource {wait.resource!r}{where}: {wait.what} has had no"
            f" answer for {wait.waited:.0f} s ({limit})",
            logging.WARNING,
            resource=wait.resource,
        )

    return notice


def _app_dir(path: str) -> None:
    """Put the application's folder first on sys.path (as celery and uvicorn do), so that
    the config's ``sagas = ["module:attribute"]`` import as they do in the application."""
    folder = os.path.abspath(path)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"{path!r} is not a directory", param_hint="--app-dir")
    if folder not in sys.path:
        sys.path.insert(0, folder)


for _command in (
    look.doctor,
    look.indoubt,
    look.show,
    act.recover,
    daemon.sweep,
    act.commit,
    act.rollback,
    look.log,
    sagas.sagas,
    sagas.saga,
):
    main.add_command(_command)


if __name__ == "__main__":
    main()
