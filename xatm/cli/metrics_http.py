"""The HTTP endpoint of ``xatm sweep --metrics-port``: ``/metrics`` and ``/healthz``.

``/metrics`` is the Prometheus text format of prometheus_client's default registry (where
``xatm.prometheus`` puts xatm's collector). ``/healthz`` answers 200 while the sweeper thread
runs and its last pass is recent (within three intervals plus a minute; before the first pass
the time since the start counts), else 503; the body is a small JSON object. Served on a
daemon thread; :meth:`MetricsServer.close` stops it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from xatm import TransactionManager, XatmError

#: a pass may take a while on many resources: stale only after this much more than 3 intervals
STALE_GRACE = 60.0


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


def health(tm: TransactionManager, started: float) -> tuple[bool, dict[str, Any]]:
    """(healthy, details) of ``tm``'s sweeper."""
    status = tm.sweeper.status()
    now = time.time()
    last = status.last_pass_at if status.last_pass_at is not None else started
    age = now - last
    fresh = age <= 3 * status.interval + STALE_GRACE
    ok = status.running and fresh
    report = status.last_report
    return ok, {
        "status": "ok" if ok else ("stopped" if not status.running else "stale"),
        "node": tm.node_id,
        "passes": status.passes,
        "failed_passes": status.failed_passes,
        "seconds_since_last_pass": None if status.last_pass_at is None else round(age, 3),
        "in_doubt_branches": None if report is None else report.in_doubt,
        "unreachable": [] if report is None else list(report.unreachable),
    }


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for one sweeping TransactionManager."""

    def __init__(self, tm: TransactionManager, address: str, port: int) -> None:
        prometheus_client = _prometheus()
        started = time.time()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
                    self._send(200, prometheus_client.CONTENT_TYPE_LATEST, body)
                elif path in ("/healthz", "/health"):
                    ok, details = health(tm, started)
                    body = (json.dumps(details) + "\n").encode()
                    self._send(200 if ok else 503, "application/json", body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n")

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
