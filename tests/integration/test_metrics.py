"""Metrics and tracing: exact Prometheus counts, in-doubt gauges, spans, and ``xatm sweep
--metrics-port`` scraped over real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import xatm.otel
import xatm.prometheus
from tests.support import ROOT, Bank, MakeTM
from tests.support.recovery import crash, prepared_gtrids, wait_for, write_config
from xatm import TransactionManager, TransactionRolledBack
from xatm.admin import FORMAT_ID, Xid
from xatm.core import events as _events
from xatm.testing.servers import free_port

XATM = ROOT / ".venv" / "bin" / "xatm"


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def transfer(tm: TransactionManager, bank: Bank, account: int = 1, fail: bool = False) -> None:
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = %s", (account,))
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = %s", (account,))
        if fail:
            raise RuntimeError("the application changed its mind")


def test_exact_counts_after_commits_and_rollbacks(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="m-counts", sweeper=False)
    assert value("xatm_transactions_total", node="m-counts", outcome="committed") == 0
    for _ in range(5):
        transfer(tm, bank)
    with pytest.raises(RuntimeError):
        transfer(tm, bank, fail=True)
    with pytest.raises(TransactionRolledBack), tm.transaction() as tx:
        tx.execute("pg2", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
        tx.set_rollback_only()

    def count(outcome: str) -> float | None:
        return value("xatm_transactions_total", node="m-counts", outcome=outcome)

    assert (count("committed"), count("rolled_back")) == (5, 2)
    assert (count("in_doubt"), count("heuristic")) == (0, 0)
    assert value("xatm_transaction_duration_seconds_count", node="m-counts") == 7
    for phase, n in (("prepare", 5), ("decide", 5), ("commit", 5), ("rollback", 2)):
        assert (
            value("xatm_transaction_phase_duration_seconds_count", node="m-counts", phase=phase)
            == n
        )
    ops = "xatm_branch_operation_duration_seconds_count"
    assert value(ops, node="m-counts", resource="pg1", operation="prepare") == 5
    assert value(ops, node="m-counts", resource="maria", operation="commit") == 5
    assert value(ops, node="m-counts", resource="maria", operation="begin") == 7
    assert value(ops, node="m-counts", resource="pg2", operation="rollback") == 1
    assert value("xatm_log_fsyncs_total", node="m-counts") == 5  # one forced COMMIT each
    text = generate_latest(REGISTRY).decode()
    assert not re.search(r"xatm\.[\w-]+\.[0-9a-f]{27}", text)  # no gtrid in any label


def test_a_heuristic_commit_is_counted(
    bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    tm = make_tm(node_id="m-heur", sweeper=False)
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 2")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 2")
        gid = Xid(FORMAT_ID, tx.gtrid, "pg1").to_pg_gid()

        def rollback_by_hand() -> None:
            with psycopg.connect(bank.urls["pg1"], autocommit=True) as conn:
                conn.execute(f"ROLLBACK PREPARED '{gid}'")

        at_step["after_decision"] = rollback_by_hand
    assert value("xatm_transactions_total", node="m-heur", outcome="heuristic") == 1
    assert value("xatm_transactions_total", node="m-heur", outcome="committed") == 0
    assert value("xatm_heuristic_outcomes_total", node="m-heur") == 1


def test_in_doubt_shows_until_recovery_settles_it(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    crash(bank, log, "m-app", "after_decision", ("pg1", "maria"), "i1", account=1)
    crash(bank, log, "m-app", "after_prepare", ("pg1", "pg2", "maria"), "i2", account=2)
    bank.wait_for_dead_sessions()  # else MariaDB may refuse the rollback for a moment
    owner = make_tm(node_id="m-app", log=log, sweeper=False)  # alive again: holds its log
    rec = make_tm(node_id="m-rec", log=log, sweeper=False, timeout=0.001)
    report = rec.recover()
    assert report.in_doubt == 5 and report.committed == 0
    assert value("xatm_in_doubt_transactions", node="m-rec") == 2
    age = value("xatm_oldest_in_doubt_age_seconds", node="m-rec")
    assert age is not None and age > 0
    assert value("xatm_recovery_actions_total", node="m-rec", action="skip") == 5

    owner.close()  # its log can be taken over now
    report = rec.recover()
    assert (report.committed, report.rolled_back, report.in_doubt) == (2, 3, 0)
    assert all(not gtrids for gtrids in prepared_gtrids(bank).values())
    assert value("xatm_in_doubt_transactions", node="m-rec") == 0
    assert value("xatm_oldest_in_doubt_age_seconds", node="m-rec") == 0
    for action, n in (("commit", 2), ("rollback", 3), ("skip", 5), ("end", 1), ("error", 0)):
        assert value("xatm_recovery_actions_total", node="m-rec", action=action) == n, action
    assert value("xatm_recovery_passes_total", node="m-rec", result="ok") == 2
    assert value("xatm_recovery_unreachable_resources", node="m-rec") == 0
    assert value("xatm_recovery_last_pass_timestamp_seconds", node="m-rec") is not None


def test_managers_of_one_node_add_up_and_a_custom_registry_works(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    # one node_id, one live manager at a time (a second live one is refused): a restart
    a = make_tm(node_id="m-same", log=tmp_path / "a", sweeper=False)
    transfer(a, bank, account=3)
    a.close()
    b = make_tm(node_id="m-same", log=tmp_path / "b", sweeper=False)
    transfer(b, bank, account=4)
    transfer(b, bank, account=4)
    own = CollectorRegistry()
    xatm.prometheus.install(own)
    try:
        for registry in (REGISTRY, own):
            got = registry.get_sample_value(
                "xatm_transactions_total", {"node": "m-same", "outcome": "committed"}
            )
            assert got == 3
        assert own.get_sample_value("xatm_sweeper_running", {"node": "m-same"}) == 0
    finally:
        xatm.prometheus.uninstall(own)
    assert value("xatm_transactions_total", node="m-same", outcome="committed") == 3


def test_a_failing_subscriber_never_breaks_a_transaction(bank: Bank, make_tm: MakeTM) -> None:
    def broken(event: _events.Event) -> None:
        raise ValueError("exporter bug")

    tm = make_tm(node_id="m-broken", sweeper=False)
    unsubscribe = _events.subscribe(broken)
    try:
        transfer(tm, bank)
    finally:
        unsubscribe()
    assert value("xatm_transactions_total", node="m-broken", outcome="committed") == 1


def test_no_subscriber_records_nothing() -> None:
    xatm.prometheus.uninstall()
    try:
        assert not _events.listening()
        assert _events.timeline("n", "g") is _events.NULL_TIMELINE
    finally:
        xatm.prometheus.install()
    assert _events.listening()


# -- OpenTelemetry -------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    xatm.otel.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        xatm.otel.uninstrument()


def _children(all_spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s for s in all_spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


# mysql-connector's own OpenTelemetry support sends the trace context as query attributes,
# which MariaDB does not support: it warns, and goes on without them
@pytest.mark.filterwarnings("ignore:This version of the server does not support Query Attrib")
def test_spans_of_a_transaction_and_a_recovery_pass(
    bank: Bank, make_tm: MakeTM, spans: InMemorySpanExporter
) -> None:
    tm = make_tm(node_id="m-otel", sweeper=False)
    app_tracer = TracerProvider().get_tracer("app")
    with app_tracer.start_as_current_span("handler") as handler:
        transfer(tm, bank)
    tm.recover()
    finished = spans.get_finished_spans()
    [root] = [s for s in finished if s.name == "xatm.transaction"]
    assert root.parent is not None and root.parent.span_id == handler.get_span_context().span_id
    attrs = dict(root.attributes or {})
    assert attrs["xatm.outcome"] == "committed" and str(attrs["xatm.gtrid"]).startswith(
        "xatm.m-otel."
    )
    assert list(attrs["xatm.resources"]) == ["pg1", "maria"]  # type: ignore[arg-type]
    phases = {s.name: s for s in _children(finished, root)}
    assert {"xatm.prepare", "xatm.decide", "xatm.commit"} <= set(phases)
    begins = [s for s in _children(finished, root) if s.name == "xatm.branch.begin"]
    assert len(begins) == 2
    for phase, op in (
        ("xatm.prepare", "xatm.branch.prepare"),
        ("xatm.commit", "xatm.branch.commit"),
    ):
        ops = _children(finished, phases[phase])
        assert sorted(s.name for s in ops) == [op, op]
        systems = {}
        for s in ops:
            a = dict(s.attributes or {})
            systems[a["xatm.resource"]] = a["db.system.name"]
            assert a["server.address"] == "127.0.0.1" and isinstance(a["server.port"], int)
        assert systems == {"pg1": "postgresql", "maria": "mariadb"}
    assert root.start_time is not None and root.end_time is not None
    for s in finished:
        if s.name.startswith("xatm.branch."):
            assert s.start_time is not None and s.end_time is not None
            assert root.start_time <= s.start_time <= s.end_time <= root.end_time
    [rec] = [s for s in finished if s.name == "xatm.recovery"]
    assert dict(rec.attributes or {})["xatm.node"] == "m-otel"


# -- xatm sweep --metrics-port ---------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_sweep_serves_metrics_while_it_sweeps(bank: Bank, make_tm: MakeTM, tmp_path: Path) -> None:
    log = tmp_path / "log"
    config = write_config(tmp_path / "xatm.toml", bank.urls, log)
    config.write_text(config.read_text().replace("timeout = 30", "timeout = 0.5"))
    gtrid = crash(bank, log, "app", "after_prepare", ("pg1", "maria"), "w1")
    bank.wait_for_dead_sessions()
    owner = make_tm(node_id="app", log=log, sweeper=False)  # the application is alive again
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)}
    daemon = subprocess.Popen(
        [str(XATM), "sweep", "--interval", "0.1", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node = (("node", "app-sweep"),)
    try:

        def sample(name: str, **labels: str) -> float | None:
            try:
                got = scrape(port)
            except OSError:
                return None  # not listening yet
            return got.get((name, tuple(sorted({"node": "app-sweep", **labels}.items()))))

        wait_for(lambda: sample("xatm_in_doubt_transactions") == 1, what="the in-doubt gauge")
        got = scrape(port)
        assert got[("xatm_oldest_in_doubt_age_seconds", node)] > 0
        assert got[("xatm_sweeper_running", node)] == 1
        assert got[("xatm_recovery_last_pass_timestamp_seconds", node)] > 0
        assert prepared_gtrids(bank)["pg1"] == {gtrid}
        status, body = get(port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert get(port, "/nothing")[0] == 404

        owner.close()  # the owner is gone: the sweeper takes its log over and rolls back
        wait_for(lambda: sample("xatm_in_doubt_transactions") == 0, what="recovery")
        got = scrape(port)
        assert got[("xatm_recovery_actions_total", (("action", "rollback"), *node))] == 2
        assert got[("xatm_oldest_in_doubt_age_seconds", node)] == 0
        assert all(not v for v in prepared_gtrids(bank).values())
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err
    assert "Traceback" not in err


def test_sweep_metrics_port_in_use_is_a_clear_error(bank: Bank, tmp_path: Path) -> None:
    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(XATM), "--config", str(config), "sweep", "--metrics-port", str(port)],
            env={
                "PATH": "/usr/bin:/bin",
                **({"HOME": os.environ["HOME"]} if "HOME" in os.environ else {}),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr


_PROBE = """
import json, sys
from xatm import TransactionManager, events
LIBS = ("prometheus_client", "xatm.prometheus", "xatm.otel")
before = [m for m in LIBS if m in sys.modules]
tm = TransactionManager(json.loads(sys.argv[1]), sys.argv[2], "m-probe", sweeper=False)
after = [m for m in LIBS if m in sys.modules]
tm.close()
print(json.dumps({"before": before, "after": after, "listening": events.listening()}))
"""


@pytest.mark.parametrize("setting", ["", "0"])
def test_the_core_imports_no_exporter(bank: Bank, tmp_path: Path, setting: str) -> None:
    """``import xatm`` loads no exporter; a manager loads the Prometheus one only if
    prometheus_client is installed (it is, here) and XATM_PROMETHEUS is not 0. (The
    opentelemetry API may be loaded anyway: mysql-connector imports it when installed.)"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "XATM_PROMETHEUS": setting}
    python = str(ROOT / ".venv" / "bin" / "python")
    proc = subprocess.run(
        [python, "-c", _PROBE, json.dumps(bank.urls), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if setting == "0":
        assert got == {"before": [], "after": [], "listening": False}
    else:
        after = ["prometheus_client", "xatm.prometheus"]
        assert got == {"before": [], "after": after, "listening": True}


def test_every_counter_label_combination_starts_at_zero(bank: Bank, make_tm: MakeTM) -> None:
    """So that increase() and rate() see the first failure (a series born at 1 has none)."""
    tm = make_tm(node_id="m-zero", sweeper=False)
    n = "m-zero"
    assert value("xatm_recovery_passes_total", node=n, result="failed") == 0
    assert value("xatm_recovery_passes_total", node=n, result="ok") == 0
    for resource in tm.context.resources.names:
        for op in ("begin", "prepare", "commit", "commit_one_phase", "rollback"):
            labels = {"node": n, "resource": resource, "operation": op}
            assert value("xatm_branch_operation_errors_total", **labels) == 0, labels
        assert value("xatm_failovers_total", node=n, resource=resource) == 0
        for certainty in ("lost", "unknown"):
            assert (
                value(
                    "xatm_failover_lost_transactions_total",
                    node=n,
                    resource=resource,
                    certainty=certainty,
                )
                == 0
            )
    for phase in ("prepare", "decide", "commit", "rollback"):
        assert value("xatm_transaction_phase_duration_seconds_count", node=n, phase=phase) == 0
    assert value("xatm_log_up", node=n) == 1
    assert value("xatm_in_doubt_transactions", node=n) == 0
