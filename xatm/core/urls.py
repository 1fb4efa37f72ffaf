"""Resource URLs: parse them into a ResourceSpec, and show them without their password.

Accepted schemes:

* PostgreSQL: ``postgresql://``, ``postgres://``, ``postgresql+psycopg://``
* MySQL / MariaDB: ``mysql://``, ``mariadb://``, ``mysql+mysqlconnector://``,
  ``mariadb+mysqlconnector://`` (mysql-connector-python, the default driver);
  ``mysql+pymysql://``, ``mariadb+pymysql://`` (PyMySQL); ``mysql+mysqldb://``,
  ``mariadb+mysqldb://`` (mysqlclient). The driver part becomes ``ResourceSpec.driver``
  (None for the default drivers: psycopg 3 and mysql-connector).

``postgresql+psycopg2://`` is refused with a ConfigurationError saying what to use instead
(xatm drives PostgreSQL through psycopg 3 only; see docs/sqlalchemy.md).

``user:password@host:port/database?option=value``; options are passed to the driver
(for example ``sslmode`` for psycopg, ``unix_socket`` or ``ssl_disabled`` for
mysql-connector). A password is never shown: :meth:`ResourceSpec.redacted` and ``repr``
replace it with ``***`` (so do they for an option such as ``password=``), and every error
message is built from the redacted form. A user name or password must percent-encode '@',
'/', '?' and '#'; a URL that does not is refused rather than read as another host or port.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from xatm.core.text import first_line
from xatm.errors import ConfigurationError

Kind = Literal["postgresql", "mysql"]

_SCHEMES: dict[str, tuple[Kind, str | None]] = {
    "postgresql": ("postgresql", None),
    "postgres": ("postgresql", None),
    "postgresql+psycopg": ("postgresql", None),
    "mysql": ("mysql", None),
    "mariadb": ("mysql", None),
    "mysql+mysqlconnector": ("mysql", None),
    "mariadb+mysqlconnector": ("mysql", None),
    "mysql+pymysql": ("mysql", "pymysql"),
    "mariadb+pymysql": ("mysql", "pymysql"),
    "mysql+mysqldb": ("mysql", "mysqldb"),
    "mariadb+mysqldb": ("mysql", "mysqldb"),
}
#: schemes refused with a hint at what to use instead
_REFUSED_SCHEMES = {
    "postgresql+psycopg2": (
        "xatm drives PostgreSQL through psycopg 3 only (installed with xatm): write the URL"
        " as postgresql:// (or postgresql+psycopg:// for SQLAlchemy); your application may"
        " keep psycopg2 for its other work"
    ),
}
_DEFAULT_PORT: dict[Kind, int] = {"postgresql": 5432, "mysql": 3306}
# ``//user:password@``: the password may hold any character but whitespace (even '@' and '/',
# which a careless URL leaves unencoded), so it runs to the last '@' of the word; hiding too
# much is harmless, showing a piece of a password is not.
_PASSWORD_RE = re.compile(r"(//[^:/?#\s]*:)(\S*)(@)")
# ``password=...`` (``passwd``, ``sslpassword``...) in a query string or a conninfo string
_SECRET_OPTION_RE = re.compile(r"(?i)\b([a-z0-9_]*(?:password|passwd|pwd))=([^&\s'\"]*)")
_SECRET_KEY_RE = re.compile(r"(?i)password|passwd|pwd")

_ENCODE_HINT = "percent-encode any '@', '/', '?' or '#' in the user name or password"

#: seconds to wait for a connection before a node counts as unreachable
DEFAULT_CONNECT_TIMEOUT = 5


def log_is_shared(log: object) -> bool:
    """True if a configured ``log`` names the shared PostgreSQL log (a URL), False if it is a
    directory: the one rule, used wherever the configured text is read."""
    return "://" in str(log)


def redact(text: str) -> str:
    """Make a driver's text fit to show: any ``user:password@`` and ``password=...`` replaced
    with ``***``, and what a participant registered to cut (:func:`add_scrubber`: a driver's
    advice to the programmer). Everything xatm puts in an error, a report, the audit trail or
    the CLI's output passes here."""
    text = _SECRET_OPTION_RE.sub(r"\1=***", _PASSWORD_RE.sub(r"\1***\3", text))
    for scrub in _SCRUBBERS:
        text = scrub(text)
    return text


#: what participants cut from a driver's text before it is shown (see :func:`add_scrubber`)
_SCRUBBERS: list[Callable[[str], str]] = []


def add_scrubber(scrub: Callable[[str], str]) -> None:
    """Have :func:`redact` also pass every text through ``scrub``: a participant's way to cut
    its driver's quirks out of what xatm shows, without this module knowing the driver."""
    if scrub not in _SCRUBBERS:
        _SCRUBBERS.append(scrub)


def describe_error(e: BaseException) -> str:
    """An error's text as xatm shows it: :func:`redact`, then its first line (or the
    error's type when it has no text)."""
    return first_line(redact(str(e)), type(e).__name__)


def _redact_url(url: str) -> str:
    """One whole URL, even a malformed one, with everything from ``user:`` to its last '@'
    hidden (a password may hold unencoded '@', '/', '?', '#' or spaces)."""
    head, sep, rest = url.partition("//")
    at = rest.rfind("@")
    if sep and at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            url = f"{head}//{user}:***@{rest[at + 1 :]}"
    return redact(url)


def _is_secret_option(key: str) -> bool:
    return _SECRET_KEY_RE.search(key) is not None


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
    #: the driver the URL names, when not the default one (``pymysql``, ``mysqldb``)
    driver: str | None = None

    def redacted(self) -> str:
        """The URL with the password replaced by ``***``: safe to print and log."""
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":***"
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = f"{self.kind}+{self.driver}" if self.driver else self.kind
        url = f"{scheme}://{auth}{host}:{self.port}/{quote(self.database or '', safe='')}"
        if self.options:
            url += "?" + "&".join(
                f"{k}={'***' if _is_secret_option(k) else quote(v, safe='')}"
                for k, v in self.options
            )
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
    shown = _redact_url(url)
    # urllib's own messages may quote pieces of the URL (a password cut at an unencoded '/'
    # reads as a port): they are never shown.
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigurationError(f"malformed resource URL {shown!r}") from None
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(
            f"resource URL {shown!r}: the port must be a number from 1 to 65535 ({_ENCODE_HINT})"
        ) from None
    refused = _REFUSED_SCHEMES.get(parts.scheme.lower())
    if refused is not None:
        raise ConfigurationError(f"resource URL {shown!r}: {refused}")
    kind, driver = _SCHEMES.get(parts.scheme.lower(), (None, None))
    if kind is None:
        known = ", ".join(sorted(_SCHEMES))
        raise ConfigurationError(
            f"unsupported scheme {parts.scheme!r} in resource URL {shown!r}; use one of: {known}"
        )
    if "@" in parts.path + parts.query + parts.fragment:
        # "u:12/x@h" would otherwise parse as host u, port 12, database "x@h"
        raise ConfigurationError(f"resource URL {shown!r}: an '@' after the host ({_ENCODE_HINT})")
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
        driver=driver,
    )


_PG_SETTING_RE = re.compile(r"(?:-c\s*|--)([A-Za-z_][A-Za-z0-9_.]*)\s*=")


def pg_settings_in(options: str) -> set[str]:
    """The server settings a libpq ``options`` string sets (``-c name=value`` or
    ``--name=value``), lower-cased: a URL's ``?options=...`` overrides xatm's defaults."""
    return {m.group(1).lower() for m in _PG_SETTING_RE.finditer(options)}
