"""The daemon's decisions without servers: its probes' verdicts from tables, the log line
formats, the extra fields on xatm's log records."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from xatm.admin import SweeperStatus
from xatm.cli import logs
from xatm.cli.metrics_http import START_BOUND, Lifecycle, Phase, liveness, readiness
from xatm.core.logfields import log_fields

NOW = 1_000_000.0


def _status(
    *,
    running: bool = True,
    passes: int = 1,
    last: float | None = NOW - 1,
    in_flight: float | None = None,
) -> SweeperStatus:
    return SweeperStatus(
        running=running,
        interval=10.0,
        passes=passes,
        failed_passes=0,
        last_pass_at=last,
        last_report=None,
        backoff=(),
        pass_started_at=None if in_flight is None else NOW - in_flight,
    )


def _life(phase: Phase, since: float = NOW - 100, stuck_after: float | None = 30.0) -> Lifecycle:
    return Lifecycle("app-sweep", stuck_after, phase, since)


RUNNING = _status()

PROBES = [
    # phase, since, status, alive, ready, status word
    ("standby", NOW - 1000, None, True, False, "standby"),
    ("starting", NOW - 5, None, True, False, "starting"),
    ("starting", NOW - 31, None, False, False, "stuck"),
    ("running", NOW - 100, RUNNING, True, True, "ready"),
    ("running", NOW - 1, _status(passes=0, last=None), True, False, "no pass done yet"),
    ("running", NOW - 100, _status(in_flight=29), True, True, "ready"),
    ("running", NOW - 100, _status(in_flight=31), False, False, "stuck"),
    ("running", NOW - 100, _status(last=NOW - 39), True, True, "ready"),
    ("running", NOW - 100, _status(last=NOW - 41), False, False, "stale"),
    ("running", NOW - 100, _status(passes=0, last=None), False, False, "stale"),
    ("running", NOW - 100, _status(running=False), False, False, "stopped"),
    ("stopping", NOW - 1, RUNNING, False, False, "stopping"),
]


@pytest.mark.parametrize(("phase", "since", "status", "alive", "ready", "word"), PROBES)
def test_probes(
    phase: Phase,
    since: float,
    status: SweeperStatus | None,
    alive: bool,
    ready: bool,
    word: str,
) -> None:
    life = _life(phase, since)
    live_ok, live = liveness(life, status, NOW)
    ready_ok, body = readiness(life, status, NOW)
    assert (live_ok, ready_ok) == (alive, ready)
    assert body["status"] == word
    assert live["node"] == "app-sweep" and live["phase"] == phase
    json.dumps(body)  # what the endpoint sends


def test_the_bound_before_the_sweeper_is_known() -> None:
    life = _life("starting", NOW - START_BOUND - 1, stuck_after=None)
    assert liveness(life, None, NOW) == (
        False,
        {"node": "app-sweep", "phase": "starting", "stuck_after": START_BOUND, "status": "stuck"},
    )


def _record(message: str, exc: bool = False, **extra: str) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing at postgresql://u:xatm-secret@h/db")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("xatm.recovery", logging.ERROR, "", 0, message, (), exc_info)
    record.__dict__.update(extra)
    return record


def test_json_lines() -> None:
    logs.set_node("app-sweep")
    try:
        line = logs.JsonFormatter().format(
            _record("first\nsecond", exc=True, **log_fields(gtrid="g1", resource="maria"))
        )
    finally:
        logs.set_node(None)
    assert "\n" not in line and "xatm-secret" not in line
    data = json.loads(line)
    assert data["node"] == "app-sweep" and data["gtrid"] == "g1" and data["resource"] == "maria"
    assert data["level"] == "ERROR" and data["logger"] == "xatm.recovery"
    assert data["exception"].startswith("ValueError: bad | thing at")
    assert "Traceback" in data["traceback"]
    plain = json.loads(logs.JsonFormatter().format(_record("x")))
    assert plain["node"] is None and plain["gtrid"] is None and "exception" not in plain


def test_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XATM_DEBUG", raising=False)
    line = logs.TextFormatter().format(_record("first\nsecond", exc=True))
    assert "\n" not in line and "xatm-secret" not in line
    assert line.endswith(
        "xatm: ERROR: first | second: ValueError: bad | thing at postgresql://u:***@h/db"
    )
    assert line[:4].isdigit() and line[23] == "Z"


def test_log_fields_keeps_what_is_known() -> None:
    assert log_fields("n", None, "r") == {"node": "n", "resource": "r"}
    assert log_fields() == {}
