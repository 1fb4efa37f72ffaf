"""One verdict: ``xatm show``, ``xatm indoubt``, ``xatm recover --dry-run`` and the recovery pass
plan a transaction through one function (``xatm.recovery.plan``), an unreachable resource included.

The case of issue 21: a committed transaction, its PostgreSQL branch committed by recovery, its
MariaDB branch prepared on a server that is down. Every view must say the transaction waits
for MariaDB (its branch there is unknown, never "no branch"), and the pass must then do what
they said once MariaDB is back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from tests.support import Bank, Servers
from tests.support.recovery import crash, prepared_gtrids, write_config
from xatm.cli.main import main
from xatm.recovery.plan import Step, plan_transaction


def test_plan_table() -> None:
    """The pure rule, from a table."""
    cases: list[tuple[dict[str, Any], Step, tuple[str, ...]]] = [
        (dict(decided=True, logged_branches=("pg", "my"), prepared={}, unread=()), Step.END, ()),
        (
            dict(decided=True, logged_branches=("pg", "my"), prepared={}, unread={"my"}),
            Step.WAIT,
            ("my",),
        ),
        (
            dict(decided=True, logged_branches=("pg", "my"), prepared={"pg": "c"}, unread={"my"}),
            Step.WAIT,
            ("my",),
        ),
        (
            dict(decided=True, logged_branches=("pg", "my"), prepared={"my": "c"}, unread={"my"}),
            Step.SETTLE,
            (),
        ),
        (
            dict(decided=True, logged_branches=("pg",), prepared={"pg": "c"}, unread=()),
            Step.SETTLE,
            (),
        ),
        (
            dict(decided=False, logged_branches=(), prepared={"pg": "r"}, unread={"my"}),
            Step.SETTLE,
            (),
        ),
        (dict(decided=False, logged_branches=(), prepared={}, unread={"my"}), Step.NOTHING, ()),
    ]
    for facts, step, waiting in cases:
        plan = plan_transaction(**facts)
        assert (plan.step, plan.waiting_on) == (step, waiting), facts
        assert plan.in_doubt == (step in (Step.SETTLE, Step.WAIT))
        if step is Step.WAIT:
            assert "unknown" in plan.text and "no branch" not in plan.text


def cli(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def views(config: Path, gtrid: str) -> tuple[Any, Any, Any]:
    """(show --json, the indoubt row, recover --dry-run --json) of ``gtrid``."""
    show = as_json(cli(config, "show", gtrid, "--json"))
    rows = [r for r in as_json(cli(config, "indoubt", "--json")) if r["gtrid"] == gtrid]
    plan = as_json(cli(config, "recover", "--dry-run", "--json"))
    return show, (rows[0] if rows else None), plan


def mine(report: Any, gtrid: str) -> set[tuple[str, str, str]]:
    return {
        (a["resource"], a["action"], a["outcome"]) for a in report["actions"] if a["gtrid"] == gtrid
    }


def test_show_indoubt_dry_run_and_the_pass_agree_with_mariadb_down(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    log = tmp_path / "log"
    config = write_config(tmp_path / "xatm.toml", bank.urls, log, node_id="ops")
    gtrid = crash(bank, log, "app", "after_decision", ("pg1", "maria"), "v1", account=1)
    bank.wait_for_dead_sessions()
    maria = servers.set.maria
    maria.stop()
    try:
        # before any pass: pg1 prepared (COMMIT logged: commit it), maria unknown
        show, row, plan = views(config, gtrid)
        assert show["in_doubt"] is True and show["decision"] == "commit"
        states = {b["resource"]: b["state"] for b in show["branches"]}
        assert states == {"pg1": "prepared", "maria": "unknown"}
        assert "'maria': unreachable" in show["plan"] and "no branch" not in show["plan"]
        assert row is not None and row["plan"] == show["plan"]
        assert mine(plan, gtrid) == {("pg1", "commit", "planned"), ("maria", "skip", "left")}
        assert plan["waiting_on_unreachable"] == 1 and plan["in_doubt"] == 2

        # the pass does what the plan said: pg1 committed, maria left, the decision kept
        done = cli(config, "recover", "--json")
        assert done.exit_code == 1  # a resource could not be reached
        report = as_json(done)
        assert mine(report, gtrid) == {("pg1", "commit", "done"), ("maria", "skip", "left")}
        assert report["waiting_on_unreachable"] == 1 and report["in_doubt"] == 1
        assert report["ended"] == 0
        with psycopg.connect(bank.urls["pg1"]) as conn:
            assert not conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()

        # after the pass: pg1 committed (not "missing"), maria unknown, still in doubt
        show, row, plan = views(config, gtrid)
        states = {b["resource"]: b["state"] for b in show["branches"]}
        assert states == {"pg1": "committed", "maria": "unknown"}
        assert show["in_doubt"] is True and "no branch" not in show["plan"]
        assert row is not None and row["plan"] == show["plan"]
        assert mine(plan, gtrid) == {("maria", "skip", "left")}
        assert plan["waiting_on_unreachable"] == 1 and plan["in_doubt"] == 1
        human = cli(config, "recover", "--dry-run")
        assert "1 left in doubt (1 transaction(s) waiting for an unreachable resource)" in (
            human.stdout
        )
        shown = cli(config, "show", gtrid).stdout
        assert "in doubt     yes" in shown and "pg1: committed" in shown
        assert "pg1: missing" not in shown
    finally:
        maria.start()
    bank.reconnect("maria")

    # maria back: the plan is to commit its branch, and the pass does just that, then END
    show, row, plan = views(config, gtrid)
    assert {b["resource"]: b["state"] for b in show["branches"]} == {
        "pg1": "committed",
        "maria": "prepared",
    }
    assert show["plan"] == "commit (decision COMMIT is logged)" and row is not None
    assert mine(plan, gtrid) == {("maria", "commit", "planned")}
    report = as_json(cli(config, "recover", "--json"))
    assert {a for a in mine(report, gtrid) if a[1] != "verify"} == {
        ("maria", "commit", "done"),
        ("", "end", "done"),
    }
    assert ("pg1", "verify", "committed") in {
        (r, a, o.split(" ")[0]) for r, a, o in mine(report, gtrid)
    }
    assert report["waiting_on_unreachable"] == 0 and report["in_doubt"] == 0
    assert not any(prepared_gtrids(bank).values())
    assert bank.journal_ids() == {"pg1": {"v1"}, "pg2": set(), "maria": {"v1"}}
    assert bank.total() == bank.initial_total
