"""The documented alert rules (deploy/prometheus/xatm-rules.yml): promtool accepts them, the
runbook prints them, and each one's expression fires on the scrapes taken during the incident
it is for, on real servers, and clears after recovery.

An incident is played for real (MariaDB stopped, MariaDB frozen with SIGSTOP, the sweep daemon
SIGKILLed, the log's disk full on a real tmpfs); its /metrics is scraped every half second, and
each scrape is given to the rule's expression (``tests.support.promql``, a tiny evaluator of the
subset the rules use). "Fires" means: the expression returns the series at *every* scrape of
the incident after the sweeper's first pass (so a ``for:`` of any length completes, and nothing
flaps); "clears": it returns nothing once recovery is over. Durations and thresholds meant for
minutes are scaled down to the test's seconds (:func:`scaled`); nothing else is changed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.support import Bank, Servers, journaled_transfer
from tests.support.omission import frozen
from tests.support.promql import Scrape, evaluate, rules
from tests.support.recovery import crash, wait_for, write_config
from xatm import TransactionManager
from xatm.testing.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "deploy" / "prometheus" / "xatm-rules.yml"
XATM = ROOT / ".venv" / "bin" / "xatm"
MakeTM = Callable[..., TransactionManager]

#: the rules' minutes, as the tests' seconds
SCALE = {"[5m]": "[3s]", "[15m]": "[3s]", "[1h]": "[3s]", "> 900": "> 1", "> 300": "> 30"}


def scaled(expr: str) -> str:
    for long, short in SCALE.items():
        expr = expr.replace(long, short)
    return expr


def rule(name: str) -> str:
    return scaled(rules(str(RULES))[name])


# -- the rules file ------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules(str(RULES)))} rules found" in done.stdout


def test_the_runbook_prints_the_rules_file_and_explains_each_rule() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    body = RULES.read_text().split("groups:", 1)[1]
    assert "groups:" + body in doc, "docs/operations.md must print deploy/prometheus/xatm-rules.yml"
    for name in rules(str(RULES)):
        assert re.search(rf"^\*\*{name}\*\*", doc, re.M), f"{name} is not explained in the runbook"


def test_every_metric_a_rule_names_exists() -> None:
    from xatm import prometheus

    c = prometheus.XatmCollector()
    names = {m.name for m in c.collect()} | {"up"}
    for alert, expr in rules(str(RULES)).items():
        for metric in re.findall(r"\b(xatm_[a-z_]+)", expr):
            base = metric.removesuffix("_total")
            assert base in names, f"{alert}: {metric}"


def test_the_evaluator() -> None:
    history = []
    for i, (up, fails) in enumerate([(1, 0), (1, 0), (0, 1), (0, 2), (1, 2)]):
        s = Scrape(float(i))
        text = (
            f'xatm_resource_up{{node="a",resource="maria"}} {up}\n'
            f'xatm_resource_up{{node="a",resource="pg"}} 1\n'
            f'xatm_recovery_passes_total{{node="a",result="failed"}} {fails}\n'
            'xatm_recovery_last_pass_timestamp_seconds{node="a"} 1.0\n'
        )
        s.add_target("xatm-app", "a", text)
        history.append(s)
    down = "max by (node, resource) (xatm_resource_up) == 0"
    assert [bool(evaluate(down, history, i)) for i in range(5)] == [0, 0, 1, 1, 0]
    assert evaluate(down, history, 2) == {frozenset({("node", "a"), ("resource", "maria")}): 0}
    failing = 'max by (node) (increase(xatm_recovery_passes_total{result="failed"}[2s])) > 0'
    assert [bool(evaluate(failing, history, i)) for i in range(5)] == [0, 0, 1, 1, 0]
    stale = "time() - max by (node) (xatm_recovery_last_pass_timestamp_seconds) > 2 or absent(x)"
    assert [bool(evaluate(stale, history, i)) for i in range(5)] == [1, 1, 1, 1, 1]
    assert evaluate("absent(xatm_resource_up == 7)", history, 0) == {frozenset(): 1.0}
    assert evaluate('up{job=~"xatm-.*"} == 0', history, 0) == {}


# -- scraping ------------------------------------------------------------------------------------


def pull(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return None


class Scraper:
    """Scrapes a target every ``every`` seconds on a thread; ``mark`` names the phase the
    scrapes that follow belong to."""

    def __init__(self, target: Callable[[], str | None], every: float = 0.5) -> None:
        self.target = target
        self.every = every
        self.scrapes: list[tuple[str, Scrape]] = []
        self.phase = "before"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = Scrape(time.time())
            s.add_target("xatm-sweep", "sweeper", self.target())
            self.scrapes.append((self.phase, s))
            self._stop.wait(self.every)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def hold(self, seconds: float, scrapes: int = 6) -> None:
        """Stay in the phase for ``seconds``, and on a slow machine until it has ``scrapes``
        scrapes (a liveness bound of 60 s, not a measurement)."""
        time.sleep(seconds)
        deadline = time.monotonic() + 60
        while sum(1 for p, _ in self.scrapes if p == self.phase) < scrapes:
            assert time.monotonic() < deadline, f"fewer than {scrapes} scrapes in {self.phase}"
            time.sleep(0.1)

    def history(self) -> list[Scrape]:
        return [s for _, s in self.scrapes]

    def fired(self, expr: str, phase: str) -> list[bool]:
        """Whether ``expr`` returned anything at each scrape of ``phase``."""
        history = self.history()
        return [
            bool(evaluate(expr, history, i)) for i, (p, _) in enumerate(self.scrapes) if p == phase
        ]

    def value(self, name: str, **labels: str) -> float | None:
        if not self.scrapes:
            return None
        want = set(labels.items())
        for n, k, v in self.scrapes[-1][1].samples:
            if n == name and want <= set(k):
                return v
        return None


def daemon(config: Path, port: int) -> subprocess.Popen[str]:
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)}
    return subprocess.Popen(
        [str(XATM), "sweep", "--interval", "0.2", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def setup(servers: Servers, bank: Bank, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    log = tmp_path / "log"
    config = write_config(tmp_path / "xatm.toml", bank.urls, log)
    config.write_text(config.read_text().replace("timeout = 30", "timeout = 1"))
    yield config, log


def passed(scraper: Scraper) -> bool:
    return scraper.value("xatm_recovery_last_pass_timestamp_seconds") is not None


def settle(scraper: Scraper, condition: Callable[[], bool], what: str) -> None:
    wait_for(condition, timeout=120, what=what)
    time.sleep(3.5)  # past the scaled windows
    scraper.mark("after")
    time.sleep(2.5)


class Load:
    """Transfers in a loop on a thread (pg1 -> maria and pg1 -> pg2), failures counted."""

    def __init__(self, tm: TransactionManager, bank: Bank) -> None:
        self.tm, self.bank = tm, bank
        self.done = {"committed": 0, "failed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        table = self.bank.table
        while not self._stop.is_set():
            for other, account in (("maria", 2), ("pg2", 3)):
                try:
                    with self.tm.transaction() as tx:
                        tx.execute("pg1", f"UPDATE {table} SET bal = bal - 1 WHERE id = {account}")
                        tx.execute(other, f"UPDATE {table} SET bal = bal + 1 WHERE id = {account}")
                    self.done["committed"] += 1
                except Exception:
                    self.done["failed"] += 1
                    self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_mariadb_outage_fires_the_backlog_and_unreachable_alerts(
    servers: Servers, bank: Bank, make_tm: MakeTM, setup: tuple[Path, Path], how: str
) -> None:
    """MariaDB stopped (or frozen with SIGSTOP) holding a branch of a committed transaction,
    under a load of transfers: every scrape after the sweeper's first pass shows the backlog
    and MariaDB down, and the alerts on them fire throughout; they clear once MariaDB is back
    and the sweeper finished the transaction."""
    assert servers.set is not None
    config, log = setup
    load = Load(make_tm(node_id="load", log=log.parent / "load-log", timeout=2.0), bank)
    crash(bank, log, "app", "after_decision", ("pg1", "maria"), f"o-{how}", account=1)
    bank.wait_for_dead_sessions()
    maria = servers.set.maria
    port = free_port()
    scraper = Scraper(lambda: pull(port))
    outage = contextlib.ExitStack()
    proc = None
    try:
        if how == "killed":
            maria.stop()
            outage.callback(maria.start)
        else:
            outage.enter_context(frozen(maria, 120))
        proc = daemon(config, port)
        scraper.__enter__()
        wait_for(lambda: passed(scraper), what="the first pass")
        scraper.mark("incident")
        scraper.hold(12, scrapes=12)
        during_outage = dict(load.done)
        outage.close()
        scraper.mark("recovering")
        bank.reconnect("maria")
        settle(
            scraper,
            lambda: (
                scraper.value("xatm_in_doubt_transactions") == 0
                and scraper.value("xatm_resource_up", resource="maria") == 1
            ),
            "recovery",
        )
    finally:
        outage.close()
        load.stop()
        scraper.__exit__()
        if proc is not None:
            stop(proc)
    assert during_outage["committed"] > 0 and during_outage["failed"] > 0, during_outage
    for name in ("XatmResourceUnreachable", "XatmInDoubtTransactions", "XatmInDoubtForLong"):
        during = scraper.fired(rule(name), "incident")
        assert len(during) >= 10 and all(during), (name, during)
        after = scraper.fired(rule(name), "after")
        assert after and not any(after), (name, after)
    for name in ("XatmTargetDown", "XatmNoSweeper", "XatmSweeperNotRunning", "XatmLogFailed"):
        quiet = scraper.fired(rule(name), "incident") + scraper.fired(rule(name), "after")
        assert not any(quiet), name
    # the pass gauge of unreachable resources does not flap with the back-off either, and the
    # backlog names the log and the resource it waits on
    for expr in (
        "xatm_recovery_unreachable_resources == 1",
        'xatm_pending_decisions{log="app"} == 1',
        'xatm_resource_in_doubt_transactions{resource="maria"} == 1',
    ):
        assert all(scraper.fired(expr, "incident")), expr
        assert not any(scraper.fired(expr, "after")), expr
    assert scraper.value("xatm_pending_decisions", log="app") is None
    assert not any(bank.xatm_prepared().values())
    assert bank.journal_ids()["maria"] == {f"o-{how}"}
    assert bank.total() == bank.initial_total


def test_a_dead_sweeper_fires_target_down_and_no_sweeper(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    port = free_port()
    proc = daemon(config, port)
    try:
        with Scraper(lambda: pull(port)) as scraper:
            wait_for(lambda: passed(scraper), what="the first pass")
            scraper.mark("up")
            time.sleep(2)
            scraper.mark("killing")
            proc.kill()  # SIGKILL: its series vanish
            proc.communicate()
            wait_for(lambda: scraper.scrapes[-1][1].samples[0][2] == 0, what="a failed scrape")
            scraper.mark("incident")
            scraper.hold(4)
            scraper.mark("recovering")
            proc = daemon(config, port)
            settle(scraper, lambda: passed(scraper) and pull(port) is not None, "a new sweeper")
    finally:
        stop(proc)
    for name in ("XatmTargetDown", "XatmNoSweeper"):
        assert not any(scraper.fired(rule(name), "up")), name
        during = scraper.fired(rule(name), "incident")
        assert len(during) >= 5 and all(during), (name, during)
        after = scraper.fired(rule(name), "after")
        assert after and not any(after), (name, after)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the log needs root (CI runs as root)")
    where = tmp_path / "small"
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def test_a_full_log_disk_fires_log_failed_and_passes_failing(
    bank: Bank, make_tm: MakeTM, small_disk: Path
) -> None:
    """The application's log on a real 4 MiB tmpfs, filled: its own /metrics (this process's
    registry) says the log failed and its sweeper's passes fail, until it restarts with room."""
    node = "alert-disk"
    options = {
        "node_id": node,
        "log": small_disk / "log",
        "segment_bytes": 32 * 1024,
        "sweep_interval": 0.2,
        "timeout": 3.0,
    }
    tm = make_tm(**options)

    def mine() -> str:
        lines = generate_latest(REGISTRY).decode().splitlines()
        return "\n".join(ln for ln in lines if ln.startswith("#") or f'node="{node}"' in ln) + "\n"

    filler = small_disk / "filler"
    with Scraper(mine) as scraper:
        wait_for(lambda: passed(scraper), what="the first pass")
        scraper.mark("healthy")
        time.sleep(1.5)
        scraper.mark("filling")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
        for i in range(400):
            try:
                journaled_transfer(tm, bank, f"disk-{i}")
            except Exception:
                if scraper.value("xatm_log_up") == 0:
                    break
        wait_for(lambda: scraper.value("xatm_log_up") == 0, what="the log to fail")

        def failed_passes() -> float:
            return scraper.value("xatm_recovery_passes_total", result="failed") or 0.0

        wait_for(lambda: failed_passes() >= 2, what="failing passes")
        scraper.mark("incident")
        scraper.hold(4)
        scraper.mark("recovering")
        filler.unlink()
        tm.close()
        tm = make_tm(**options)  # the restart, with room on the disk
        tm.recover()
        journaled_transfer(tm, bank, "disk-after")
        settle(scraper, lambda: scraper.value("xatm_log_up") == 1, "the log to work again")
    for name in ("XatmLogFailed", "XatmRecoveryPassesFailing"):
        assert not any(scraper.fired(rule(name), "healthy")), name
        during = scraper.fired(rule(name), "incident")
        assert len(during) >= 5 and all(during), (name, during)
        after = scraper.fired(rule(name), "after")
        assert after and not any(after), (name, after)
