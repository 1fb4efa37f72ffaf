"""Private, throwaway PostgreSQL clusters and MariaDB servers for tests and demos.

Every server gets its own directory under a caller-chosen base directory
(``BASE/NAME/data`` and ``BASE/NAME/run``), listens only on 127.0.0.1 on a free
port, and runs as the ``postgres`` / ``mysql`` OS user when we are root (as the
current user otherwise). Servers can be stopped cleanly, SIGKILLed to simulate a
crash, and restarted (crash recovery runs; prepared transactions survive).
Processes are only ever signalled by the pid we started or recorded, never by name.

Each server has a role/user ``xatm`` (password ``xatm-secret``) and a database
``xatm`` owned by it. The base directory must be reachable (o+x on every parent)
by the server user: :func:`make_basedir` creates a suitable one.

Command line::

    python -m xatm.testing.servers up --dir DIR    # start (or reuse) pg1, pg2, maria
    python -m xatm.testing.servers down --dir DIR  # stop them and delete their data
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

USER = "xatm"
PASSWORD = "xatm-secret"
MARIADBD = Path("/usr/sbin/mariadbd")
MARIADB_INSTALL_DB = Path("/usr/bin/mariadb-install-db")
STATE_FILE = "servers.json"
ENV_URLS = {"pg1": "XATM_TEST_PG1_URL", "pg2": "XATM_TEST_PG2_URL", "maria": "XATM_TEST_MYSQL_URL"}


# --------------------------------------------------------------------------- helpers


def _is_root() -> bool:
    return os.geteuid() == 0


def _os_user(service: str) -> pwd.struct_passwd:
    """The OS account a server runs as: ``service`` when root, else ourselves."""
    return pwd.getpwnam(service) if _is_root() else pwd.getpwuid(os.getuid())


def _as_user(account: pwd.struct_passwd) -> dict[str, Any]:
    """subprocess keyword arguments running a child as ``account`` with a clean env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MYSQL", "MARIADB"))}
    env["HOME"] = account.pw_dir
    kwargs: dict[str, Any] = {"env": env}
    if _is_root() and account.pw_uid != 0:
        kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
    return kwargs


def _run(cmd: list[str], account: pwd.struct_passwd, cwd: Path) -> None:
    """Run ``cmd`` quietly; on failure raise with its output."""
    res = subprocess.run(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
        **_as_user(account),
    )
    if res.returncode != 0:
        out = res.stdout.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{out}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (our PID 1 may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _procs_in(datadir: Path) -> list[int]:
    """Live processes whose working directory is ``datadir`` (servers chdir there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(datadir):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _is_ours(pid: int | None, datadir: Path) -> bool:
    """True if ``pid`` is a live server process working in ``datadir`` (guards pid reuse)."""
    return pid is not None and _pid_alive(pid) and pid in _procs_in(datadir)


def _server_processes(pid: int | None, datadir: Path) -> list[int]:
    """A running server's processes, its main one first (for a test that stops them)."""
    if not _is_ours(pid, datadir):
        return []
    assert pid is not None
    return [pid, *sorted(p for p in _procs_in(datadir) if p != pid)]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never the same one twice in this process)."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def make_basedir(prefix: str = "xatm-servers-") -> Path:
    """A fresh temp directory that the server users can reach (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _make_dirs(basedir: Path, name: str, account: pwd.struct_passwd) -> tuple[Path, Path]:
    """Create ``BASE/NAME/{data,run}`` owned by ``account``; return (datadir, rundir)."""
    basedir = basedir.resolve()
    basedir.mkdir(parents=True, exist_ok=True)
    try:
        _run(["test", "-x", str(basedir)], account, Path("/"))
    except RuntimeError:
        raise PermissionError(
            f"{basedir} is not reachable by OS user {account.pw_name}: it and every "
            "parent directory need o+x (use make_basedir())"
        ) from None
    home = basedir / name
    datadir, rundir = home / "data", home / "run"
    if datadir.exists():
        raise FileExistsError(f"{datadir} already exists: destroy() that server first")
    home.mkdir(exist_ok=True)
    home.chmod(0o755)
    for path, mode in ((datadir, 0o700), (rundir, 0o755)):
        path.mkdir(exist_ok=True)
        os.chown(path, account.pw_uid, account.pw_gid)
        path.chmod(mode)
    return datadir, rundir


def _remove_dirs(datadir: Path, rundir: Path) -> None:
    for path in (datadir, rundir):
        shutil.rmtree(path, ignore_errors=True)
    for home in {datadir.parent, rundir.parent}:
        with contextlib.suppress(OSError):
            home.rmdir()


def _state(obj: object) -> dict[str, Any]:
    """Public dataclass fields as JSON-able values."""
    out = {}
    for f in fields(obj):  # type: ignore[arg-type]
        if not f.name.startswith("_"):
            value = getattr(obj, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def _pg_bindir() -> Path:
    dirs = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "postgres").exists()]
    if not dirs:
        raise FileNotFoundError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    return max(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster; ``rundir`` holds its socket and log file."""

    name: str
    port: int
    datadir: Path
    rundir: Path
    max_prepared_transactions: int = 64
    fsync: bool = False
    pid: int | None = None
    max_connections: int = 200
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def logfile(self) -> Path:
        return self.rundir / "postgres.log"

    @property
    def running(self) -> bool:
        return _is_ours(self.pid, self.datadir)

    def url(self, database: str = "xatm") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        """Superuser conninfo over the unix socket (trust auth)."""
        host = str(self.rundir)
        return make_conninfo(host=host, port=self.port, user="postgres", dbname=database)

    def init(self) -> None:
        """initdb the (empty) data directory and write our settings."""
        account = _os_user("postgres")
        cmd = [str(_pg_bindir() / "initdb"), "-D", str(self.datadir), "-U", "postgres"]
        cmd += ["--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]
        _run([*cmd, *([] if self.fsync else ["--no-sync"])], account, self.rundir)
        rundir = str(self.rundir).replace("'", "''")
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{rundir}'",
            "max_prepared_transactions": str(self.max_prepared_transactions),
            "max_connections": str(self.max_connections),
            "shared_buffers": "64MB",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on",
            "log_line_prefix": "'%m [%p] '",
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# xatm.testing.servers\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (as our child, so we can reap it) and wait until ready."""
        if self.running:
            return
        self._drop_stale_locks()
        account = _os_user("postgres")
        with self.logfile.open("ab") as log:
            os.chown(self.logfile, account.pw_uid, account.pw_gid)
            self._proc = subprocess.Popen(
                [str(_pg_bindir() / "postgres"), "-D", str(self.datadir)],
                cwd=self.rundir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_as_user(account),
            )
        self.pid = self._proc.pid
        try:
            _wait(self._ready, timeout, f"PostgreSQL {self.name} to accept connections")
        except (TimeoutError, RuntimeError) as exc:
            self._proc.kill()
            self._proc.wait()
            self._proc = self.pid = None
            raise RuntimeError(f"{exc}; log tail:\n{_tail(self.logfile)}") from None

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self._proc.returncode}")
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.pid) and lines[7].strip() == "ready"

    def _drop_stale_locks(self) -> None:
        """Remove lock files naming a zombie postmaster: postgres would think it alive.

        Our PID 1 does not always reap orphans, so a SIGKILLed postmaster that was
        not our child (reattached via servers.json) can linger as a zombie.
        """
        if _procs_in(self.datadir):
            return
        for lock in (self.datadir / "postmaster.pid", self.rundir / f".s.PGSQL.{self.port}.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if Path(f"/proc/{pid}").exists() and not _pid_alive(pid):
                lock.unlink()

    def _wait_gone(self, timeout: float) -> None:
        if self._proc is not None:
            self._proc.wait(timeout)
            self._proc = None
        _wait(
            lambda: not _procs_in(self.datadir) and not _port_open(self.port),
            timeout,
            f"PostgreSQL {self.name} processes to exit",
        )
        self.pid = None

    def stop(self) -> None:
        """Fast shutdown (SIGINT, as ``pg_ctl stop -m fast``) and wait for it."""
        if self.running:
            assert self.pid is not None
            os.kill(self.pid, signal.SIGINT)
            self._wait_gone(60)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the postmaster only; wait until its children are gone and the port free."""
        if self.running:
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(30)
        self.pid = None

    def restart(self) -> None:
        """Start again (after kill(): crash recovery runs); stops first if running."""
        self.stop()
        self.start()

    def processes(self) -> list[int]:
        """Every process of the cluster: the postmaster first, then its children."""
        return _server_processes(self.pid, self.datadir)

    def create_database(self, name: str) -> None:
        """Create database ``name`` owned by role xatm, unless it exists."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(USER)
                )
            )

    def bootstrap(self) -> None:
        """Create the login role xatm (CREATEDB, not superuser) and database xatm."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (USER,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                        sql.Identifier(USER), sql.Literal(PASSWORD)
                    )
                )
        self.create_database(USER)

    def destroy(self) -> None:
        """Stop (or kill) if running and delete its directories."""
        try:
            self.stop()
        except (OSError, TimeoutError, subprocess.TimeoutExpired):
            self.kill()
        _remove_dirs(self.datadir, self.rundir)


def start_postgres(
    basedir: Path,
    name: str = "pg1",
    *,
    max_prepared_transactions: int = 64,
    fsync: bool = False,
    max_connections: int = 200,
) -> PostgresServer:
    """initdb and start a private cluster under ``basedir/name`` (a small
    ``max_connections`` lets a test reach "too many clients" quickly)."""
    datadir, rundir = _make_dirs(basedir, name, _os_user("postgres"))
    server = PostgresServer(
        name,
        free_port(),
        datadir,
        rundir,
        max_prepared_transactions,
        fsync,
        max_connections=max_connections,
    )
    try:
        server.init()
        server.start()
        server.bootstrap()
    except BaseException:
        server.destroy()
        raise
    return server


# --------------------------------------------------------------------------- MariaDB


@dataclass
class MariaDBServer:
    """A private MariaDB server; ``rundir`` holds its socket, pid file and error log."""

    name: str
    port: int
    datadir: Path
    rundir: Path
    durable: bool = True
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def socket(self) -> Path:
        return self.rundir / "mysqld.sock"

    @property
    def error_log(self) -> Path:
        return self.rundir / "error.log"

    @property
    def running(self) -> bool:
        return _is_ours(self.pid, self.datadir)

    def url(self, database: str = "xatm") -> str:
        return f"mysql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def admin_params(self) -> dict[str, Any]:
        """mysql.connector.connect() arguments for the socket-authenticated superuser."""
        user = "root" if _is_root() else _os_user("mysql").pw_name
        return {"unix_socket": str(self.socket), "user": user, "use_pure": True}

    def _server_args(self) -> list[str]:
        return [
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=48M",
            # its own temp directory: servers bootstrapping at once in a shared /tmp (other
            # pid namespaces) otherwise collide on '#sql-temptable-<pid>-...' names
            f"--tmpdir={self.rundir}",
        ]

    def init(self) -> None:
        """mariadb-install-db into the (empty) data directory."""
        account = _os_user("mysql")
        cmd = [str(MARIADB_INSTALL_DB), *self._server_args(), "--skip-test-db"]
        cmd += ["--auth-root-authentication-method=socket"]
        if _is_root():
            cmd.append(f"--user={account.pw_name}")  # install-db drops privileges itself
        else:
            cmd.append(f"--auth-root-socket-user={account.pw_name}")
        _run(cmd, pwd.getpwuid(os.getuid()), self.rundir)  # as ourselves

    def start(self, timeout: float = 60.0) -> None:
        """Launch mariadbd (as our child) and wait until its socket accepts the superuser."""
        if self.running:
            return
        cmd = [str(MARIADBD), *self._server_args()]
        cmd += [
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.rundir / 'mariadbd.pid'}",
            f"--log-error={self.error_log}",
            "--max-connections=300",
            f"--innodb-flush-log-at-trx-commit={1 if self.durable else 2}",
            "--skip-log-bin",
            "--character-set-server=utf8mb4",
        ]
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.rundir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **_as_user(_os_user("mysql")),
        )
        self.pid = self._proc.pid
        try:
            _wait(self._ready, timeout, f"MariaDB {self.name} to accept connections")
        except (TimeoutError, RuntimeError) as exc:
            self._proc.kill()
            self._proc.wait()
            self._proc = self.pid = None
            raise RuntimeError(f"{exc}; error.log tail:\n{_tail(self.error_log)}") from None

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self._proc.returncode}")
        if not self.socket.exists():
            return False
        try:
            mysql.connector.connect(connection_timeout=2, **self.admin_params()).close()
        except mysql.connector.Error:
            return False
        return True

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        if self.running:
            assert self.pid is not None
            pid = self.pid
            os.kill(pid, sig)
            if self._proc is not None:
                self._proc.wait(timeout)
            else:
                _wait(lambda: not _pid_alive(pid), timeout, f"mariadbd {pid} to exit")
            _wait(lambda: not _port_open(self.port), timeout, f"port {self.port} to close")
        self._proc = None
        self.pid = None

    def stop(self) -> None:
        """Clean shutdown (SIGTERM) and wait for it."""
        self._signal_and_wait(signal.SIGTERM, 60)

    def kill(self) -> None:
        """SIGKILL mariadbd and wait until it is gone and the port is free."""
        self._signal_and_wait(signal.SIGKILL, 30)

    def restart(self) -> None:
        """Start again (after kill(): InnoDB crash recovery runs); stops first if running."""
        self.stop()
        self.start()

    def processes(self) -> list[int]:
        """The server's processes (mariadbd: one, with its threads)."""
        return _server_processes(self.pid, self.datadir)

    def _admin(self, *statements: str) -> None:
        conn = mysql.connector.connect(autocommit=True, **self.admin_params())
        try:
            cur = conn.cursor()
            for stmt in statements:
                cur.execute(stmt)
        finally:
            conn.close()

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        self._admin("CREATE DATABASE IF NOT EXISTS `{}`".format(name.replace("`", "``")))

    def bootstrap(self) -> None:
        """Create users xatm@127.0.0.1 / xatm@localhost with all privileges, database xatm."""
        stmts = []
        for host in ("127.0.0.1", "localhost"):
            stmts.append(f"CREATE USER IF NOT EXISTS '{USER}'@'{host}' IDENTIFIED BY '{PASSWORD}'")
            stmts.append(f"GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'{host}'")
        self._admin(*stmts)
        self.create_database(USER)

    def destroy(self) -> None:
        """Stop (or kill) if running and delete its directories."""
        try:
            self.stop()
        except (OSError, TimeoutError, subprocess.TimeoutExpired):
            self.kill()
        _remove_dirs(self.datadir, self.rundir)


def start_mariadb(basedir: Path, name: str = "maria", *, durable: bool = True) -> MariaDBServer:
    """Install and start a private MariaDB server under ``basedir/name``."""
    datadir, rundir = _make_dirs(basedir, name, _os_user("mysql"))
    server = MariaDBServer(name, free_port(), datadir, rundir, durable)
    try:
        server.init()
        server.start()
        server.bootstrap()
    except BaseException:
        server.destroy()
        raise
    return server


# --------------------------------------------------------------------------- sets


@dataclass
class ServerSet:
    """pg1 and pg2 (2PC enabled) plus a MariaDB server, recorded in BASE/servers.json."""

    pg1: PostgresServer
    pg2: PostgresServer
    maria: MariaDBServer
    basedir: Path

    def urls(self) -> dict[str, str]:
        return {"pg1": self.pg1.url(), "pg2": self.pg2.url(), "maria": self.maria.url()}

    @property
    def alive(self) -> bool:
        servers = (self.pg1, self.pg2, self.maria)
        return all(s.running and _port_open(s.port) for s in servers)

    def save(self) -> Path:
        path = self.basedir / STATE_FILE
        state = {
            "pg1": _state(self.pg1),
            "pg2": _state(self.pg2),
            "maria": _state(self.maria),
            "urls": self.urls(),
        }
        path.write_text(json.dumps(state, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, basedir: Path) -> ServerSet:
        state = json.loads((basedir / STATE_FILE).read_text())

        def paths(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "datadir": Path(d["datadir"]), "rundir": Path(d["rundir"])}

        return cls(
            PostgresServer(**paths(state["pg1"])),
            PostgresServer(**paths(state["pg2"])),
            MariaDBServer(**paths(state["maria"])),
            basedir,
        )

    def destroy(self) -> None:
        """Stop every server, delete their data and the state file."""
        errors = []
        for server in (self.pg1, self.pg2, self.maria):
            try:
                server.destroy()
            except Exception as exc:
                errors.append(exc)
        (self.basedir / STATE_FILE).unlink(missing_ok=True)
        if errors:
            raise errors[0]


def start_all(basedir: Path) -> ServerSet:
    """Start pg1, pg2 (max_prepared_transactions=64) and maria in parallel."""
    basedir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(3) as pool:
        pg1 = pool.submit(start_postgres, basedir, "pg1")
        pg2 = pool.submit(start_postgres, basedir, "pg2")
        maria = pool.submit(start_mariadb, basedir, "maria")
    errors = [e for f in (pg1, pg2, maria) if (e := f.exception()) is not None]
    if errors:
        for f in (pg1, pg2, maria):
            if f.exception() is None:
                f.result().destroy()
        raise errors[0]
    servers = ServerSet(pg1.result(), pg2.result(), maria.result(), basedir.resolve())
    servers.save()
    return servers


def load_or_start(basedir: Path) -> ServerSet:
    """Reattach to the servers recorded in BASE/servers.json if all are alive, else start."""
    if (basedir / STATE_FILE).exists():
        try:
            servers = ServerSet.load(basedir.resolve())
        except (OSError, ValueError, KeyError, TypeError):
            servers = None
        if servers is not None:
            if servers.alive:
                return servers
            servers.destroy()  # stale or half-dead: clear it out and start afresh
    return start_all(basedir)


def external_urls() -> dict[str, str] | None:
    """URLs from XATM_TEST_PG1_URL / XATM_TEST_PG2_URL / XATM_TEST_MYSQL_URL, if all set."""
    urls = {key: os.environ.get(var, "") for key, var in ENV_URLS.items()}
    return urls if all(urls.values()) else None


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xatm.testing.servers", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".xatm-dev"), help="base directory")
    args = parser.parse_args(argv)
    basedir: Path = args.dir
    if args.command == "up":
        started = time.monotonic()
        servers = load_or_start(basedir)
        print(f"# {basedir / STATE_FILE} ({time.monotonic() - started:.1f}s)")
        for key, url in servers.urls().items():
            print(f"{key}\t{url}")
    elif (basedir / STATE_FILE).exists():
        ServerSet.load(basedir.resolve()).destroy()
        print(f"stopped servers under {basedir}")
    else:
        print(f"nothing recorded in {basedir / STATE_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
