"""Resource URLs: parse them into a ResourceSpec, and show them without their password.

Accepted schemes:

* PostgreSQL: ``postgresql://``, ``postgres://``, ``postgresql+psycopg://``
* MySQL / MariaDB: ``mysql://``, ``mariadb://``, ``mysql+mysqlconnector://``,
  ``mariadb+mysqlconnector://``

``user:password@host:port/database?option=value``; options are passed to the driver
(for example ``sslmode`` for psycopg, ``unix_socket`` or ``ssl_disabled`` for
mysql-connector). A password is never shown: :meth:`ResourceSpec.redacted` and ``repr``
replace it with ``***``, and every error message is built from the redacted form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import ConfigurationError

Kind = Literal["postgresql", "mysql"]

_SCHEMES: dict[str, Kind] = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+psycopg": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mysql+mysqlconnector": "mysql",
    "mariadb+mysqlconnector": "mysql",
}
_DEFAULT_PORT: dict[Kind, int] = {"postgresql": 5432, "mysql": 3306}
_PASSWORD_RE = re.compile(r"(//[^:/?#@]*:)([^@/]*)(@)")

#: seconds to wait for a connection before a node counts as unreachable
DEFAULT_CONNECT_TIMEOUT = 5


def redact(text: str) -> str:
    """Replace any ``user:password@`` in ``text`` with ``user:***@``."""
    return _PASSWORD_RE.sub(r"\1***\3", text)


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """Where one resource lives and how to log in to it (parsed from a URL)."""

    kind: Kind
    host: str
    port: int
    user: str | None
    password: str | None = field(repr=False)
    database: str | None
    options: tuple[tuple[str, str], ...] = ()

    def redacted(self) -> str:
        """The URL with the password replaced by ``***``: safe to print and log."""
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":***"
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"{self.kind}://{auth}{host}:{self.port}/{quote(self.database or '', safe='')}"
        if self.options:
            url += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in self.options)
        return url

    def __repr__(self) -> str:
        return f"ResourceSpec({self.redacted()!r})"

    def __str__(self) -> str:
        return self.redacted()


def parse_url(url: object) -> ResourceSpec:
    """Parse a resource URL; raise ConfigurationError (never showing the password)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(
            f"a resource URL must be a non-empty string, got {type(url).__name__}"
        )
    shown = redact(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"malformed resource URL {shown!r}: {redact(str(e))}") from None
    kind = _SCHEMES.get(parts.scheme.lower())
    if kind is None:
        known = ", ".join(sorted(_SCHEMES))
        raise ConfigurationError(
            f"unsupported scheme {parts.scheme!r} in resource URL {shown!r}; use one of: {known}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"resource URL {shown!r} names no host")
    database = unquote(parts.path.lstrip("/")) or None
    if database is not None and "/" in database:
        raise ConfigurationError(f"resource URL {shown!r}: the path must be just a database name")
    try:
        options = tuple(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        if parts.query:
            raise ConfigurationError(f"resource URL {shown!r}: malformed query string") from None
        options = ()
    return ResourceSpec(
        kind=kind,
        host=parts.hostname,
        port=port or _DEFAULT_PORT[kind],
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        options=options,
    )
