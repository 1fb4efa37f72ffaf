"""A PostgreSQL primary with a streaming standby behind a switchable TCP proxy, for failover tests.

The clients (xatm's resource URL) connect to a loopback TCP proxy (:class:`TcpProxy`) that
forwards to the current primary, as a DNS name or HAProxy in front of Patroni would. The
standby streams WAL from the primary through a second proxy, which a test can pause
(:meth:`TcpProxy.pause`), so that the standby deterministically misses what the primary
writes from then on. :class:`PostgresPair`:

* the primary is a private cluster (``xatm.testing.servers.start_postgres``); the standby
  is made from it with the local ``pg_basebackup -R`` (same settings, so its
  ``max_prepared_transactions`` equals the primary's), on its own loopback port;
* ``synchronous=True`` sets ``synchronous_standby_names = '*'`` on the primary
  (``synchronous_commit`` stays ``on``): a commit or PREPARE is acknowledged only once the
  standby has flushed it; ``False`` is plain asynchronous streaming;
* :meth:`crash_primary` is ``pg_ctl stop -m immediate`` (no shutdown checkpoint, as a crash),
  :meth:`promote` is ``pg_ctl promote`` of the standby, then the client proxy is pointed at
  it (its old connections cut, as the old primary's are gone), :meth:`rebuild_standby` makes a
  new standby of the new primary (the old primary's data is discarded, as a real cluster
  manager would rewind or re-clone it).

Everything runs as the ``postgres`` OS user (when we are root) in directories under a base
directory from :func:`xatm.testing.servers.make_basedir`, on free loopback ports; only the
processes started here are ever signalled, by their pid.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from xatm.testing.servers import (
    PostgresServer,
    _make_dirs,
    _os_user,
    _pg_bindir,
    _run,
    _wait,
    free_port,
    start_postgres,
)

# ----------------------------------------------------------------------------- the proxy


class TcpProxy:
    """A loopback TCP forwarder to ``127.0.0.1:<target>``; the target can be switched.

    Each accepted connection gets its own upstream connection to the target of the moment.
    :meth:`pause` stops forwarding bytes (in both directions; what arrives meanwhile is held),
    :meth:`resume` forwards again, :meth:`cut` closes every open connection (bytes held are
    dropped), :meth:`switch` points new connections at another port (and cuts the old ones).
    A connection whose target refuses is closed at once: the client sees a lost server."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._generation = 0
        self._closed = False
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def switch(self, target: int, *, cut: bool = True) -> None:
        """Send new connections to ``target``; with ``cut``, close the open ones."""
        with self._lock:
            self.target = target
        if cut:
            self.cut()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every open connection (bytes held by a pause are dropped)."""
        with self._lock:
            self._generation += 1
            socks, self._open = self._open, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.resume()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                target, generation = self.target, self._generation
            try:
                up = socket.create_connection(("127.0.0.1", target), timeout=5)
                up.settimeout(None)
            except OSError:
                with contextlib.suppress(OSError):
                    down.close()
                continue
            with self._lock:
                if generation != self._generation:  # cut while connecting
                    up.close()
                    down.close()
                    continue
                self._open.update((down, up))
            threading.Thread(
                target=self._pipe, args=(down, up, generation), name="proxy-pipe", daemon=True
            ).start()

    def _pipe(self, a: socket.socket, b: socket.socket, generation: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=0.5):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst: socket.socket = key.data
                    data = src.recv(65536)
                    if not data:
                        return
                    while not self._flowing.wait(0.1):
                        if generation != self._generation or self._closed:
                            return  # cut while paused: what was held is dropped
                    if generation != self._generation:
                        return
                    dst.sendall(data)
                if generation != self._generation or self._closed:
                    return
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._open.discard(a)
                self._open.discard(b)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


# ----------------------------------------------------------------------------- the pair


class _Server(PostgresServer):
    """A cluster that may be a hot standby: ready when it accepts connections either way."""

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self._proc.returncode}")
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0] == str(self.pid)
            and lines[7].strip() in ("ready", "standby")
        )


def _admin(server: PostgresServer, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements as the superuser (unix socket); the last one's rows."""
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(server.admin_dsn(), autocommit=True, connect_timeout=10) as conn:
        for stmt in statements:
            cur = conn.execute(stmt.encode())
            rows = list(cur.fetchall()) if cur.description else []
    return rows


def _pg_ctl(server: PostgresServer, *args: str) -> None:
    _run(
        [str(_pg_bindir() / "pg_ctl"), *args, "-D", str(server.datadir)],
        _os_user("postgres"),
        server.rundir,
    )


@dataclass
class PostgresPair:
    """A primary and a streaming standby, the clients behind a switchable proxy."""

    basedir: Path
    name: str
    synchronous: bool
    primary: PostgresServer
    proxy: TcpProxy  # the clients' way in: the current primary
    replication: TcpProxy  # the standby's WAL stream from the primary
    standby: PostgresServer | None = None
    promotions: int = 0
    _generation: int = 0
    _retired: list[PostgresServer] = field(default_factory=list)

    def url(self, database: str = "xatm") -> str:
        """The clients' URL (through the proxy), as role xatm."""
        return self.primary.url(database).replace(f":{self.primary.port}/", f":{self.proxy.port}/")

    # -- making standbys ------------------------------------------------------------------
    def _new_name(self) -> str:
        self._generation += 1
        return f"{self.name}-{self._generation}"

    def make_standby(self, timeout: float = 60.0) -> PostgresServer:
        """``pg_basebackup -R`` of the current primary (streaming through the replication
        proxy), started as a hot standby; waits until it streams."""
        assert self.standby is None
        account = _os_user("postgres")
        name = self._new_name()
        datadir, rundir = _make_dirs(self.basedir, name, account)
        self.replication.switch(self.primary.port)
        conninfo = make_conninfo(
            host="127.0.0.1",
            port=self.replication.port,
            user="postgres",
            application_name=name,
        )
        cmd = [str(_pg_bindir() / "pg_basebackup"), "-D", str(datadir), "-R", "-X", "stream"]
        _run([*cmd, "-c", "fast", "-d", conninfo], account, rundir)
        port = free_port()
        sockdir = str(rundir).replace("'", "''")
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\n# standby {name}\nport = {port}\nunix_socket_directories = '{sockdir}'\n"
                "hot_standby = on\nwal_receiver_status_interval = 1s\n"
            )
        # the primary's own synchronous_standby_names (ALTER SYSTEM) came along: a standby
        # that is promoted starts with none until a standby of its own streams
        with (datadir / "postgresql.auto.conf").open("a") as conf:
            conf.write("synchronous_standby_names = ''\n")
        standby = _Server(
            name,
            port,
            datadir,
            rundir,
            self.primary.max_prepared_transactions,
            self.primary.fsync,
            max_connections=self.primary.max_connections,
        )
        standby.start(timeout)
        self.standby = standby
        _wait(self._streaming, timeout, f"standby {name} to stream")
        if self.synchronous:
            _admin(
                self.primary,
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "SELECT pg_reload_conf()",
            )
            _wait(self._sync, timeout, f"standby {name} to be synchronous")
        return standby

    def _streaming(self) -> bool:
        rows = _admin(
            self.primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        )
        return bool(rows and int(rows[0][0]) > 0)

    def _sync(self) -> bool:
        rows = _admin(
            self.primary, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        )
        return bool(rows and int(rows[0][0]) > 0)

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Wait until the standby has replayed everything the primary has written."""
        assert self.standby is not None
        target = str(_admin(self.primary, "SELECT pg_current_wal_lsn()")[0][0])

        def replayed() -> bool:
            assert self.standby is not None
            rows = _admin(self.standby, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
            return bool(rows and rows[0][0])

        _wait(replayed, timeout, "the standby to replay the primary's WAL")

    # -- failing over ---------------------------------------------------------------------
    def crash_primary(self) -> None:
        """``pg_ctl stop -m immediate``: the primary goes away without a checkpoint."""
        old = self.primary
        if old.running:
            _pg_ctl(old, "stop", "-m", "immediate", "-w", "-t", "60")
        with contextlib.suppress(Exception):
            old._wait_gone(30)
        old.pid = None
        self.proxy.cut()
        self.replication.cut()

    def promote(self) -> None:
        """Promote the standby and point the clients' proxy at it (as Patroni or a DNS
        switch would). The old primary must be down (:meth:`crash_primary`)."""
        assert self.standby is not None and not self.primary.running
        new = self.standby
        _pg_ctl(new, "promote", "-w", "-t", "60")
        _wait(lambda: not _admin(new, "SELECT pg_is_in_recovery()")[0][0], 60, "promotion")
        self._retired.append(self.primary)
        self.primary, self.standby = new, None
        self.promotions += 1
        self.proxy.switch(new.port)

    def rebuild_standby(self) -> PostgresServer:
        """Discard the old primaries' data and make a new standby of the current primary."""
        for old in self._retired:
            old.destroy()
        self._retired.clear()
        return self.make_standby()

    def fail_over(self) -> None:
        """Crash the primary, promote the standby, switch the clients to it."""
        self.crash_primary()
        self.promote()

    def timeline(self) -> int:
        """The current primary's timeline."""
        row = _admin(self.primary, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        return int(str(row[0][0]), 16)

    def destroy(self) -> None:
        self.proxy.close()
        self.replication.close()
        for server in [*self._retired, self.primary, *([self.standby] if self.standby else [])]:
            with contextlib.suppress(Exception):
                server.destroy()
        self._retired.clear()


def start_pair(
    basedir: Path, name: str = "pgha", *, synchronous: bool, max_prepared_transactions: int = 64
) -> PostgresPair:
    """A private primary with a streaming standby (synchronous or not), the clients' proxy in
    front. Destroy it with :meth:`PostgresPair.destroy`."""
    primary = start_postgres(
        basedir, f"{name}-0", max_prepared_transactions=max_prepared_transactions
    )
    proxy = replication = None
    try:
        with (primary.datadir / "pg_hba.conf").open("r+") as hba:
            rules = hba.read()
            hba.seek(0)
            hba.write("host replication postgres 127.0.0.1/32 trust\n" + rules)
        _admin(
            primary,
            "ALTER SYSTEM SET wal_keep_size = '256MB'",
            "ALTER SYSTEM SET wal_sender_timeout = '10s'",
            "SELECT pg_reload_conf()",
        )
        proxy, replication = TcpProxy(primary.port), TcpProxy(primary.port)
        pair = PostgresPair(basedir, name, synchronous, primary, proxy, replication)
        pair.make_standby()
        return pair
    except BaseException:
        for p in (proxy, replication):
            if p is not None:
                p.close()
        primary.destroy()
        raise
