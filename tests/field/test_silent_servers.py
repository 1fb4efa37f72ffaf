"""Every wait has a bound (issue 17): a server that stops answering holds no caller past its
transaction's timeout plus the connect timeout, and recovery settles what it left once it
answers again.

A server is frozen (SIGSTOP: a MariaDB server, or every process of a PostgreSQL cluster)
while 8 threads (threaded API) and 8 tasks (asyncio API) move money between two of pg1, pg2
and maria at a time, with ``timeout=3``. Before the client-side deadline (``xatm.core.deadline``)
every call in flight on the frozen server waited for the whole freeze. Checked: no transfer
(the caller's whole ``with`` block) took longer than timeout + connect timeout + slack;
transfers that do not touch the frozen server went on meanwhile; once it is thawed,
recovery settles every branch left in doubt within seconds; the books balance (nothing
split, no acknowledged transfer lost, nothing left prepared); no connection is leaked.

``XATM_FREEZE_SECONDS`` / ``XATM_FREEZE_TIMEOUT`` (defaults 25 and 3) shorten the run for
the MySQL driver legs (tests/driver_legs.sh), which freeze MariaDB only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers
from tests.support.omission import BlackholeProxy, Load, frozen, settle
from tests.support.recovery import crash
from xatm.core.deadline import GRACE, step_bound

XATM = Path(sys.executable).parent / "xatm"  # the console script of the running venv

FREEZE = float(os.environ.get("XATM_FREEZE_SECONDS", "25"))
TIMEOUT = float(os.environ.get("XATM_FREEZE_TIMEOUT", "3"))
#: beyond timeout + connect timeout: the watchdog's scan, and a loaded 2-core machine
SLACK = 5.0
BOUND = TIMEOUT + GRACE + SLACK  # 13 s with the defaults
#: a liveness bound on settling after the thaw, not a measurement
SETTLE_BOUND = 60.0
RESOURCES = ("pg1", "pg2", "maria")
NODES = {"silent-t", "silent-a"}


def _left_from_before(bank: Bank, wall: float) -> list[str]:
    """Prepared branches of this test's nodes whose transaction began before ``wall``."""
    return [
        f"{name}:{x.gtrid}"
        for name, xids in bank.xatm_prepared().items()
        for x in xids
        if x.node_id in NODES and x.created_at < wall
    ]


@pytest.mark.parametrize("silent", ["maria", "pg1"])
def test_a_frozen_server_holds_no_caller_past_the_bound(
    silent: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    assert FREEZE > BOUND, "the freeze must outlast the bound, or it proves nothing"
    bank.create(accounts=16, balance=1000)
    load = Load(bank, RESOURCES, tmp_path / "log", TIMEOUT)
    stop = threading.Event()

    def sweep() -> None:  # each manager's recovery, every second (a sweeper, no backoff)
        while not stop.wait(1.0):
            for tm in load.managers():
                with contextlib.suppress(Exception):  # a frozen server: the next one retries
                    tm.recover()

    sweeper = threading.Thread(target=sweep, daemon=True)
    server = getattr(servers.set, silent)
    try:
        load.start()
        sweeper.start()
        time.sleep(3.0)
        frozen_at = time.monotonic()
        with frozen(server, FREEZE + 30):
            time.sleep(FREEZE)
        thawed_at, thawed_wall = time.monotonic(), time.time()
        # recovery settles what the freeze left, while the transfers go on
        while _left_from_before(bank, thawed_wall):
            assert time.monotonic() - thawed_at < SETTLE_BOUND, _left_from_before(bank, thawed_wall)
            time.sleep(0.1)
        settled_after = time.monotonic() - thawed_at
        time.sleep(max(0.0, 5.0 - settled_after))
        load.stop()
        stop.set()
        sweeper.join()
        settle(load.managers(), bank, NODES, SETTLE_BOUND)
        books = load.books()
        left = bank.xatm_prepared()
    finally:
        stop.set()
        load.close()

    summary: dict[str, object] = {
        "frozen": silent,
        "freeze_s": FREEZE,
        "timeout_s": TIMEOUT,
        "bound_s": BOUND,
        "settled_after_thaw_s": round(settled_after, 2),
        "violations": {
            "split": len(books["split"]),
            "lost_acks": len(books["lost"]),
            "balance_delta": books["balance_delta"],
            "xatm_prepared_left": {n: len(x) for n, x in left.items() if x},
        },
    }
    for api in ("threads", "aio"):
        mine = [t for t in load.done if t.api == api]
        touched = [t for t in mine if silent in t.resources]
        in_freeze = [t for t in mine if frozen_at <= t.started < thawed_at]
        summary[api] = {
            "transfers": len(mine),
            "committed": sum(t.outcome.startswith("committed") for t in mine),
            "left_pending": sum(t.outcome == "committed (pending)" for t in mine),
            "longest_s": round(max(t.seconds for t in mine), 2),
            "longest_touching_frozen_s": round(max((t.seconds for t in touched), default=0), 2),
            "others_committed_during_freeze": sum(
                t.outcome.startswith("committed") and silent not in t.resources for t in in_freeze
            ),
            "outcomes": dict(Counter(t.outcome for t in mine)),
        }
    print("\nsilent-server summary: " + json.dumps(summary), file=sys.stderr)
    out = os.environ.get("XATM_CHAOS_REPORT")
    if out:
        Path(f"{out}.frozen-{silent}.json").write_text(json.dumps(summary, indent=2) + "\n")

    assert books["split"] == [], books["split"][:5]
    assert books["lost"] == [], books["lost"][:5]
    assert books["balance_delta"] == 0
    assert not any(left.values()), left
    assert load.aio_in_use and not any(load.aio_in_use.values()), load.aio_in_use
    for api in ("threads", "aio"):
        stats = summary[api]
        assert isinstance(stats, dict)
        assert stats["longest_s"] <= BOUND, (api, stats)
        assert stats["others_committed_during_freeze"] > 0, (api, stats)
        assert stats["committed"] > 0


def _connects(server: str, urls: dict[str, str]) -> dict[str, Callable[[], object]]:
    """One connect per driver this run can use to ``server`` (xatm's own participants)."""
    import importlib.util

    from xatm.admin import parse_url
    from xatm.aio import _async_participant
    from xatm.participants.adapters import make_participant
    from xatm.participants.mysql.drivers import c_extension_loads

    if server == "pg1":
        variants = {"psycopg": urls["pg1"]}
    else:
        plain = urls["maria"]
        variants = {"mysql-connector (pure)": plain + "?use_pure=true"}
        if c_extension_loads():
            variants["mysql-connector (C extension)"] = plain + "?use_pure=false"
        for module, scheme in (("pymysql", "mysql+pymysql"), ("MySQLdb", "mysql+mysqldb")):
            if importlib.util.find_spec(module) is not None:
                variants[module] = scheme + plain[len("mysql") :]
    out: dict[str, Callable[[], object]] = {}
    for name, url in variants.items():
        participant = make_participant(server, parse_url(url), TIMEOUT)
        out[name] = participant.connect
        if name in ("psycopg", "mysql-connector (pure)"):
            aio = _async_participant(participant)
            out[f"{name}, asyncio"] = lambda aio=aio: asyncio.run(aio.connect())  # type: ignore[misc]
    return out


@pytest.mark.parametrize("silent", ["maria", "pg1"])
def test_a_connect_to_a_frozen_server_gives_up_at_the_connect_timeout(
    silent: str, servers: Servers
) -> None:
    """The server accepts TCP connections (its kernel does) but never greets: every
    driver's connect, sync and asyncio, gives up within the connect timeout, the
    handshake included (PyMySQL's connect_timeout does not bound the greeting, nor
    mysql.connector.aio's: xatm bounds those)."""
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    urls = servers.set.urls()
    attempts = _connects(silent, urls)
    results: dict[str, tuple[float, str]] = {}

    def attempt(name: str, connect: Callable[[], object]) -> None:
        t0 = time.monotonic()
        try:
            connect()
            outcome = "connected"
        except Exception as e:
            outcome = type(e).__name__
        results[name] = (time.monotonic() - t0, outcome)

    threads = [threading.Thread(target=attempt, args=item) for item in attempts.items()]
    with frozen(getattr(servers.set, silent), 60):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GRACE + 30)
    print(f"\nconnects to {silent} frozen: {results}", file=sys.stderr)
    assert set(results) == set(attempts), results
    for name, (seconds, outcome) in results.items():
        assert outcome == "ResourceUnavailable", (name, outcome)
        assert seconds <= GRACE + SLACK, (name, seconds)


def test_a_recovery_pass_with_a_frozen_resource_finishes_the_others(
    servers: Servers, bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A dead coordinator left decided transactions on pg1+pg2, pg1+maria and pg2+maria,
    and an undecided one on pg1+pg2. With maria frozen, a pass commits every branch on
    pg1 and pg2 (and rolls back the undecided one) within its bound, reports maria, and
    closes only the decision whose branches are all finished; after the thaw, the next
    pass finishes maria's."""
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    log = tmp_path / "log"
    decided = {
        crash(bank, log, "dead", "after_decision", pair, tid=f"t{i}", account=i): pair
        for i, pair in enumerate((("pg1", "pg2"), ("pg1", "maria"), ("pg2", "maria")), 1)
    }
    undecided = crash(bank, log, "dead", "after_prepare", ("pg1", "pg2"), tid="t4", account=4)
    tm = make_tm(node_id="rec", log=log, timeout=TIMEOUT, sweeper=False)
    bound = step_bound(TIMEOUT) + GRACE + SLACK  # one cut step on maria, a connect, slack
    with frozen(servers.set.maria, 120):
        t0 = time.monotonic()
        report = tm.recover()
        took = time.monotonic() - t0
        on_pg = {name: {x.gtrid for x in bank.xatm_prepared_on(name)} for name in ("pg1", "pg2")}
    print(f"\nrecovery pass with maria frozen: {took:.1f} s, {report}", file=sys.stderr)
    assert took <= bound, (took, bound)
    assert report.unreachable == ("maria",)
    assert on_pg == {"pg1": set(), "pg2": set()}, on_pg
    assert report.committed == 4 and report.rolled_back == 2, report
    assert report.ended == 1, report  # pg1+pg2: both finished; the two others wait for maria
    settle([tm], bank, {"dead", "rec"}, SETTLE_BOUND)
    journal = bank.journal_ids()
    for i, (gtrid, pair) in enumerate(decided.items(), 1):
        assert {r for r in RESOURCES if f"t{i}" in journal[r]} == set(pair), gtrid
    assert not any("t4" in journal[r] for r in RESOURCES), undecided
    assert bank.total() == bank.initial_total


def test_recover_and_indoubt_say_early_what_they_wait_for(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """``xatm indoubt`` and ``xatm recover`` with maria frozen: a line on stderr names the
    resource and what is waited for within seconds, long before the command ends (and it
    ends, each of its waits bounded), exit status 1."""
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    lines = ['node_id = "ops"', f'log = "{tmp_path / "log"}"', f"timeout = {TIMEOUT:g}"]
    for name, url in bank.urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
    config = tmp_path / "xatm.toml"
    config.write_text("\n".join(lines) + "\n")
    results = {}
    with frozen(servers.set.maria, 180):
        for command in ("indoubt", "recover"):
            results[command] = _timed_run(config, command, timeout=120)
    for command, (rc, stderr, took) in results.items():
        print(f"\nxatm {command} with maria frozen: {took:.1f} s, exit {rc}", file=sys.stderr)
        for at, line in stderr:
            print(f"  {at:5.1f} s  {line}", file=sys.stderr)
        waits = [at for at, line in stderr if "waiting for resource 'maria'" in line]
        assert rc == 1, (command, stderr)
        assert waits, (command, stderr)
        assert waits[0] <= took - 3.0, (command, waits[0], took)  # early, not at the end
        assert not any("Traceback" in line for _, line in stderr)
        assert not any("xatm-secret" in line for _, line in stderr)  # no password shown
        assert took <= 3 * GRACE + step_bound(TIMEOUT) + SLACK, (command, took)


def _timed_run(
    config: Path, command: str, timeout: float
) -> tuple[int, list[tuple[float, str]], float]:
    """Run the ``xatm`` command; its exit status, each stderr line with the second it came
    at, and how long it ran."""
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config), "XATM_ACTOR": "cli:silent"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(XATM), command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    lines = [(time.monotonic() - t0, line.rstrip("\n")) for line in proc.stderr]
    rc = proc.wait(timeout)
    return rc, lines, time.monotonic() - t0


def test_a_silent_shared_log_holds_no_caller_past_the_bound(bank: Bank, log_url: str) -> None:
    """The shared log's server goes silent (a proxy in front of it forwards nothing, closes
    nothing) for longer than the bound, while threads and tasks move money between pg1 and
    maria. Before the log's calls ran under a client-side deadline, every committing caller
    waited for the whole silence (no server enforces a statement_timeout it does not see).
    Now no transfer waits past the bound: those whose decision may have reached the log are
    in doubt, the others are rolled back; once the log answers, transfers commit again,
    recovery settles the rest, and the books balance."""
    bank.create(accounts=16, balance=1000)
    proxy = BlackholeProxy(log_url)
    load = Load(bank, ("pg1", "maria"), proxy.url, TIMEOUT)
    try:
        load.start()
        time.sleep(3.0)
        silent_at = time.monotonic()
        proxy.blackhole()
        time.sleep(FREEZE)
        proxy.heal()
        healed_at = time.monotonic()
        time.sleep(5.0)
        load.stop()
        settle(load.managers(), bank, NODES, SETTLE_BOUND)
        books = load.books()
        left = bank.xatm_prepared()
    finally:
        load.close()
        proxy.close()
    # ended during the silence: none committed (no decision could be logged)
    ended = [t for t in load.done if silent_at + 1 <= t.started + t.seconds < healed_at]
    outcomes = Counter(t.outcome for t in ended)
    longest = max(t.seconds for t in load.done)
    print(f"\nsilent log: longest {longest:.1f} s; ended during the silence {dict(outcomes)}")
    assert longest <= BOUND, longest
    assert ended and not any(o.startswith("committed") for o in outcomes), outcomes
    assert any(t.outcome.startswith("committed") for t in load.done if t.started > healed_at + 1)
    assert books["split"] == [] and books["lost"] == [], books
    assert books["balance_delta"] == 0
    assert not any(left.values()), left
