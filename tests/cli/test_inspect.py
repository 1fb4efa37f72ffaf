"""In-doubt listing, one transaction in detail, the logs and the audit trail (read-only API)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, prepare_foreign, resolve_foreign
from tests.support.recovery import crash
from xatm import ConfigurationError, load_config
from xatm.admin import Inspector, UnknownTransaction, validate_gtrid


def test_gtrid_shape_is_validated() -> None:
    good = "xatm.app." + "0" * 11 + "f" * 16
    assert validate_gtrid(good) == good
    for bad in ("'; DROP TABLE x; --", "xatm.app.123", "", good + "0", good.upper(), None):
        with pytest.raises(ConfigurationError, match="not an xatm gtrid"):
            validate_gtrid(bad)


def test_indoubt_lists_a_dead_coordinators_transactions(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    committed = crash(bank, log, "dead1", "after_decision", tid="c")
    aborted = crash(bank, log, "dead1", "after_prepare", ("pg1", "pg2", "maria"), "a", account=2)
    prepare_foreign(bank.urls["pg1"], "inspect")
    try:
        tm = make_tm(node_id="looker", log=log, sweeper=False)
        report = tm.indoubt()
        assert report.unreachable == ()
        assert report.foreign >= 1
        rows = {t.gtrid: t for t in report}
        assert set(rows) == {committed, aborted}
        assert [t.gtrid for t in report] == [committed, aborted]  # oldest first
        c = rows[committed]
        assert (c.node, c.owner, c.decision) == ("dead1", "dead", "commit")
        assert c.plan.startswith("commit")
        assert c.decided_at is not None and c.age_s >= 0
        assert [b.resource for b in c.branches] == ["maria", "pg1"]
        assert {b.state for b in c.branches} == {"prepared"}
        pg1 = next(b for b in c.branches if b.resource == "pg1")
        assert pg1.txid is not None  # logged with the decision
        assert pg1.locks is not None and pg1.locks >= 1
        assert bank.table in pg1.locked
        a = rows[aborted]
        assert a.decision == "abort" and "presumed abort" in a.plan
        assert [b.resource for b in a.branches] == ["maria", "pg1", "pg2"]
        as_json = c.to_json()
        assert as_json["decision"] == "commit" and as_json["branches"][0]["resource"] == "maria"
        # nothing was changed by looking
        assert len(bank.xatm_prepared()["pg1"]) == 2
    finally:
        resolve_foreign(bank.urls["pg1"], "inspect")
        make_tm(node_id="cleaner", log=log, sweeper=False).recover()


def test_live_coordinator_is_reported_alive_and_undecided(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "owner", "after_prepare")
    owner = make_tm(node_id="owner", log=log, sweeper=False)  # the owner is back: alive
    inspector = Inspector.from_settings(
        load_config(_config(tmp_path, bank, log))
    )  # an outside observer, no log of its own
    (row,) = inspector.indoubt()
    assert row.gtrid == gtrid
    assert row.owner == "alive" and row.decision is None
    assert "left prepared: its coordinator is alive" in row.plan
    # the owner's own view: not running in this process, so it is aborted
    (own,) = owner.indoubt()
    assert own.owner == "this-process" and own.decision == "abort"
    assert owner.recover().rolled_back == 2
    assert inspector.indoubt().transactions == ()
    assert bank.total() == bank.initial_total


def _config(tmp_path: Path, bank: Bank, log: Path) -> Path:
    from tests.support.recovery import write_config

    return write_config(tmp_path / "xatm.toml", bank.urls, log)


def test_show_one_transaction_with_its_audit_trail(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    gtrid = crash(bank, log, "dead2", "after_decision", tid="s")
    tm = make_tm(node_id="looker", log=log, sweeper=False)
    before = tm.show(gtrid)
    assert before.in_doubt and before.decision == "commit"
    assert before.logged_branches == ("pg1", "maria")
    assert before.audit == ()
    report = tm.recover()
    assert report.committed == 2 and report.ended == 1
    after = tm.show(gtrid)
    assert not after.in_doubt
    assert sorted((e.resource, e.action, e.outcome) for e in after.audit) == [
        ("", "end", "done"),
        ("maria", "commit", "done"),
        ("pg1", "commit", "done"),
    ]
    assert after.audit[-1].action == "end"
    assert {e.actor for e in after.audit} == {"recover@looker"}
    assert tm.audit_trail(gtrid) == list(after.audit)
    assert after.to_json()["audit"][0]["gtrid"] == gtrid


def test_show_unknown_and_malformed_gtrids(make_tm: MakeTM) -> None:
    tm = make_tm(node_id="looker", sweeper=False)
    with pytest.raises(UnknownTransaction, match="unknown transaction"):
        tm.show("xatm.nobody." + "0" * 27)
    with pytest.raises(ConfigurationError, match="not an xatm gtrid"):
        tm.show("'; DROP TABLE x; --")


def test_logs_and_compaction(bank: Bank, make_tm: MakeTM, tmp_path: Path) -> None:
    log = tmp_path / "log"
    crash(bank, log, "dead3", "after_decision", tid="l1")
    tm = make_tm(node_id="looker", log=log, sweeper=False)
    logs = {n.node: n for n in tm.logs()}
    assert set(logs) == {"dead3", "looker"}
    assert logs["dead3"].owner == "dead" and logs["dead3"].pending == 1
    assert logs["dead3"].records >= 1 and logs["dead3"].size > 0
    assert logs["looker"].owner == "this-process"
    tm.recover()
    logs = {n.node: n for n in tm.logs()}
    assert logs["dead3"].pending == 0
    done = {c.node: c for c in tm.inspector.compact_logs()}
    assert done["dead3"].compacted and done["dead3"].bytes_after <= done["dead3"].bytes_before
    assert not done["looker"].compacted  # this process's own log is never taken
    (seg,) = next(n for n in tm.logs() if n.node == "dead3").segments
    assert seg.records == 0 and seg.torn_bytes == 0


def test_audit_file_is_private_jsonl(bank: Bank, make_tm: MakeTM, tmp_path: Path) -> None:
    import json
    import stat

    log = tmp_path / "log"
    crash(bank, log, "dead4", "after_prepare", tid="p")
    tm = make_tm(node_id="auditor", log=log, sweeper=False)
    tm.recover()
    path = log / "audit.d" / "auditor.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["action"] for line in lines} == {"rollback"}
    assert all(
        {"at", "gtrid", "resource", "branch", "reason", "actor", "outcome"} <= set(line)
        for line in lines
    )
    assert "xatm-secret" not in path.read_text()


def test_inspection_with_the_shared_log(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, log_url: str
) -> None:
    """With the coordinators sharing a log in PostgreSQL, the CLI reads decisions, liveness
    and the audit trail from it."""
    import json
    import logging

    from click.testing import CliRunner

    from tests.support.recovery import write_config
    from xatm.cli.main import main

    gtrid = crash(bank, log_url, "shdead", "after_decision", ("pg1", "maria"), "sh")
    config = tmp_path / "xatm.toml"
    write_config(config, bank.urls, tmp_path / "unused")
    config.write_text(
        config.read_text().replace(f'log = "{tmp_path / "unused"}"', f'log = "{log_url}"')
    )
    logger = logging.getLogger("xatm")
    level, handlers = logger.level, list(logger.handlers)
    try:
        result = CliRunner().invoke(main, ["--config", str(config), "indoubt", "--json"])
        assert result.exit_code == 0, result.output
        (row,) = [r for r in json.loads(result.stdout) if r["gtrid"] == gtrid]
        assert (row["owner"], row["decision"]) == ("dead", "commit")
        assert row["plan"] == "commit (decision COMMIT is logged)"
        ops = make_tm(node_id="shops", log=log_url, sweeper=False)
        assert ops.recover().committed >= 2
        result = CliRunner().invoke(main, ["--config", str(config), "show", gtrid, "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert not info["in_doubt"]
        assert {(e["resource"], e["action"]) for e in info["audit"]} >= {
            ("pg1", "commit"),
            ("maria", "commit"),
        }
        assert "xatm-secret" not in result.output
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
    assert bank.journal_ids()["pg1"] == bank.journal_ids()["maria"] == {"sh"}
