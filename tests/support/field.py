"""Helpers for the field tests (issue 8): a proxy that keeps a dead client's MariaDB session
alive, the real ``xatm`` command, the books of one transfer, and clean-up of what a test that
is expected to fail leaves prepared."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import ROOT, Bank, add_query, run
from xatm.admin import parse_url

XATM = ROOT / ".venv" / "bin" / "xatm"


class LingeringProxy:
    """A loopback TCP forwarder to one server that keeps each server-side connection open
    after its client is gone, until :meth:`release`.

    What the server sees is what it sees when the client's host crashes or is cut off by a
    partition: the client process is dead (its locks on the local disk are released), but
    its sessions stay open on the server until they time out. On MariaDB such a session
    still holds the XA branch it prepared: another session's XA COMMIT answers XAER_NOTA.
    """

    def __init__(self, url: str) -> None:
        spec = parse_url(url)
        self.target = (spec.host, spec.port)
        self.url_in = url
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = url.replace(f":{spec.port}/", f":{self.port}/", 1)
        assert self.url != url
        self.upstreams: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            with self.lock:
                self.upstreams.append(up)
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                if not from_server:
                    break
                # the client is gone: keep reading the server's side so that it stays open
        if from_server:
            with contextlib.suppress(OSError):
                dst.close()
        else:
            with contextlib.suppress(OSError):
                src.close()  # the client's side only: the server's session lingers

    def session_ports(self) -> set[int]:
        """The local ports of the proxy's open connections to the server."""
        out = set()
        with self.lock:
            for up in self.upstreams:
                with contextlib.suppress(OSError):
                    out.add(int(up.getsockname()[1]))
        return out

    def release(self) -> None:
        """Close every connection to the server: the lingering sessions end."""
        with self.lock:
            ups, self.upstreams = self.upstreams, []
        for up in ups:
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                up.close()

    def close(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self.listener.close()


def lock_timeouts(urls: dict[str, str]) -> dict[str, str]:
    """The same URLs with short lock waits, so orphaned locks cost errors, not hangs."""
    out = {}
    for name, url in urls.items():
        if url.startswith("postgresql"):
            out[name] = add_query(url, "options=-c%20lock_timeout%3D2000")
        else:
            out[name] = add_query(url, "init_command=SET%20innodb_lock_wait_timeout%3D2")
    return out


def maria_sessions(bank: Bank, ports: set[int] | None = None) -> set[int]:
    """Ids of the test user's other MariaDB sessions (those from ``ports`` if given)."""
    rows = run(
        bank.conns["maria"],
        "SELECT id, host FROM information_schema.processlist"
        " WHERE user = 'xatm' AND id <> CONNECTION_ID()",
    )
    out = set()
    for ident, host in rows:
        port = str(host).rpartition(":")[2]
        if ports is None or (port.isdigit() and int(port) in ports):
            out.add(int(ident))
    return out


def wait_sessions_gone(bank: Bank, keep: set[int], timeout: float = 30.0) -> None:
    """Wait until the only other sessions of the test user on MariaDB are those of ``keep``
    (e.g. the pools of the managers a test holds): a dead process's session is gone."""
    deadline = time.monotonic() + timeout
    while maria_sessions(bank) - keep:
        assert time.monotonic() < deadline, "a dead process's MariaDB session lingers"
        time.sleep(0.05)


def books(bank: Bank, tid: str, resources: tuple[str, ...]) -> set[str]:
    """The resources whose journal has transfer ``tid``; fails on a split transfer."""
    journal = bank.journal_ids()
    present = {r for r in resources if tid in journal[r]}
    assert present in (set(), set(resources)), (
        f"SPLIT: transfer {tid} is committed on {sorted(present)} only, not on"
        f" {sorted(set(resources) - present)}"
    )
    return present


def roll_back_leftovers(bank: Bank, nodes: set[str], timeout: float = 30.0) -> None:
    """Roll back every prepared xatm branch of ``nodes`` (test clean-up, so that a test that
    failed on purpose leaves nothing to the next ones); waits out lingering sessions."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for name, xids in bank.xatm_prepared().items():
            for xid in xids:
                if xid.node_id not in nodes:
                    continue
                try:
                    if name.startswith("pg"):
                        run(bank.conns[name], f"ROLLBACK PREPARED '{xid.to_pg_gid()}'")
                    else:
                        run(bank.conns[name], f"XA ROLLBACK {xid.to_mysql()}")
                except Exception as e:
                    left.append((name, xid.gtrid, str(e)))
        if not left or time.monotonic() > deadline:
            assert not left, left
            return
        time.sleep(0.1)


def delete_marker_rows(bank: Bank, nodes: set[str]) -> None:
    """Delete the commit-marker rows (decisions and fences) of ``nodes``, where the table is."""
    for conn in bank.conns.values():
        for node in nodes:
            with contextlib.suppress(Exception):
                run(conn, "DELETE FROM xatm_decisions WHERE gtrid LIKE %s", (f"xatm.{node}.%",))


def marker_config(path: Path, urls: dict[str, str], log: Path, node_id: str, marker: str) -> Path:
    """A TOML config for the CLI with ``commit_marker = true`` on resource ``marker``."""
    lines = [f'node_id = "{node_id}"', f'log = "{log}"', "timeout = 30"]
    for name, url in urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
        if name == marker:
            lines.append("commit_marker = true")
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``xatm`` command as a real subprocess."""
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config), "XATM_ACTOR": "cli:field"}
    proc = subprocess.run(
        [str(XATM), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def attempt(fn: Any) -> tuple[Any, BaseException | None]:
    """(result, None) or (None, the exception): lets a test check the books before it
    asserts how a call should have ended."""
    try:
        return fn(), None
    except Exception as e:
        return None, e


def transfer_books(bank: Bank, intents: Path, acks: Path) -> dict[str, Any]:
    """Check the transfers of chaos-style workers (``tests.workers.worker chaos``): each intended
    transfer on all of its resources or on none, every acknowledged one on all of them."""
    intended: dict[str, set[str]] = {}
    if intents.exists():
        for line in intents.read_text().splitlines():
            tid, resources = line.split()
            intended[tid] = set(resources.split(","))
    acked = set(acks.read_text().split()) if acks.exists() else set()
    journal = bank.journal_ids()
    split, committed = [], 0
    for tid, resources in sorted(intended.items()):
        present = {r for r in resources if tid in journal[r]}
        if present and present != resources:
            split.append((tid, sorted(present), sorted(resources)))
        elif present:
            committed += 1
    lost = sorted(t for t in acked if not all(t in journal[r] for r in intended[t]))
    return {
        "attempted": len(intended),
        "committed": committed,
        "acked": len(acked),
        "split": split,
        "lost": lost,
        "balance_delta": bank.total() - bank.initial_total,
    }
