"""A manager's arguments, checked before anything is opened (threaded and asyncio alike).

:func:`check_arguments` turns what ``TransactionManager(...)`` or ``AsyncTransactionManager(...)``
was given into :class:`ManagerArguments`, raising :class:`~xatm.ConfigurationError` for the
first bad one: no log is opened, no lock taken and no connection made before every argument
passed. The asyncio manager checks them in its constructor (a typo fails there, not later on
a worker thread) and opens with them later. :func:`settings_arguments` reads the same
arguments from validated TOML settings, for both managers' ``from_settings``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeAlias, TypeVar

from xatm.core import failpoint as _failpoint
from xatm.core.config import (
    Settings,
    resource_specs,
    validate_max_active,
    validate_retention,
    validate_timeout,
)
from xatm.core.urls import ResourceSpec, log_is_shared, parse_url
from xatm.core.xid import validate_node_id
from xatm.errors import ConfigurationError
from xatm.integrations.sqlalchemy import resources as _sqlalchemy
from xatm.log.file import DEFAULT_RETAIN, DEFAULT_SEGMENT_BYTES
from xatm.recovery.sweeper import DEFAULT_INTERVAL, sweeper_settings, validate_interval
from xatm.sagas.definition import Saga, registry

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    #: what a resource may be given as: a URL, a parsed URL, or a SQLAlchemy Engine
    ResourceLike: TypeAlias = str | ResourceSpec | Engine


@dataclass(frozen=True)
class ManagerArguments:
    """Every argument of a manager, checked."""

    node_id: str
    timeout: float
    specs: dict[str, ResourceSpec]
    engines: dict[str, Any]  # resource name -> SQLAlchemy Engine (its own pool is used)
    log_directory: str | None  # None: the shared log at ``log_spec``
    log_spec: ResourceSpec | None
    commit_markers: frozenset[str]
    parallel: bool
    pool_size: int
    segment_bytes: int
    sweeper: bool
    sweep_interval: float
    lock_timeout: float
    sagas: dict[str, Saga]
    fail_fast: bool
    decision_retention: float
    max_active: int | None


def _check_numbers(**values: object) -> None:
    """Refuse a size or a wait that is not a number in range (ConfigurationError)."""
    for name, value in values.items():
        low = 0 if name == "lock_timeout" else 1
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
            raise ConfigurationError(f"{name} must be a number >= {low}, got {value!r}")
        if name != "lock_timeout" and not isinstance(value, int):
            raise ConfigurationError(f"{name} must be an integer, got {value!r}")


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def check_arguments(
    resources: Mapping[str, ResourceLike],
    log: str | os.PathLike[str],
    node_id: str,
    timeout: float = 30.0,
    *,
    parallel: bool = True,
    pool_size: int = 32,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    commit_markers: Iterable[str] = (),
    sweeper: bool = True,
    sweep_interval: float = DEFAULT_INTERVAL,
    lock_timeout: float = 30.0,
    sagas: Iterable[Saga | str] = (),
    fail_fast: bool = False,
    decision_retention: float = DEFAULT_RETAIN,
    max_active: int | None = None,
) -> ManagerArguments:
    """Check every argument (ConfigurationError for the first bad one); opens nothing.
    Its signature is both managers' (:func:`takes_manager_arguments`)."""
    _failpoint.check()
    node_id = validate_node_id(node_id)
    sweep_interval = validate_interval(sweep_interval)
    _check_numbers(pool_size=pool_size, segment_bytes=segment_bytes, lock_timeout=lock_timeout)
    max_active = validate_max_active(max_active)
    timeout = validate_timeout(timeout)
    retention = validate_retention(decision_retention)
    if not isinstance(resources, Mapping):
        raise ConfigurationError("resources must be a non-empty mapping of name to URL")
    engines = {n: e for n, e in dict(resources).items() if _sqlalchemy.is_engine(e)}
    specs = resource_specs(
        {
            n: _sqlalchemy.spec_from_engine(engines[n]) if n in engines else v
            for n, v in dict(resources).items()
        }
    )
    if not isinstance(log, str | os.PathLike) or not str(log):
        raise ConfigurationError("log must be a directory path or a PostgreSQL URL")
    log_spec: ResourceSpec | None = None
    log_directory: str | None = None
    if log_is_shared(log):
        log_spec = parse_url(str(log))  # errors never show the password
        if log_spec.kind != "postgresql":
            raise ConfigurationError(
                f"log {log_spec.redacted()}: a shared log must be a PostgreSQL database"
            )
    else:
        log_directory = str(Path(log).resolve())
    if isinstance(commit_markers, str):
        commit_markers = [commit_markers]
    markers = frozenset(commit_markers)
    unknown = markers - set(specs)
    if unknown:
        raise ConfigurationError(
            f"commit_markers names unknown resource(s): {', '.join(sorted(unknown))}"
        )
    if markers and log_directory is None:
        raise ConfigurationError(
            "commit_markers cannot be combined with a shared log yet: a sweeper on another"
            " host could not fence a paused coordinator's marker commit"
        )
    return ManagerArguments(
        node_id=node_id,
        timeout=timeout,
        specs=specs,
        engines=engines,
        log_directory=log_directory,
        log_spec=log_spec,
        commit_markers=markers,
        parallel=_check_flag("parallel", parallel),
        pool_size=pool_size,
        segment_bytes=segment_bytes,
        sweeper=_check_flag("sweeper", sweeper),
        sweep_interval=sweep_interval,
        lock_timeout=float(lock_timeout),
        sagas=registry(sagas),
        fail_fast=_check_flag("fail_fast", fail_fast),
        decision_retention=retention,
        max_active=max_active,
    )


_P = ParamSpec("_P")
_S = TypeVar("_S")


def _taking(
    check: Callable[_P, ManagerArguments],
) -> Callable[[Callable[[_S, ManagerArguments], None]], Callable[Concatenate[_S, _P], None]]:
    def wrap(init: Callable[[_S, ManagerArguments], None]) -> Callable[Concatenate[_S, _P], None]:
        def __init__(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
            init(self, check(*args, **kwargs))

        functools.update_wrapper(__init__, init)
        del __init__.__wrapped__  # type: ignore[attr-defined]
        own = inspect.signature(check)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *own.parameters.values()], return_annotation=None
        )
        return __init__

    return wrap


#: the constructor of both managers: ``def __init__(self, args: ManagerArguments)``
#: decorated with it takes :func:`check_arguments`' parameters (typed, one signature for
#: the threaded and the asyncio manager), checks them, and is called with the result
takes_manager_arguments = _taking(check_arguments)


class SettingsArguments(NamedTuple):
    """A manager's arguments as a TOML config gives them (``from_settings``)."""

    resources: dict[str, ResourceSpec]
    log: str
    node_id: str
    timeout: float
    commit_markers: tuple[str, ...]
    sweeper: bool
    sweep_interval: float
    sagas: tuple[str, ...]
    fail_fast: bool
    decision_retention: float
    max_active: int | None


def settings_arguments(settings: Settings) -> SettingsArguments:
    """The arguments ``settings`` (a config file, validated) gives a manager."""
    sweep = sweeper_settings(settings.extra)
    return SettingsArguments(
        resources=dict(settings.resources),
        log=settings.log,
        node_id=settings.node_id,
        timeout=settings.timeout,
        commit_markers=tuple(settings.commit_markers),
        sweeper=sweep.enabled,
        sweep_interval=sweep.interval,
        sagas=tuple(settings.extra.get("sagas", ())),
        fail_fast=bool(settings.extra.get("fail_fast", False)),
        decision_retention=float(settings.extra.get("decision_retention", DEFAULT_RETAIN)),
        max_active=settings.extra.get("max_active"),
    )
