"""Settings: validate the TransactionManager's arguments and read them from TOML.

A config file::

    node_id = "api-1"
    log = "/var/lib/xatm"          # relative paths are relative to the file's directory
    timeout = 30.0
    decision_retention = 300.0     # seconds ended COMMIT decisions are kept (optional)
    sagas = ["myapp.sagas:transfer"]   # saga definitions to run and recover (optional)
    fail_fast = true               # refuse to start unless every resource is ready (optional)
    max_active = 16                # transactions in their block at once (optional; default: any)

    [resources.ledger]
    url = "postgresql://app:${LEDGER_PASSWORD}@db1:5432/ledger"
    commit_marker = true           # may carry the commit decision (fast path, optional)

    [resources.wallet]
    url = "mysql://app:${WALLET_PASSWORD}@db2:3306/wallet"

``${NAME}`` in a string is replaced with the environment variable NAME (an unset variable is
an error, named in the message), so passwords can stay out of the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xatm.core.urls import ResourceSpec, log_is_shared, parse_url, redact
from xatm.core.xid import validate_node_id, validate_resource_name
from xatm.errors import ConfigurationError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KNOWN_KEYS = {
    "node_id",
    "log",
    "timeout",
    "resources",
    "sweeper",
    "sagas",
    "decision_retention",
    "fail_fast",
    "max_active",
}
_RESOURCE_KEYS = {"url", "commit_marker"}


@dataclass(frozen=True)
class Settings:
    """Validated settings of one TransactionManager."""

    resources: Mapping[str, ResourceSpec]
    log: str
    node_id: str
    timeout: float
    extra: Mapping[str, Any] = field(default_factory=dict)
    commit_markers: tuple[str, ...] = ()


def expand_env(text: str, where: str) -> str:
    """Replace each ``${NAME}`` in ``text`` with the environment variable NAME."""

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            raise ConfigurationError(f"{where}: environment variable {m.group(1)} is not set")
        return value

    return _ENV_RE.sub(sub, text)


def validate_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def validate_retention(retention: object) -> float:
    if (
        isinstance(retention, bool)
        or not isinstance(retention, int | float)
        or not 0 <= retention < float("inf")
    ):
        raise ConfigurationError(
            f"decision_retention must be a number of seconds >= 0, got {retention!r}"
        )
    return float(retention)


def validate_max_active(value: object) -> int | None:
    """None (no limit) or an integer >= 1 (ConfigurationError otherwise)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"'max_active' must be an integer >= 1, got {value!r}")
    return value


def validate_timeout_or_zero(value: object) -> float:
    """A number of seconds >= 0 (ConfigurationError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigurationError(f"expected a number of seconds >= 0, got {value!r}")
    return float(value)


def resource_specs(resources: object) -> dict[str, ResourceSpec]:
    """Validate a mapping of resource name to URL (or ResourceSpec)."""
    if not isinstance(resources, Mapping) or not resources:
        raise ConfigurationError("resources must be a non-empty mapping of name to URL")
    specs: dict[str, ResourceSpec] = {}
    for name, value in resources.items():
        validate_resource_name(name)
        try:
            specs[name] = value if isinstance(value, ResourceSpec) else parse_url(value)
        except ConfigurationError as e:
            raise ConfigurationError(f"resource {name!r}: {e}") from None
    return specs


def load_config(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {str(p)!r} does not exist") from None
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {str(p)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    where = f"config file {str(p)!r}"
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: unknown setting(s): {', '.join(sorted(unknown))}")
    for key in ("node_id", "log"):
        if key not in data:
            raise ConfigurationError(f"{where}: {key!r} is required")
    raw_resources = data.get("resources")
    if not isinstance(raw_resources, dict) or not raw_resources:
        raise ConfigurationError(f"{where}: at least one [resources.NAME] table with a url")
    urls: dict[str, str] = {}
    markers: list[str] = []
    for name, table in raw_resources.items():
        if not isinstance(table, dict) or not isinstance(table.get("url"), str):
            raise ConfigurationError(f"{where}: [resources.{name}] needs a string 'url'")
        unknown = set(table) - _RESOURCE_KEYS
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown setting(s) in [resources.{name}]: {', '.join(sorted(unknown))}"
            )
        urls[name] = expand_env(table["url"], f"{where}, resource {name!r}")
        marker = table.get("commit_marker", False)
        if not isinstance(marker, bool):
            raise ConfigurationError(
                f"{where}: [resources.{name}] commit_marker must be true or false"
            )
        if marker:
            markers.append(name)
    if "sagas" in data:
        saga_list(data["sagas"], where)  # imported when the manager is built
    if "decision_retention" in data:
        try:
            validate_retention(data["decision_retention"])
        except ConfigurationError as e:
            raise ConfigurationError(f"{where}: {e}") from None
    if not isinstance(data.get("fail_fast", False), bool):
        raise ConfigurationError(f"{where}: 'fail_fast' must be true or false")
    try:
        validate_max_active(data.get("max_active"))
    except ConfigurationError as e:
        raise ConfigurationError(f"{where}: {e}") from None
    log = data["log"]
    if not isinstance(log, str) or not log:
        raise ConfigurationError(f"{where}: 'log' must be a directory path (or a URL)")
    log = expand_env(log, f"{where}, log")
    if not log_is_shared(log) and not os.path.isabs(log):
        log = str((p.parent / log).resolve())
    try:
        return Settings(
            resources=resource_specs(urls),
            log=log,
            node_id=validate_node_id(data["node_id"]),
            timeout=validate_timeout(data.get("timeout", 30.0)),
            extra={
                k: v
                for k, v in data.items()
                if k in ("sweeper", "sagas", "decision_retention", "fail_fast", "max_active")
            },
            commit_markers=tuple(markers),
        )
    except ConfigurationError as e:
        raise ConfigurationError(f"{where}: {redact(str(e))}") from None


def saga_list(value: object, where: str) -> Sequence[str]:
    """Validate the TOML ``sagas`` setting: a list of ``"module:attribute"`` strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{where}: 'sagas' must be a list of 'module:attribute' strings")
    return list(value)
