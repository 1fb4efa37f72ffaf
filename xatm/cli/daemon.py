"""``xatm sweep``: the recovery daemon, its standby, its probes and its bounded stop.

* **Standby.** The daemon's node_id (``<node_id>-sweep``) can be held by one live process
  only. A second one started for the same node waits (``standby``: its liveness probe
  answers 200, its readiness 503), trying the node's log lock every ``--standby-poll``
  seconds, and takes over as soon as the first one is gone (killed, stopped, its host
  fenced): a supervisor restarting it, or a second replica, is never a crash loop.
* **Probes** (``--metrics-port``): ``/livez`` and ``/readyz`` (``xatm.cli.metrics_http``).
* **Stop.** SIGTERM or SIGINT stops the sweeper after the pass in flight and closes the
  manager; if that has not finished ``--grace`` seconds after the signal (a pass waiting on
  a server that stopped answering), the process exits at once with status 1, as a crash
  would: what the pass left undone is redone by the next one. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import click

from xatm import LogLocked, TransactionManager
from xatm.admin import NodeInUse, sweeper_settings
from xatm.cli import logs
from xatm.cli.metrics_http import Lifecycle, MetricsServer
from xatm.cli.session import Session, get

#: the exit status of a daemon whose stop did not complete within its grace period
EXIT_FORCED = 1


class _Stop:
    """The stop request: an event, and the deadline a stop must finish by."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.event = threading.Event()
        self.what = "starting"  # what the daemon is doing, for the message of a forced exit

    def signal(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            self._exit(f"second {signal.Signals(signum).name}: exiting now")
        self.event.set()
        threading.Thread(target=self._watch, name="xatm-sweep-grace", daemon=True).start()

    def _watch(self) -> None:
        time.sleep(self.grace)
        self._exit(
            f"the stop did not complete within the grace period of {self.grace:g} s"
            f" ({self.what}); exiting now: the next pass redoes what this one left"
        )

    @staticmethod
    def _exit(why: str) -> None:
        try:  # never blocks on a lock a stuck thread may hold: one write, then exit
            if logs.is_json():
                logs.notice(f"xatm sweep: {why}", logging.ERROR)
            else:
                os.write(2, f"xatm sweep: {why}\n".encode())
        finally:
            os._exit(EXIT_FORCED)


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=None,
    help="Seconds between passes (default: [sweeper] interval of the config, or 10).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /metrics (Prometheus), /livez (/healthz) and /readyz on this port while"
    " sweeping (0: any free port). Needs xatm[prometheus].",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind the metrics endpoint to (0.0.0.0 for every interface).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0.0),
    default=25.0,
    show_default=True,
    help="Seconds a stop (SIGTERM, SIGINT) may take; then the process exits at once, status 1.",
)
@click.option(
    "--stuck-after",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds after which a pass in flight is stuck: /livez answers 503 (default: two"
    " bounded steps, 2 x (max(timeout, 5) + the connect timeout of 5)).",
)
@click.option(
    "--standby/--no-standby",
    default=True,
    show_default=True,
    help="While another live process holds this node, wait and take over when it goes"
    " (--no-standby: exit 1 at once).",
)
@click.option(
    "--standby-poll",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between two tries of a standby to take the node over.",
)
@click.pass_context
def sweep(
    ctx: click.Context,
    interval: float | None,
    metrics_port: int | None,
    metrics_address: str,
    grace: float,
    stuck_after: float | None,
    standby: bool,
    standby_poll: float,
) -> None:
    """Run the sweeper in the foreground until SIGINT or SIGTERM.

    For deployments that run recovery apart from the applications. It resolves what dead
    coordinators left; each live application's own sweeper resolves its own transactions.
    A second daemon for the same node waits as a standby and takes over when the first one
    goes. With --metrics-port, Prometheus scrapes its metrics and a supervisor probes
    /livez and /readyz (docs/operations.md).
    """
    c = get(ctx)
    if interval is None:
        interval = sweeper_settings(c.settings.extra).interval
    logging.getLogger("xatm").setLevel(min(logging.INFO, logging.getLogger("xatm").level))
    node = c.own_node_id("sweep")
    logs.set_node(node)
    stop = _Stop(grace)
    life = Lifecycle(node, stuck_after)
    previous = {s: signal.signal(s, stop.signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        if metrics_port is not None:
            server = MetricsServer(life, metrics_address, metrics_port)
            logs.notice(
                f"xatm sweep: metrics on http://{_host(server.address)}:{server.port}/metrics"
            )
        tm = _open(c, life, stop, interval, standby, standby_poll)
        if tm is None:
            logs.notice("xatm sweep: stopped before taking the node over")
            return
        passes = _run(tm, life, stop, interval)
    finally:
        if server is not None:
            server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    logs.notice(f"xatm sweep: stopped after {passes} pass(es)")


def _open(
    c: Session, life: Lifecycle, stop: _Stop, interval: float, standby: bool, poll: float
) -> TransactionManager | None:
    """The daemon's manager, once this process holds the node (None: stopped before)."""
    waiting = False
    while not stop.event.is_set():
        if not waiting:  # a standby stays one (its probes say so) until it takes over
            life.enter("starting")
        stop.what = "opening the coordinator log and the resources"
        try:
            tm = c.manager(
                "sweep",
                sweeper=False,
                interval=interval,
                sagas="need",
                lock_timeout=min(poll, 5.0) if standby else 5.0,
                busy_raises=standby,
            )
        except (LogLocked, NodeInUse) as e:
            life.enter("standby")
            if not waiting:
                waiting = True
                logs.notice(
                    f"xatm sweep: standby: node {life.node} is held by another live process"
                    f" ({logs.one_line(str(e))}); taking over when it goes",
                    logging.WARNING,
                )
            stop.what = "in standby"
            stop.event.wait(poll)
            continue
        if waiting:
            logs.notice(f"xatm sweep: node {life.node} taken over: no longer standby")
        life.enter("running", tm)
        return tm
    return None


def _run(tm: TransactionManager, life: Lifecycle, stop: _Stop, interval: float) -> int:
    """Sweep until the stop; stop the sweeper and close the manager; the number of passes."""
    try:
        logs.notice(f"xatm sweep: node {tm.node_id}, every {interval:g} s; SIGINT/SIGTERM stops")
        tm.sweeper.start()
        tm.sweeper.wake()  # a first pass at once
        stop.what = "sweeping"
        while not stop.event.wait(0.5):  # a timed wait: the signal handler runs promptly
            pass
        life.enter("stopping")
        logs.notice("xatm sweep: stopping")
        stop.what = "waiting for the pass in flight"
        tm.sweeper.stop(timeout=None)  # bounded by the grace period
        return tm.sweeper.status().passes
    finally:
        stop.what = "closing the coordinator log and the connections"
        tm.close()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
