"""SQLAlchemy integration: Engines as resources, and Sessions/Connections joined to a branch.

(Skeleton: filled in by the SQLAlchemy integration work of issue #4.) SQLAlchemy is imported
lazily, only when one of these functions is used, so it stays an optional dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._urls import ResourceSpec, parse_url
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._participant import Participant
    from ._pool import Pool
    from ._transaction import Transaction


def is_engine(value: object) -> bool:
    """True if ``value`` looks like a SQLAlchemy Engine (no import of SQLAlchemy needed)."""
    return hasattr(value, "dialect") and hasattr(value, "raw_connection")


def spec_from_engine(engine: Any) -> ResourceSpec:
    """The ResourceSpec of an Engine's URL (psycopg and mysql-connector dialects)."""
    url = engine.url
    driver = f"{url.get_backend_name()}+{url.get_driver_name()}"
    if driver not in ("postgresql+psycopg", "mysql+mysqlconnector", "mariadb+mysqlconnector"):
        raise ConfigurationError(
            f"engine dialect {driver!r} is not supported: use postgresql+psycopg or"
            " mysql+mysqlconnector"
        )
    return parse_url(url.render_as_string(hide_password=False))


def engine_pool(engine: Any, participant: Participant, max_idle: int) -> Pool:
    """A Pool drawing connections from the Engine's own pool."""
    raise NotImplementedError("SQLAlchemy engines as resources are not implemented yet")


def session(tx: Transaction, binds: Any = None, **kwargs: Any) -> Any:
    """An ORM Session whose work joins ``tx``."""
    raise NotImplementedError("tx.session() is not implemented yet")


def sa_connection(tx: Transaction, resource: str) -> Any:
    """A SQLAlchemy Connection on ``tx``'s branch on ``resource``."""
    raise NotImplementedError("tx.sa_connection() is not implemented yet")
