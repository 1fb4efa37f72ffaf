"""The ``xatm`` command, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.support import Bank, MakeTM
from tests.support.recovery import crash, prepared_gtrids, wait_for, write_config
from xatm import TransactionManager
from xatm.admin import Xid
from xatm.cli.main import main
from xatm.log.file import read_log
from xatm.testing.servers import free_port

XATM = Path(sys.executable).parent / "xatm"  # the console script of the running venv
SECRET = "xatm-secret"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the ``xatm`` logger; put it back for the other tests."""
    logger = logging.getLogger("xatm")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.fixture
def config(bank: Bank, tmp_path: Path) -> Path:
    return write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log")


def xatm(config: Path | None, *args: str, env: dict[str, str] | None = None) -> Result:
    argv = ["--config", str(config), *args] if config is not None else list(args)
    result = CliRunner().invoke(main, argv, env=env, catch_exceptions=False)
    assert SECRET not in result.output
    assert "Traceback" not in result.output
    return result


def one_error_line(result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


# -- user mistakes ---------------------------------------------------------------------------


def test_no_config(tmp_path: Path) -> None:
    result = xatm(None, "indoubt", env={"XATM_CONFIG": ""})
    assert result.exit_code == 2
    assert "--config" in one_error_line(result)
    result = xatm(tmp_path / "missing.toml", "indoubt")
    assert result.exit_code == 1
    assert "does not exist" in one_error_line(result)
    bad = tmp_path / "bad.toml"
    bad.write_text('node_id = "n"\nlog = "l"\n[resources.r]\nurl = "oracle://u:hunter2@h/db"\n')
    result = xatm(bad, "doctor")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "unsupported scheme" in line and "hunter2" not in result.output


def test_config_from_the_environment(config: Path) -> None:
    result = xatm(None, "indoubt", "--json", env={"XATM_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("command", ["show", "commit", "rollback"])
def test_malformed_gtrid_is_refused(config: Path, command: str) -> None:
    result = xatm(config, command, "'; DROP TABLE x; --")
    assert result.exit_code == 2
    assert "not an xatm gtrid" in one_error_line(result)


def test_unknown_gtrid(config: Path) -> None:
    gtrid = "xatm.nobody." + "0" * 27
    result = xatm(config, "show", gtrid)
    assert result.exit_code == 1
    assert "unknown transaction" in one_error_line(result)
    result = xatm(config, "rollback", gtrid, "--force")
    assert result.exit_code == 1
    assert "nothing to resolve" in one_error_line(result)


def test_unreachable_resource(bank: Bank, tmp_path: Path) -> None:
    urls = dict(bank.urls, dead=f"postgresql://xatm:hunter2@127.0.0.1:{free_port()}/xatm")
    config = write_config(tmp_path / "xatm.toml", urls, tmp_path / "log")
    for args in (["indoubt"], ["indoubt", "--json"], ["recover"], ["doctor"]):
        result = xatm(config, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "'dead'" in result.stderr or "dead" in result.stdout
        assert "hunter2" not in result.output
    result = xatm(config, "indoubt", "--json")
    assert json.loads(result.stdout) == []


# -- the story: crash, look, recover ---------------------------------------------------------


def test_indoubt_recover_and_show_after_crashes(bank: Bank, config: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    committed = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "c", account=1)
    aborted = crash(bank, log, "app", "after_prepare", ("pg1", "pg2", "maria"), "a", account=2)

    result = xatm(config, "indoubt", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["gtrid"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {committed, aborted}
    assert rows[committed]["decision"] == "commit"
    assert rows[aborted]["decision"] == "abort"
    for row in rows.values():
        assert row["node"] == "app" and row["owner"] == "dead"
        assert isinstance(row["age_s"], float) and row["age_s"] >= 0
    assert sorted(b["resource"] for b in rows[committed]["branches"]) == ["maria", "pg1"]
    assert sorted(b["resource"] for b in rows[aborted]["branches"]) == ["maria", "pg1", "pg2"]

    human = xatm(config, "indoubt")
    assert committed in human.stdout and aborted in human.stdout
    assert "presumed abort" in human.stdout and "2 in-doubt transaction(s)" in human.stdout

    plan = xatm(config, "recover", "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    report = json.loads(plan.stdout)
    assert report["dry_run"] is True
    planned = sorted((a["gtrid"], a["resource"], a["action"]) for a in report["actions"])
    assert planned == sorted(
        [(committed, r, "commit") for r in ("pg1", "maria")]
        + [(aborted, r, "rollback") for r in ("pg1", "pg2", "maria")]
    )
    assert prepared_gtrids(bank)["maria"] == {committed, aborted}  # nothing changed
    assert read_log(log / "app").pending  # and the log not touched

    human_plan = xatm(config, "recover", "--dry-run")
    assert "dry run: would commit 2 branch(es), would roll back 3" in human_plan.stdout

    done = xatm(config, "recover", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert (report["committed"], report["rolled_back"], report["ended"]) == (2, 3, 1)
    assert all(v == set() for v in prepared_gtrids(bank).values())
    assert bank.journal_ids() == {"pg1": {"c"}, "pg2": set(), "maria": {"c"}}
    assert bank.total() == bank.initial_total
    assert json.loads(xatm(config, "indoubt", "--json").stdout) == []
    assert "no in-doubt transactions" in xatm(config, "indoubt").stdout

    shown = xatm(config, "show", committed, "--json")
    assert shown.exit_code == 0
    info = json.loads(shown.stdout)
    assert info["in_doubt"] is False
    trail = [(e["resource"], e["action"], e["outcome"]) for e in info["audit"]]
    assert sorted(trail) == [
        ("", "end", "done"),
        ("maria", "commit", "done"),
        ("pg1", "commit", "done"),
    ]
    assert all(e["actor"].startswith("cli:") for e in info["audit"])
    human_show = xatm(config, "show", aborted)
    assert "rollback" in human_show.stdout and "audit trail" in human_show.stdout


def test_the_cli_as_a_real_subprocess(bank: Bank, config: Path, tmp_path: Path) -> None:
    assert XATM.exists(), "the console script is installed by `make venv`"
    gtrid = crash(bank, tmp_path / "log", "app", "after_decision", ("pg2", "maria"), "s")
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(XATM), *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr
        return proc

    listed = run("indoubt", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["gtrid"] == gtrid and row["decision"] == "commit"
    recovered = run("recover")
    assert recovered.returncode == 0, recovered.stderr
    assert "2 committed" in recovered.stdout
    bad = run("show", "not-a-gtrid")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error: not an xatm gtrid")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert bank.journal_ids()["pg2"] == bank.journal_ids()["maria"] == {"s"}


# -- manual resolution -----------------------------------------------------------------------


def test_manual_commit_of_a_logged_decision(bank: Bank, config: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "m1")
    refused = xatm(config, "rollback", gtrid)
    assert refused.exit_code == 1
    line = one_error_line(refused)
    assert "COMMIT decision is logged" in line and "--force" in line
    assert prepared_gtrids(bank)["maria"] == {gtrid}
    result = xatm(config, "commit", gtrid, "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["complete"] and not res["forced"] and res["decision_before"] == "commit"
    assert sorted((a["resource"], a["action"], a["outcome"]) for a in res["actions"]) == [
        ("", "end", "done"),
        ("maria", "commit", "done"),
        ("pg1", "commit", "done"),
    ]
    assert bank.journal_ids()["maria"] == {"m1"} and not read_log(log / "app").pending
    audit = json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]
    assert {e["action"] for e in audit} == {"commit", "end"}
    assert all(e["actor"].startswith("cli:") and "manual commit" in e["reason"] for e in audit)


def test_manual_rollback_of_a_presumed_abort(bank: Bank, config: Path, tmp_path: Path) -> None:
    gtrid = crash(bank, tmp_path / "log", "app", "after_prepare", ("pg1", "pg2"), "m2")
    refused = xatm(config, "commit", gtrid)
    assert refused.exit_code == 1 and "presumed aborted" in one_error_line(refused)
    result = xatm(config, "rollback", gtrid)
    assert result.exit_code == 0, result.output
    assert f"manual rollback of {gtrid}: complete" in result.stdout
    assert all(not v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total


def test_manual_resolution_of_a_live_coordinators_transaction_needs_force(
    bank: Bank, config: Path, tmp_path: Path, make_tm: MakeTM
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "owner", "after_prepare", ("pg1", "maria"), "m3")
    make_tm(node_id="owner", log=log, sweeper=False)  # the owner is alive again
    refused = xatm(config, "rollback", gtrid)
    assert refused.exit_code == 1 and "alive" in one_error_line(refused)
    assert prepared_gtrids(bank)["pg1"] == {gtrid}
    forced = xatm(config, "rollback", gtrid, "--force")
    assert forced.exit_code == 0, forced.output
    assert "(forced)" in forced.stdout and "forced although" in forced.stdout
    assert all(not v for v in prepared_gtrids(bank).values())
    audit = json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]
    assert "override" in {e["action"] for e in audit}


def test_forced_rollback_of_a_committed_transaction_is_a_recorded_heuristic(
    bank: Bank, config: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "m4")
    left = sum(1 for v in prepared_gtrids(bank).values() if gtrid in v)
    assert left == 2
    result = xatm(config, "rollback", gtrid, "--force", "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    heuristics = [a for a in res["actions"] if a["action"] == "heuristic"]
    assert len(heuristics) == left and res["decision_overruled"] is True
    assert not read_log(log / "app").pending  # the decision is closed: recovery agrees
    again = json.loads(xatm(config, "recover", "--json").stdout)
    assert (again["committed"], again["rolled_back"]) == (0, 0)
    audit = json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]
    assert len([e for e in audit if e["action"] == "heuristic"]) == left


def test_forced_commit_of_an_undecided_transaction_logs_the_decision_first(
    bank: Bank, config: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_prepare", ("pg1", "maria"), "m5")
    result = xatm(config, "commit", gtrid, "--force", "--json")
    assert result.exit_code == 0, result.output
    actions = [a["action"] for a in json.loads(result.stdout)["actions"]]
    assert sorted(actions) == ["commit", "commit", "end"]
    audit = [e["action"] for e in json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]]
    assert audit[:2] == ["override", "decide"]
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"m5"}
    assert bank.total() == bank.initial_total


# -- its own node, the logs, the daemon ------------------------------------------------------


def test_the_cli_never_takes_the_applications_node(
    bank: Bank, config: Path, tmp_path: Path, make_tm: MakeTM
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_prepare", ("pg1", "maria"), "n1")
    app = make_tm(node_id="app", log=log, sweeper=False)  # the application is running
    result = xatm(config, "recover", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["rolled_back"] == 0 and report["in_doubt"] == 2
    assert all("alive" in a["reason"] for a in report["actions"])
    assert prepared_gtrids(bank)["pg1"] == {gtrid}
    assert (log / "app-cli").is_dir()
    refused = xatm(config, "--node-id", "app", "recover")
    assert refused.exit_code == 1 and "application's own node_id" in one_error_line(refused)
    app.recover()  # the application settles its own (its log lists the crashed process)
    assert not any(prepared_gtrids(bank).values())


def test_log_and_log_compact(bank: Bank, config: Path, tmp_path: Path) -> None:
    crash(bank, tmp_path / "log", "app", "after_decision", ("pg1", "maria"), "l1")
    logs = {n["node"]: n for n in json.loads(xatm(config, "log", "--json").stdout)}
    assert logs["app"]["owner"] == "dead" and logs["app"]["pending"] == 1
    assert logs["app"]["records"] >= 1 and logs["app"]["segments"]
    human = xatm(config, "log")
    assert "app" in human.stdout and "PENDING" in human.stdout
    assert xatm(config, "recover").exit_code == 0
    compacted = {c["node"]: c for c in json.loads(xatm(config, "log", "compact", "--json").stdout)}
    assert compacted["app"]["compacted"] is True
    assert compacted["app"]["bytes_after"] <= compacted["app"]["bytes_before"]
    assert "COMPACTED" in xatm(config, "log", "compact").stdout


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_sweep_daemon_resolves_and_stops_cleanly(
    bank: Bank, config: Path, tmp_path: Path, stop_with: signal.Signals
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), f"d{int(stop_with)}")
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)}
    daemon = subprocess.Popen(
        [str(XATM), "sweep", "--interval", "0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: gtrid not in prepared_gtrids(bank)["maria"], what="the daemon")
        wait_for(lambda: not read_log(log / "app").pending, what="the decision to be closed")
    finally:
        daemon.send_signal(stop_with)
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert "Traceback" not in err and SECRET not in err + out
    assert "stopped after" in err
    assert (log / "app-sweep").is_dir()
    audit = json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]
    assert {e["actor"] for e in audit} == {"sweeper@app-sweep"}
    assert os.path.exists(log / "audit.d" / "app-sweep.jsonl")
    assert bank.journal_ids()["maria"] == {f"d{int(stop_with)}"}


def test_manual_resolution_with_the_shared_log(
    bank: Bank, tmp_path: Path, make_tm: MakeTM, log_url: str
) -> None:
    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "unused")
    config.write_text(
        config.read_text().replace(f'log = "{tmp_path / "unused"}"', f'log = "{log_url}"')
    )
    decided = crash(bank, log_url, "shm1", "after_decision", ("pg1", "maria"), "s1", account=1)
    undecided = crash(bank, log_url, "shm2", "after_prepare", ("pg2", "maria"), "s2", account=2)
    refused = xatm(config, "rollback", decided)
    assert refused.exit_code == 1 and "COMMIT decision is logged" in one_error_line(refused)
    refused = xatm(config, "commit", undecided)
    assert refused.exit_code == 1 and "presumed aborted" in one_error_line(refused)
    assert xatm(config, "commit", decided).exit_code == 0
    assert xatm(config, "rollback", undecided).exit_code == 0
    looker = make_tm(node_id="shlook", log=log_url, sweeper=False)
    assert looker.shared_log is not None
    assert looker.shared_log.decisions([undecided]) == {undecided: "A"}  # fenced
    assert decided not in looker.shared_log.pending(all_nodes=True)  # ended
    journal = bank.journal_ids()
    assert journal["pg1"] == journal["maria"] == {"s1"} and journal["pg2"] == set()
    actions = {e.action for e in looker.audit_trail(undecided)}
    assert {"decide", "rollback"} <= actions


def test_corrupt_log_is_reported_left_alone_and_salvaged(
    bank: Bank, config: Path, tmp_path: Path
) -> None:
    """A flipped bit in a dead node's COMMIT, good frames after it: nothing acts on that
    node's branches, every command says which file and offset, and salvage is audited."""
    from xatm import LogCorrupt
    from xatm.core.records import HEADER, LogRecord

    log = tmp_path / "log"
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "c1")
    (seg,) = sorted((log / "app").glob("seg-*.xlog"))
    data = bytearray(seg.read_bytes())
    at = data.index(gtrid.encode()) - 12 - HEADER.size  # inside the COMMIT's frame
    data[at + HEADER.size + 3] ^= 0x02
    data += LogRecord("END", gtrid.replace("app", "zzz")).encode()  # a good frame after it
    seg.write_bytes(bytes(data))
    before = seg.read_bytes()

    shown = xatm(config, "log")
    assert shown.exit_code == 1 and "CORRUPT" in shown.stderr and "salvage" in shown.stderr
    recovered = xatm(config, "recover", "--json")
    assert recovered.exit_code == 0, recovered.output
    reasons = {a["reason"] for a in json.loads(recovered.stdout)["actions"]}
    assert any("corrupt" in r for r in reasons), reasons
    assert gtrid in prepared_gtrids(bank)["pg1"] and gtrid in prepared_gtrids(bank)["maria"]
    assert seg.read_bytes() == before
    with pytest.raises(LogCorrupt, match=f"{seg}.*offset"):
        TransactionManager(bank.urls, str(log), "app", sweeper=False)
    refused = xatm(config, "commit", gtrid)
    assert refused.exit_code == 1 and "corrupt" in one_error_line(refused)

    salvaged = xatm(config, "log", "salvage", "app", "--yes")
    assert salvaged.exit_code == 0, salvaged.output
    assert "damaged" in salvaged.stdout and "xatm indoubt" in salvaged.stderr
    kept = list((log / "app").glob("salvaged-*/seg-*.xlog"))
    assert [p.read_bytes() for p in kept] == [before]
    assert xatm(config, "log").exit_code == 0
    audit = [e for e in json.loads(xatm(config, "show", gtrid, "--json").stdout)["audit"]]
    assert not audit  # the salvage entry names no gtrid; the trail has it
    from xatm.log.audit import read_audit

    (entry,) = [e for e in read_audit(log) if e.action == "salvage"]
    assert entry.node == "app-cli" and seg.name in entry.reason
    # the operator settles the transaction by hand, as the runbook says
    assert xatm(config, "commit", gtrid, "--force").exit_code == 0
    assert bank.journal_ids()["maria"] == {"c1"}


# -- what an operator pastes, pipes and reads ------------------------------------------------


def test_a_forced_commit_of_a_transaction_that_never_existed_leaves_no_trace(
    bank: Bank, config: Path, tmp_path: Path
) -> None:
    crash(bank, tmp_path / "log", "app", "after_decision", ("pg1", "maria"), "nx")  # a dead "app"
    for gtrid in ("xatm.nobody." + "0" * 27, "xatm.app." + "0" * 27):
        for outcome in ("commit", "rollback"):
            result = xatm(config, outcome, gtrid, "--force")
            assert result.exit_code == 1
            assert "nothing to resolve" in one_error_line(result)
        shown = xatm(config, "show", gtrid)
        assert shown.exit_code == 1 and "unknown transaction" in one_error_line(shown)
    assert not [e for e in _audit(tmp_path / "log") if e.gtrid.endswith("0" * 27)]
    assert xatm(config, "recover").exit_code == 0  # the crashed transfer: left to no one
    assert not any(prepared_gtrids(bank).values())


def _audit(log: Path) -> list:  # type: ignore[type-arg]
    from xatm.admin import Inspector

    with Inspector({}, str(log)) as look:
        return look.audit()


def test_every_gid_form_the_databases_show_names_its_transaction(
    bank: Bank, config: Path, tmp_path: Path
) -> None:
    """pg_prepared_xacts gids and XA RECOVER's data (raw, FORMAT='SQL') are accepted, and
    map to the xatm gtrid; another application's gid is a clear error."""
    from tests.support import prepare_foreign, resolve_foreign, run

    gtrid = crash(bank, tmp_path / "log", "app", "after_decision", ("pg1", "maria"), "g1")
    gids = [r[0] for r in run(bank.conns["pg1"], "SELECT gid FROM pg_prepared_xacts")]
    (pg_gid,) = [g for g in gids if (x := Xid.from_pg_gid(g)) is not None and x.gtrid == gtrid]

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes | bytearray) else str(value)

    raw = [text(r[3]) for r in run(bank.conns["maria"], "XA RECOVER")]
    (data,) = [d for d in raw if d.startswith(gtrid)]
    sql = [text(r[3]) for r in run(bank.conns["maria"], "XA RECOVER FORMAT='SQL'")]
    (sql_data,) = [d for d in sql if d.startswith("X'" + gtrid.encode().hex())]
    assert pg_gid.startswith("2019652717_") and data.startswith(gtrid) and sql_data.startswith("X'")
    for form in (pg_gid, data, sql_data, f"'{pg_gid}'"):
        shown = xatm(config, "show", form, "--json")
        assert shown.exit_code == 0, (form, shown.output)
        assert json.loads(shown.stdout)["gtrid"] == gtrid
    done = xatm(config, "commit", sql_data)
    assert done.exit_code == 0, done.output
    assert f"manual commit of {gtrid}: complete" in done.stdout
    foreign = prepare_foreign(bank.urls["pg2"], "cli-gid")
    try:
        refused = xatm(config, "show", f"1_{_b64('other')}_{_b64('b')}")
        assert refused.exit_code == 2 and "another application's" in one_error_line(refused)
        refused = xatm(config, "rollback", foreign)
        assert refused.exit_code == 2 and "not an xatm gtrid" in one_error_line(refused)
    finally:
        resolve_foreign(bank.urls["pg2"], "cli-gid")


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_a_reader_that_goes_away_ends_the_command_quietly(config: Path) -> None:
    """``xatm indoubt | head -1``: no BrokenPipeError, no message, status 141 (SIGPIPE's)."""
    for args in (["indoubt"], ["indoubt", "--json"], ["--help"]):
        proc = subprocess.Popen(
            [str(XATM), *args],
            env={"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before anything is written
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141, err
        assert err == "", err


def test_the_drivers_advice_never_reaches_the_operator(
    bank: Bank, config: Path, tmp_path: Path, make_tm: MakeTM
) -> None:
    """mysql-connector's "consider using the reconnect() option" is cut wherever xatm shows a
    driver's error: here a saga step whose statement outlives the connection's read_timeout
    (a real ReadTimeoutError, with the pure-Python connection class that raises it)."""
    import mysql.connector.errors

    from tests.support import add_query
    from xatm import Saga
    from xatm.core.urls import redact

    for error in (
        mysql.connector.errors.ReadTimeoutError(),
        mysql.connector.errors.WriteTimeoutError(),
    ):
        text = redact(str(error).strip())
        assert "reconnect()" not in text and "timed out (the connection was closed)." in text
        first = redact(str(error).strip().splitlines()[0])
        assert first == text, first
    if "+" in bank.urls["maria"].split("://")[0]:
        pytest.skip("read_timeout is mysql-connector's")
    slow = add_query(bank.urls["maria"], "read_timeout=1&use_pure=true")

    def sleepy(tx: object, data: object) -> None:
        tx.execute("slow", "SELECT SLEEP(5)")  # type: ignore[attr-defined]

    saga = Saga("sleepy", max_attempts=1)
    saga.step("wait", action=sleepy, resources=["slow"])
    tm = make_tm(node_id="adv", resources={**bank.urls, "slow": slow}, sweeper=False, sagas=[saga])
    result = tm.run_saga("sleepy")
    assert result.state == "compensated", result
    assert "timed out" in result.error and "reconnect()" not in result.error, result.error
    config = write_config(tmp_path / "adv.toml", {**bank.urls, "slow": slow}, tmp_path / "log")
    shown = xatm(config, "saga", "show", result.saga_id)
    assert "timed out" in shown.stdout and "reconnect()" not in shown.stdout, shown.stdout
