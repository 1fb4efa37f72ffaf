"""What every ``xatm`` command shares: the config, the node_id, the actor, GTRID checking.

Read-only commands use an :class:`xatm.admin.Inspector` (no coordinator log of their own). Commands
that act (``recover``, ``commit``, ``rollback``, ``sweep``) need a TransactionManager, hence a
node_id of their own: the config's node_id with a suffix (``<node_id>-cli``,
``<node_id>-sweep``) unless ``--node-id`` is given. They must never take the application's own
node_id: its log's lock is what tells everyone the application is alive.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import click

from xatm import ConfigurationError, LogLocked, Saga, Settings, TransactionManager, load_config
from xatm.admin import Inspector, gtrid_of, load_sagas, sweeper_settings
from xatm.cli import render

MAX_NODE_ID = 30


class UsageMistake(click.ClickException):
    """A mistake in how the command was called: one line on stderr, exit status 2."""

    exit_code = 2


@dataclass
class Session:
    """One run of the ``xatm`` command: its global options, and what is built from them
    (lazily). Kept as click's ``ctx.obj``; not to be confused with click's ``Context`` nor
    with a manager's ``xatm.node.context.Context``."""

    config_path: str | None
    node_id: str | None
    _settings: Settings | None = field(default=None, repr=False)
    #: work a command skipped (it then exits non-zero)
    skipped: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            if not self.config_path:
                raise UsageMistake("no configuration: pass --config PATH or set XATM_CONFIG")
            self._settings = load_config(self.config_path)
        return self._settings

    def inspector(self) -> Inspector:
        return Inspector.from_settings(self.settings)

    def own_node_id(self, suffix: str) -> str:
        if self.node_id:
            return self.node_id
        node = f"{self.settings.node_id}-{suffix}"
        if len(node) > MAX_NODE_ID:
            raise ConfigurationError(
                f"node_id {self.settings.node_id!r} is too long to add '-{suffix}' to it:"
                f" pass --node-id (at most {MAX_NODE_ID} characters) for this command"
            )
        return node

    def manager(
        self,
        suffix: str,
        *,
        sweeper: bool = False,
        interval: float | None = None,
        sagas: Literal["none", "recover", "need"] = "none",
        lock_timeout: float = 5.0,
        busy_raises: bool = False,
    ) -> TransactionManager:
        """A TransactionManager of this command's own node_id (never the application's).

        ``sagas``: whether the config's sagas are imported for it: ``"none"`` (``commit``,
        ``rollback``: they act on one gtrid, never on a saga), ``"recover"`` (``recover``:
        if they cannot be imported, it says so, recovers the transactions, and exits 1
        since it skipped the sagas: :attr:`skipped`), ``"need"`` (``saga retry|abort``,
        ``sweep``: they stop with the import error). A node_id held by another live
        process (its log lock, after ``lock_timeout`` seconds, or its identity lock on a
        resource) is a one-line error; with ``busy_raises`` it raises LogLocked (or NodeInUse)."""
        settings = self.settings
        node = self.own_node_id(suffix)
        if node == settings.node_id:
            raise ConfigurationError(
                f"--node-id {node!r} is the application's own node_id: a command must not take"
                " the application's log (pick another one)"
            )
        loaded: list[Saga] = []
        if sagas != "none":
            try:
                loaded = load_sagas(settings.extra.get("sagas", ()))
            except ConfigurationError as e:
                hint = (
                    f"{e} (this command imports them from the current directory or --app-dir,"
                    " and from PYTHONPATH)"
                )
                if sagas == "need":
                    raise ConfigurationError(hint) from None
                self.skipped.append(f"no saga was recovered: {hint}")
                render.warn(f"{hint}; this command recovers no saga")
        try:
            tm = TransactionManager(
                dict(settings.resources),
                settings.log,
                node,
                settings.timeout,
                commit_markers=settings.commit_markers,
                sweeper=sweeper,
                sweep_interval=sweeper_settings(settings.extra).interval
                if interval is None
                else interval,
                lock_timeout=lock_timeout,
                sagas=loaded,
            )
        except LogLocked:  # NodeInUse (the identity lock) says what it is itself
            if busy_raises:
                raise
            raise click.ClickException(
                f"node_id {node!r} is in use by another running xatm command (its log is"
                " locked): wait for it, or pass another --node-id"
            ) from None
        tm.sweeper.log_retention = sweeper_settings(settings.extra).log_retention
        return tm


def actor() -> str:
    """Who acts, for the audit trail: ``cli:<login name>`` (or ``$XATM_ACTOR``)."""
    explicit = os.environ.get("XATM_ACTOR")
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"cli:{user}"


if TYPE_CHECKING:  # generic in the stubs of recent click, not at run time in older ones
    _ParamType = click.ParamType[str]
else:
    _ParamType = click.ParamType


class GtridType(_ParamType):
    """A gtrid argument: an xatm gtrid, or any form a database shows one of its branches' ids
    in (a ``pg_prepared_xacts`` gid, an ``XA RECOVER`` data column: ``xatm.admin.gtrid_of``);
    anything else is refused."""

    name = "GTRID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return gtrid_of(value)
        except ConfigurationError as e:
            raise UsageMistake(str(e)) from None


GTRID = GtridType()


def get(ctx: click.Context) -> Session:
    obj = ctx.find_object(Session)
    assert obj is not None
    return obj
