"""MySQL drivers: what differs between mysql-connector, PyMySQL and mysqlclient (MySQLdb).

XA on MySQL and MariaDB is plain SQL, so one participant (``xatm.participants.mysql.participant``)
serves every driver; this module holds only what the drivers do differently: how to connect, how to
read an error's MySQL error number, how to send several statements in one round trip, how to tell
whether a connection is open and has nothing unread, how to switch autocommit, where a
connection's socket is (``socket_of``, for ``xatm.core.deadline`` to cut a call its server does
not answer), and the driver's own read and write timeouts where it has them (PyMySQL,
mysqlclient: a backstop for a dead peer, and PyMySQL's handshake within the connect timeout).

Drivers, by URL scheme (``mysql://`` and ``mariadb://`` mean mysql-connector):

* ``mysqlconnector``: mysql-connector-python (the default dependency), either of its
  connection classes: ``MySQLConnection`` (pure Python) or ``CMySQLConnection`` (the C
  extension, used by default wherever it loads). Whichever class a connection is, it is used
  as it is: ``use_pure`` is never forced.
* ``pymysql``: PyMySQL (``pip install 'xatm[pymysql]'``).
* ``mysqldb``: mysqlclient, imported as ``MySQLdb`` (``pip install 'xatm[mysqlclient]'``;
  it builds against the MariaDB/MySQL client library).

Errors are classified by their MySQL error number only (mysql-connector's ``errno``,
PyMySQL's and MySQLdb's ``args[0]``): the drivers map numbers to exception classes and
SQLSTATEs differently (PyMySQL raises ``OperationalError`` for XAER_NOTA, mysql-connector
``IntegrityError``), so neither is used to decide anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.metadata
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Iterable
from typing import Any

from xatm.core.urls import add_scrubber
from xatm.errors import ConfigurationError

#: mysql-connector's advice to the programmer, in the text of its ReadTimeoutError and
#: WriteTimeoutError ("<errno>: \n The Read Operation timed out. As a consequence ... consider
#: using the reconnect() option ..."): not for an operator, and wrong for xatm (which never
#: reconnects a branch). Also matched when cut after its first line.
_ADVICE_RE = re.compile(
    r"\s*The (Read|Write) Operation timed out\.?"
    r"(?:\s*As a consequence the current connection has been closed to avoid"
    r"(?:\s+any unstable behaviou?r, consider using the reconnect\(\) option"
    r"\s+(?:and|to)\s+continue\s+with\s+the\s+current\s+session's\s+workflow\.?)?)?\s*"
)


def without_advice(text: str) -> str:
    """``text`` (a driver's error message) without mysql-connector's advice to the
    programmer, in one line; ``xatm.core.urls.redact`` applies it to everything xatm shows."""
    if "Operation timed out" not in text:
        return text
    return _ADVICE_RE.sub(r" The \1 Operation timed out (the connection was closed).", text).strip()


add_scrubber(without_advice)


#: the driver of ``mysql://`` / ``mariadb://`` URLs
DEFAULT = "mysqlconnector"

#: server error numbers meaning the session is gone (the client-side ones are 2000-2999)
_SESSION_GONE = frozenset(
    {
        1053,  # ER_SERVER_SHUTDOWN
        1152,  # ER_ABORTING_CONNECTION
        1153,  # ER_NET_PACKET_TOO_LARGE
        1158,  # ER_NET_READ_ERROR
        1159,  # ER_NET_READ_INTERRUPTED
        1160,  # ER_NET_ERROR_ON_WRITE
        1161,  # ER_NET_WRITE_INTERRUPTED
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL)
    }
)

#: the MySQL protocol's client capability flag allowing ``A; B`` in one query
MULTI_STATEMENTS = 1 << 16

_BOOL_OPTIONS = frozenset({"ssl_disabled", "use_pure", "ssl_verify_cert", "ssl_verify_identity"})


def _option(key: str, value: str) -> object:
    if key in _BOOL_OPTIONS:
        return value.lower() in ("1", "true", "yes", "on")
    if value.isascii() and value.isdigit():  # not "²", which int() refuses
        return int(value)
    return value


class MySQLDriver:
    """One DB-API driver for MySQL/MariaDB. Subclasses say what differs."""

    #: the URL scheme's driver part (``mysql+<name>://``) and SQLAlchemy's driver name
    name = ""
    #: what ``pip`` installs it as, and the module to import
    distribution = ""
    module_name = ""
    #: the xatm extra that installs it (None: a default dependency)
    extra: str | None = None

    def __init__(self) -> None:
        self._module: Any = None
        self._errors: tuple[type[BaseException], ...] | None = None

    # -- loading ---------------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """The driver's module; ConfigurationError naming the extra if it is missing."""
        if self._module is None:
            try:
                self._module = importlib.import_module(self.module_name)
            except ImportError as e:
                how = f"pip install 'xatm[{self.extra}]'" if self.extra else "reinstall xatm"
                raise ConfigurationError(
                    f"the MySQL driver {self.distribution} ({self.name}) is not installed"
                    f" or does not load ({e}): {how}"
                ) from None
        return self._module

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return str(getattr(self.module, "__version__", "?"))

    # -- connections -----------------------------------------------------------------------
    def connect_kwargs(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str | None,
        timeout: int,
        options: Iterable[tuple[str, str]],
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "connect_timeout": timeout,
            "autocommit": True,
        }
        if database:
            kwargs["database"] = database
        for key, value in options:
            kwargs[key] = _option(key, value)
        return kwargs

    def connect(self, kwargs: dict[str, Any], backstop: float | None = None) -> Any:
        """A connection; ``backstop``: seconds for the driver's own read and write timeouts,
        where it has them and the URL does not set them (a bound for a dead peer)."""
        return self.module.connect(**kwargs)

    def socket_of(self, conn: Any) -> int | None:
        """The file descriptor of ``conn``'s socket (None if closed or not known)."""
        return None

    def errors(self) -> tuple[type[BaseException], ...]:
        """The exception classes the driver raises for MySQL and client errors."""
        if self._errors is None:
            self._errors = self._error_classes()
        return self._errors

    def _error_classes(self) -> tuple[type[BaseException], ...]:
        return (self.module.MySQLError,)

    def errno(self, exc: BaseException) -> int | None:
        """The MySQL error number of ``exc`` (server ones < 2000 or >= 3000), or None."""
        args = getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return args[0]
        return None

    def is_connection_error(self, exc: BaseException) -> bool:
        """The connection is unusable and the outcome of its last call is unknown."""
        if isinstance(exc, OSError):
            return True
        if not isinstance(exc, self.errors()):
            return False
        errno = self.errno(exc)
        if errno is None or errno <= 0:
            return True  # a client-side failure with no server error: e.g. "not connected"
        return 2000 <= errno < 3000 or errno in _SESSION_GONE

    def ping(self, conn: Any) -> None:
        """Raise if ``conn`` does not answer (never reconnects)."""
        conn.ping(False)

    def is_open(self, conn: Any) -> bool:
        return bool(getattr(conn, "open", True))

    def has_unread(self, conn: Any) -> bool:
        """Rows or results not read yet (the connection is not fit to pool)."""
        return False

    def consume(self, conn: Any) -> None:
        """Read and drop whatever is unread."""

    def cursor(self, conn: Any) -> Any:
        """A cursor that reads every row at once (buffered)."""
        return conn.cursor()

    def run(self, conn: Any, statements: list[str]) -> None:
        """Send statements that return no rows, as one query where the connection allows it
        (its MULTI_STATEMENTS client flag: set on xatm's own connections; an Engine's may
        lack it, and then the statements go one by one)."""
        if len(statements) > 1 and not int(getattr(conn, "client_flag", 0)) & MULTI_STATEMENTS:
            for statement in statements:
                self.run(conn, [statement])
            return
        cur = conn.cursor()
        try:
            cur.execute("; ".join(statements))
            while cur.nextset():
                pass
        finally:
            cur.close()

    def get_autocommit(self, conn: Any) -> bool:
        return bool(conn.get_autocommit())

    def set_autocommit(self, conn: Any, on: bool) -> None:
        conn.autocommit(on)

    def in_transaction(self, conn: Any) -> bool:
        """Whether ``conn`` may be inside a local transaction (True when unknown)."""
        return True

    def describe(self, conn: Any) -> str:
        """Which driver (and connection class) a connection is, for ``doctor``."""
        return f"{self.distribution} {self.version()} ({type(conn).__name__})"


class MySQLConnector(MySQLDriver):
    """mysql-connector-python, pure (``MySQLConnection``) or C extension (``CMySQLConnection``).

    The C extension's connection has no ``cmd_query_iter``, and its ``next_result`` raises
    the extension's own ``MySQLInterfaceError`` (carrying ``errno``): several statements are
    sent with ``cmd_query`` and their results walked with ``next_result``, the extension's
    error turned into the driver's usual one.
    """

    name = "mysqlconnector"
    distribution = "mysql-connector-python"
    module_name = "mysql.connector"
    extra = None

    def connect_kwargs(self, **kw: Any) -> dict[str, Any]:
        kwargs = super().connect_kwargs(**kw)
        kwargs["connection_timeout"] = kwargs.pop("connect_timeout")
        return kwargs

    def _error_classes(self) -> tuple[type[BaseException], ...]:
        found: tuple[type[BaseException], ...] = (self.module.Error,)
        cext = _cext_error()
        return (*found, cext) if cext is not None else found

    def errno(self, exc: BaseException) -> int | None:
        errno = getattr(exc, "errno", None)
        return errno if isinstance(errno, int) else None

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def is_open(self, conn: Any) -> bool:
        if is_c_extension(conn):
            # the extension's own flag (``is_connected()`` would ping: a round trip)
            handle = getattr(conn, "_cmysql", None)
            return handle is not None and bool(handle.connected())
        return getattr(conn, "_socket", True) is not None

    def socket_of(self, conn: Any) -> int | None:
        if is_c_extension(conn):
            return _cext_socket(conn)
        sock = getattr(getattr(conn, "_socket", None), "sock", None)
        return _fileno(sock)

    def has_unread(self, conn: Any) -> bool:
        return bool(conn.unread_result)

    def consume(self, conn: Any) -> None:
        if conn.unread_result:
            conn.consume_results()

    def cursor(self, conn: Any) -> Any:
        if is_c_extension(conn):
            return conn.cursor(buffered=True)
        # MySQLConnection.cursor() pings the server first (is_connected): a round trip per
        # statement. A lost connection fails the statement itself just as well.
        conn.handle_unread_result()
        return _buffered_cursor_class()(conn)

    def run(self, conn: Any, statements: list[str]) -> None:
        query = "; ".join(statements)
        if not is_c_extension(conn):
            if len(statements) > 1:
                for _ in conn.cmd_query_iter(query):
                    pass
            else:
                conn.cmd_query(query)
            return
        conn.cmd_query(query)
        try:
            while conn.next_result():
                pass
        except BaseException as e:
            raise self._wrap(e) from e

    def _wrap(self, exc: BaseException) -> BaseException:
        """The C extension's own error, as mysql-connector's usual one."""
        cext = _cext_error()
        if cext is None or not isinstance(exc, cext):
            return exc
        errors = importlib.import_module("mysql.connector.errors")
        errno = getattr(exc, "errno", None)
        if isinstance(errno, int) and errno > 0:
            wrapped: BaseException = errors.get_mysql_exception(
                errno, msg=getattr(exc, "msg", str(exc)), sqlstate=getattr(exc, "sqlstate", None)
            )
            return wrapped
        interface: BaseException = errors.InterfaceError(str(exc))
        return interface

    def get_autocommit(self, conn: Any) -> bool:
        return bool(conn.autocommit)

    def set_autocommit(self, conn: Any, on: bool) -> None:
        conn.autocommit = on

    def in_transaction(self, conn: Any) -> bool:
        return bool(conn.in_transaction)  # the flag comes with every reply: no round trip

    def describe(self, conn: Any) -> str:
        if is_c_extension(conn):
            kind = "C extension active"
        else:
            kind = "pure Python" + (
                "" if c_extension_loads() else "; the C extension does not load"
            )
        return f"{self.distribution} {self.version()}, {type(conn).__name__} ({kind})"


class PyMySQL(MySQLDriver):
    """PyMySQL: pure Python. Several statements in one query need the MULTI_STATEMENTS client
    flag, which xatm's own connections set; an Engine's connections may lack it, and then
    the statements go one by one."""

    name = "pymysql"
    distribution = "PyMySQL"
    module_name = "pymysql"
    extra = "pymysql"

    def connect(self, kwargs: dict[str, Any], backstop: float | None = None) -> Any:
        kwargs = dict(kwargs)
        kwargs["client_flag"] = int(kwargs.get("client_flag", 0)) | MULTI_STATEMENTS
        # PyMySQL's connect_timeout bounds the TCP connect, not the server's greeting, whose
        # read read_timeout bounds: the handshake gets the connect timeout as its read and
        # write timeouts, the connection the backstop once connected (PyMySQL reads them
        # at every read and write); a URL's own values are kept throughout
        unset = [k for k in ("read_timeout", "write_timeout") if kwargs.get(k) is None]
        for key in unset:
            kwargs[key] = kwargs.get("connect_timeout")
        conn = self.module.connect(**kwargs)
        for key in unset:
            setattr(conn, f"_{key}", backstop)
        return conn

    def socket_of(self, conn: Any) -> int | None:
        return _fileno(getattr(conn, "_sock", None))

    def is_open(self, conn: Any) -> bool:
        return bool(conn.open)

    def in_transaction(self, conn: Any) -> bool:
        status = importlib.import_module("pymysql.constants.SERVER_STATUS")
        return bool(conn.server_status & status.SERVER_STATUS_IN_TRANS)


class MySQLdb(MySQLDriver):
    """mysqlclient (``MySQLdb``), a C extension over libmariadb/libmysqlclient. Its
    connections allow several statements per query unless made with
    ``multi_statements=False`` (then they go one by one)."""

    name = "mysqldb"
    distribution = "mysqlclient"
    module_name = "MySQLdb"
    extra = "mysqlclient"

    def connect(self, kwargs: dict[str, Any], backstop: float | None = None) -> Any:
        # the client library's read and write timeouts, in whole seconds (its connect
        # timeout bounds the handshake already)
        if backstop is not None:
            seconds = math.ceil(backstop)
            kwargs = {"read_timeout": seconds, "write_timeout": seconds, **kwargs}
        return self.module.connect(**kwargs)

    def socket_of(self, conn: Any) -> int | None:
        """mysqlclient's ``fileno()`` raises if another thread is in a call on ``conn``
        (its ``open`` flag can be read any time): ``xatm.core.deadline`` asks when it arms."""
        if not getattr(conn, "open", False):
            return None
        fd = conn.fileno()
        return fd if isinstance(fd, int) and fd >= 0 else None

    def ping(self, conn: Any) -> None:
        conn.ping()


DRIVERS: dict[str, MySQLDriver] = {d.name: d for d in (MySQLConnector(), PyMySQL(), MySQLdb())}


def by_name(name: str | None) -> MySQLDriver:
    """The driver a URL scheme names (None: the default, mysql-connector)."""
    return DRIVERS[name or DEFAULT]


def for_connection(conn: Any) -> MySQLDriver:
    """The driver a connection object belongs to (by its class's module)."""
    module = type(conn).__module__
    if module.startswith("pymysql"):
        return DRIVERS["pymysql"]
    if module.startswith("MySQLdb"):
        return DRIVERS["mysqldb"]
    return DRIVERS["mysqlconnector"]


@functools.cache
def _buffered_cursor_class() -> Any:
    """mysql-connector's buffered cursor class of the pure-Python connection (looked up
    once: this runs for every application statement)."""
    return importlib.import_module("mysql.connector.cursor").MySQLCursorBuffered


def _fileno(sock: Any) -> int | None:
    """A Python socket's descriptor (None for no socket, or a closed one)."""
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except OSError:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _cext_socket(conn: Any) -> int | None:
    """The socket of a C-extension connection (``CMySQLConnection``).

    The extension does not show its descriptor, but its connection object (``_cmysql``)
    holds libmysqlclient's ``MYSQL`` struct right after the object's header
    (mysql-connector's ``src/include/mysql_capi.h``), and that struct begins with ``NET``,
    whose sixth member, after five pointers, is the socket (``my_socket fd``). The number
    read there is used only if it is a socket connected to this connection's server (its
    port, or its unix socket path); otherwise None: the call then waits for the driver."""
    handle = getattr(conn, "_cmysql", None)
    if handle is None:
        return None
    cached = getattr(conn, _CEXT_SOCKET, None)
    if cached is not None and cached[0] is handle:  # found once per connection
        return cached[1] if handle.connected() else None
    try:
        if not handle.connected():
            return None
        offset = object.__basicsize__ + 5 * ctypes.sizeof(ctypes.c_void_p)
        fd = ctypes.c_int.from_address(id(handle) + offset).value
        if fd < 0 or not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except (OSError, ValueError, AttributeError):
        return None
    unix = getattr(conn, "unix_socket", None)
    if isinstance(peer, str):
        ours = bool(unix) and os.path.realpath(peer) == os.path.realpath(str(unix))
    else:
        ours = isinstance(peer, tuple) and len(peer) >= 2
        ours = ours and peer[1] == getattr(conn, "server_port", None)
    if not ours:
        return None
    with contextlib.suppress(AttributeError):
        setattr(conn, _CEXT_SOCKET, (handle, fd))
    return fd


#: where a C-extension connection keeps its socket once found (with the handle it is of)
_CEXT_SOCKET = "_xatm_socket"


def _cext_error() -> type[BaseException] | None:
    """The C extension's own error class, if the extension loads."""
    try:
        module = importlib.import_module("_mysql_connector")
    except ImportError:
        return None
    error: type[BaseException] = module.MySQLInterfaceError
    return error


def is_c_extension(conn: Any) -> bool:
    """Is ``conn`` a mysql-connector C-extension connection (``CMySQLConnection``)?"""
    module = sys.modules.get("mysql.connector.connection_cext")  # imported if it loads
    return module is not None and isinstance(conn, module.CMySQLConnection)


def c_extension_loads() -> bool:
    """Does mysql-connector's C extension load here (its connections are then the default)?"""
    try:
        module = importlib.import_module("mysql.connector")
    except ImportError:
        return False
    return bool(getattr(module, "HAVE_CEXT", False))


def sa_cursor_kwargs(conn: Any) -> dict[str, Any]:
    """Cursor arguments SQLAlchemy's own connections of this driver use (buffered rows for
    mysql-connector; the other drivers buffer by default)."""
    return {"buffered": True} if type(conn).__module__.startswith("mysql.connector") else {}
