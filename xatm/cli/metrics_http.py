"""The HTTP endpoint of ``xatm sweep --metrics-port``: ``/metrics``, ``/livez``, ``/readyz``.

``/metrics`` is the Prometheus text format of prometheus_client's default registry (where
``xatm.prometheus`` puts xatm's collector). ``/livez`` (also ``/healthz``) is the liveness of
the daemon, ``/readyz`` its readiness, both from :func:`liveness` and :func:`readiness`: 200
or 503 with a small JSON object. Served on a daemon thread; :meth:`MetricsServer.close`
stops it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from xatm import TransactionManager, XatmError
from xatm.admin import SweeperStatus

#: ``standby``: waiting for another live process to give up this node (its log lock);
#: ``starting``: opening the manager; ``running``: sweeping; ``stopping``: after SIGTERM
Phase = Literal["standby", "starting", "running", "stopping"]


@dataclass
class Lifecycle:
    """The state of an ``xatm sweep`` process, as its probes report it."""

    node: str
    stuck_after: float | None = None  # None: the sweeper's own bound, once it runs
    phase: Phase = "starting"
    since: float = field(default_factory=time.time)  # when the phase began
    tm: TransactionManager | None = None

    def enter(self, phase: Phase, tm: TransactionManager | None = None) -> None:
        if tm is not None:
            self.tm = tm
            if self.stuck_after is None:
                self.stuck_after = tm.sweeper.stuck_after
        if phase != self.phase:
            self.phase, self.since = phase, time.time()

    def status(self) -> SweeperStatus | None:
        """The sweeper's status, once the daemon runs one."""
        return None if self.tm is None else self.tm.sweeper.status()


#: the bound of opening the manager before the sweeper's own is known
START_BOUND = 60.0


def liveness(
    life: Lifecycle, status: SweeperStatus | None, now: float
) -> tuple[bool, dict[str, Any]]:
    """(alive, details): alive unless the sweeper thread is gone, a pass has been in flight
    for longer than its bound (a server that stopped answering holds it), no pass began
    for an interval plus that bound, opening the manager takes that long, or it stops."""
    phase = life.phase
    bound = life.stuck_after if life.stuck_after is not None else START_BOUND
    details: dict[str, Any] = {"node": life.node, "phase": phase, "stuck_after": bound}
    if phase == "standby":
        return True, {**details, "status": "standby"}
    if phase == "stopping":
        return False, {**details, "status": "stopping"}
    if phase == "starting" or status is None:
        late = now - life.since > bound
        return not late, {**details, "status": "stuck" if late else "starting"}
    report = status.last_report
    details.update(
        passes=status.passes,
        failed_passes=status.failed_passes,
        seconds_since_last_pass=None
        if status.last_pass_at is None
        else round(now - status.last_pass_at, 3),
        pass_in_flight_seconds=None
        if status.pass_started_at is None
        else round(now - status.pass_started_at, 3),
        in_doubt_branches=None if report is None else report.in_doubt,
        unreachable=[] if report is None else list(report.unreachable),
    )
    if not status.running:
        return False, {**details, "status": "stopped"}
    if status.pass_started_at is not None:
        if now - status.pass_started_at > bound:
            return False, {**details, "status": "stuck"}
        return True, {**details, "status": "ok"}
    last = max(status.last_pass_at or life.since, life.since)
    if now - last > status.interval + bound:
        return False, {**details, "status": "stale"}
    return True, {**details, "status": "ok"}


def readiness(
    life: Lifecycle, status: SweeperStatus | None, now: float
) -> tuple[bool, dict[str, Any]]:
    """(ready, details): ready once a first pass is done, while the daemon is alive."""
    alive, details = liveness(life, status, now)
    if not alive or life.phase != "running" or status is None:
        return False, details
    if status.passes < 1:
        return False, {**details, "status": "no pass done yet"}
    return True, {**details, "status": "ready"}


def _prometheus() -> Any:
    try:
        import prometheus_client

        import xatm.prometheus
    except ImportError:
        raise XatmError(
            "--metrics-port needs prometheus_client: pip install 'xatm[prometheus]'"
        ) from None
    xatm.prometheus.autoinstall()
    return prometheus_client


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics``, ``/livez`` (``/healthz``) and ``/readyz`` for one daemon."""

    def __init__(self, life: Lifecycle, address: str, port: int) -> None:
        prometheus_client = _prometheus()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
                    self._send(200, prometheus_client.CONTENT_TYPE_LATEST, body)
                elif path in ("/livez", "/healthz", "/health", "/readyz"):
                    probe = readiness if path == "/readyz" else liveness
                    ok, details = probe(life, life.status(), time.time())
                    body = (json.dumps(details) + "\n").encode()
                    self._send(200 if ok else 503, "application/json", body)
                else:
                    self._send(
                        404, "text/plain; charset=utf-8", b"try /metrics, /livez or /readyz\n"
                    )

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no access log on stderr

        server_class = _Server6 if ":" in address else ThreadingHTTPServer
        try:
            self._server = server_class((address, port), Handler)
        except OSError as e:
            shown = f"[{address}]" if ":" in address else address
            raise XatmError(f"cannot serve metrics on {shown}:{port}: {e.strerror or e}") from None
        self._server.daemon_threads = True
        host, self.port = self._server.server_address[:2]
        self.address = host if isinstance(host, str) else bytes(host).decode()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="xatm-metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
