"""The saga commands of ``xatm``: ``sagas``, ``saga show``, ``saga retry``, ``saga abort``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support import Bank, MakeTM, saga_defs
from tests.support.crash import run_saga_worker
from tests.support.recovery import write_config
from xatm.cli.main import main

SAGAS = [
    "tests.support.saga_defs:transfer",
    "tests.support.saga_defs:both",
    "tests.support.saga_defs:fragile",
]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    logger = logging.getLogger("xatm")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.fixture
def config(bank: Bank, tmp_path: Path) -> Path:
    lines = [
        'node_id = "app"',
        f'log = "{tmp_path / "log"}"',
        f"sagas = {json.dumps(SAGAS)}",
    ]
    for name, url in bank.urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
    path = tmp_path / "xatm.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def xatm(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def data(bank: Bank, tid: str, **extra: Any) -> dict[str, Any]:
    return {
        "table": bank.table,
        "journal": bank.journal,
        "tid": tid,
        "src": 1,
        "dst": 2,
        "amt": 5,
        **extra,
    }


def crashed_saga(bank: Bank, tmp_path: Path, tid: str) -> str:
    """A transfer saga whose process was killed after its first step."""
    cfg = {
        "urls": bank.urls,
        "log": str(tmp_path / "log"),
        "node_id": "app",
        "saga": "transfer",
        "data": data(bank, tid),
        "key": tid,
    }
    proc = run_saga_worker(cfg, tmp_path, "saga_after_step")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    bank.wait_for_dead_sessions()
    listed = json.loads(xatm(tmp_path / "xatm.toml", "sagas", "--json").output)
    return str(next(s["saga_id"] for s in listed if s["key"] == tid))


def test_sagas_lists_show_and_retry(config: Path, bank: Bank, tmp_path: Path) -> None:
    assert xatm(config, "sagas").output.strip() == "no running, compensating or stuck sagas"
    saga_id = crashed_saga(bank, tmp_path, "c1")
    listed = xatm(config, "sagas")
    assert listed.exit_code == 0
    assert saga_id in listed.output and "app (dead)" in listed.output
    assert "running" in listed.output and "debit" in listed.output
    [row] = json.loads(xatm(config, "sagas", "--json").output)
    assert (row["status"], row["step"], row["done"], row["owner_alive"]) == (
        "running",
        "debit",
        [],
        False,
    )
    shown = xatm(config, "saga", "show", saga_id)
    assert shown.exit_code == 0
    assert f"saga {saga_id} (transfer): running" in shown.output
    # killed after its step committed, before its record said so: only the start is noted
    assert "saga-start" in shown.output and "saga-action" not in shown.output
    as_json = json.loads(xatm(config, "saga", "show", saga_id, "--json").output)
    assert [e["action"] for e in as_json["history"]] == ["saga-start"]

    retried = xatm(config, "saga", "retry", saga_id)
    assert retried.exit_code == 0, retried.output
    assert f"saga {saga_id}: completed" in retried.output
    assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005
    assert "no running" in xatm(config, "sagas").output
    assert saga_id in xatm(config, "sagas", "--all").output
    refused = xatm(config, "saga", "retry", saga_id)
    assert refused.exit_code == 1 and "already completed" in refused.output
    history = json.loads(xatm(config, "saga", "show", saga_id, "--json").output)["history"]
    assert any(e["action"] == "saga-retry" and e["actor"].startswith("cli:") for e in history)
    # what the operator's run did is audited, step by step (the barrier skipped the debit)
    steps = [(e["action"], e["branch"]) for e in history if e["actor"].startswith("cli:")]
    assert ("saga-action", "debit") in steps and ("saga-end", "") in steps


def test_saga_abort_compensates(config: Path, bank: Bank, tmp_path: Path) -> None:
    saga_id = crashed_saga(bank, tmp_path, "c2")
    aborted = xatm(config, "saga", "abort", saga_id, "--json")
    assert aborted.exit_code == 0, aborted.output
    body = json.loads(aborted.output)
    assert body["state"] == "compensated" and body["error"] == "aborted by an operator"
    assert bank.balance("pg1", 1) == 1000 and bank.balance("maria", 2) == 1000
    assert bank.total() == bank.initial_total


def test_a_stuck_saga_is_shown_and_retried(
    config: Path, bank: Bank, tmp_path: Path, make_tm: MakeTM
) -> None:
    broken = tmp_path / "broken"
    broken.write_text("")
    tm = make_tm(node_id="app2", log=tmp_path / "log", sweeper=False, sagas=[saga_defs.fragile])
    result = tm.run_saga("fragile", data=data(bank, "f1", abort=True, broken=str(broken)))
    assert result.state == "failed"
    listed = xatm(config, "sagas")
    assert listed.exit_code == 1
    assert "stuck" in listed.output and "refund service is down" in listed.output
    refused = xatm(config, "saga", "abort", result.saga_id)
    assert refused.exit_code == 1 and "already compensating" in refused.output
    broken.unlink()
    fixed = xatm(config, "saga", "retry", result.saga_id)
    assert fixed.exit_code == 0 and "compensated" in fixed.output
    # the retry succeeded: the old stuck error is not printed as if it had failed
    assert "refund service is down" not in fixed.output and "error:" not in fixed.output
    assert "why it compensated: step 'finish'" in fixed.output, fixed.output
    body = json.loads(xatm(config, "saga", "show", result.saga_id, "--json").output)
    assert "refund service is down" not in body["error"] and body["status"] == "compensated"
    assert bank.balance("pg1", 1) == 1000


def test_abandoning_a_stuck_compensation_needs_force(
    config: Path, bank: Bank, tmp_path: Path, make_tm: MakeTM
) -> None:
    broken = tmp_path / "broken"
    broken.write_text("")
    tm = make_tm(node_id="app2", log=tmp_path / "log", sweeper=False, sagas=[saga_defs.fragile])
    result = tm.run_saga("fragile", data=data(bank, "f2", abort=True, broken=str(broken)))
    gave_up = xatm(config, "saga", "abort", result.saga_id, "--force")
    assert gave_up.exit_code == 1 and "failed" in gave_up.output
    assert "abandoned by an operator" in gave_up.output
    assert xatm(config, "sagas").exit_code == 0  # no longer listed: it is over (failed)


def test_bad_saga_ids_are_usage_mistakes(config: Path) -> None:
    for bad in ("../../etc/passwd", "xatm.app.123", "transfer.zz"):
        result = xatm(config, "saga", "show", bad)
        assert result.exit_code == 2
        assert "not a saga id" in result.output
    unknown = xatm(config, "saga", "show", "transfer." + "0" * 24 + ".00000000")
    assert unknown.exit_code == 1 and "no saga" in unknown.output


def test_recover_finishes_a_dead_saga_and_says_so(config: Path, bank: Bank, tmp_path: Path) -> None:
    saga_id = crashed_saga(bank, tmp_path, "c3")
    result = xatm(config, "recover")
    assert result.exit_code == 0, result.output
    assert f"sagas: 1 finished ({saga_id} completed), 0 left" in result.output
    assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005
    again = json.loads(xatm(config, "recover", "--json").output)
    assert again["sagas"] == {"finished": [], "left": [], "lost": []}


def test_sagas_on_the_shared_log(bank: Bank, tmp_path: Path, make_tm: MakeTM, log_url: str) -> None:
    lines = ['node_id = "shapp"', f'log = "{log_url}"', f"sagas = {json.dumps(SAGAS)}"]
    for name, url in bank.urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
    config = tmp_path / "shared.toml"
    config.write_text("\n".join(lines) + "\n")
    tm = make_tm(node_id="shapp", log=log_url, sweeper=False, sagas=[saga_defs.transfer])
    result = tm.run_saga("transfer", data=data(bank, "sh9"), key="cli-sh9")
    listed = json.loads(xatm(config, "sagas", "--all", "--json").output)
    mine = [s for s in listed if s["saga_id"] == result.saga_id]
    assert mine and mine[0]["status"] == "completed" and mine[0]["key"] == "cli-sh9"
    shown = xatm(config, "saga", "show", result.saga_id)
    assert shown.exit_code == 0 and "completed" in shown.output and "saga-end" in shown.output


def test_a_saga_module_that_cannot_be_imported(config: Path, bank: Bank) -> None:
    """recover still recovers the transactions, says it skipped the sagas, and exits 1
    (skipped work never exits 0); saga commands and sweep stop; commit and rollback do not
    need the sagas at all."""
    config.write_text(
        config.read_text().replace("tests.support.saga_defs:fragile", "nowhere.at_all:x")
    )
    recovered = xatm(config, "recover")
    assert recovered.exit_code == 1
    assert "cannot import 'nowhere.at_all'" in recovered.output
    assert "recovers no saga" in recovered.output and "--app-dir" in recovered.output
    assert "0 committed" in recovered.output  # the transactions' pass ran
    assert xatm(config, "recover", "--dry-run").exit_code == 0  # a dry run skips nothing
    refused = xatm(config, "saga", "retry", "transfer." + "0" * 24 + ".00000000")
    assert refused.exit_code == 1 and "cannot import 'nowhere.at_all'" in refused.output
    sweep = xatm(config, "sweep", "--interval", "1")
    assert sweep.exit_code == 1 and "cannot import 'nowhere.at_all'" in sweep.output
    unknown = "xatm.app." + "0" * 27
    nothing = xatm(config, "rollback", unknown, "--force")
    assert nothing.exit_code == 1 and "nothing to resolve" in nothing.output
    assert "nowhere" not in nothing.output


def test_sagas_are_imported_from_the_app_folder(bank: Bank, tmp_path: Path) -> None:
    """As celery and uvicorn do: the current directory (or --app-dir) is on sys.path, so
    ``sagas = ["shop_sync:checkout"]`` with shop_sync.py in the app's folder imports."""
    app = tmp_path / "app"
    app.mkdir()
    module = f"shop_sync_{os.getpid()}"
    (app / f"{module}.py").write_text(
        "from xatm import Saga\n"
        "def noop(tx, data):\n    tx.execute('pg1', 'SELECT 1')\n"
        "checkout = Saga('checkout')\n"
        "checkout.step('pay', action=noop, resources=['pg1'])\n"
    )
    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log")
    config.write_text(f'sagas = ["{module}:checkout"]\n' + config.read_text())
    env = {"PATH": "/usr/bin:/bin", "XATM_CONFIG": str(config)}
    xatm_bin = Path(sys.executable).parent / "xatm"

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(xatm_bin), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
        )

    elsewhere = run("recover", cwd=tmp_path)
    assert elsewhere.returncode == 1 and f"cannot import '{module}'" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr
    here = run("recover", cwd=app)
    assert here.returncode == 0, here.stderr
    assert "recovers no saga" not in here.stderr
    by_option = run("--app-dir", str(app), "recover", cwd=tmp_path)
    assert by_option.returncode == 0, by_option.stderr
    bad = run("--app-dir", str(tmp_path / "missing"), "recover", cwd=tmp_path)
    assert bad.returncode == 2 and "--app-dir" in bad.stderr and "Traceback" not in bad.stderr
