"""``doctor``: resources and the log directory checked for two-phase commit."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support import Bank
from tests.support.recovery import write_config
from xatm import load_config
from xatm.admin import Inspector
from xatm.cli.main import main
from xatm.testing.servers import free_port


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    logger = logging.getLogger("xatm")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def doctor(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), "doctor", *args])
    assert "Traceback" not in result.output
    assert "xatm-secret" not in result.output and "hunter2" not in result.output
    return result.exit_code, result.stdout


def test_fit_servers_pass(bank: Bank, tmp_path: Path) -> None:
    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log")
    code, out = doctor(config)
    assert code == 0, out
    assert "all checks passed" in out
    assert "max_prepared_transactions = " in out and "MariaDB" in out
    code, out = doctor(config, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    subjects = {(c["subject"], c["check"]) for c in report["checks"]}
    for name in ("pg1", "pg2", "maria"):
        assert (name, "reachable") in subjects and (name, "2pc") in subjects
    assert ("log", "log-directory") in subjects and ("log", "flock") not in subjects  # not yet
    (tmp_path / "log").mkdir()
    report = Inspector.from_settings(load_config(config)).doctor()
    assert report.ok and any(c.name == "flock" and c.ok for c in report.checks)


def test_postgres_without_prepared_transactions_is_named(
    pg_no2pc: str, bank: Bank, tmp_path: Path
) -> None:
    urls = {"pg0": pg_no2pc, "maria": bank.urls["maria"]}
    config = write_config(tmp_path / "xatm.toml", urls, tmp_path / "log")
    code, out = doctor(config)
    assert code == 1
    assert "max_prepared_transactions is 0" in out and "FAIL" in out
    assert "1 check(s) failed" in out
    code, out = doctor(config, "--json")
    (bad,) = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert (bad["subject"], bad["check"]) == ("pg0", "2pc")
    assert "max_prepared_transactions" in bad["detail"]


def test_unreachable_resource_fails_without_its_password(bank: Bank, tmp_path: Path) -> None:
    urls = {"pg1": bank.urls["pg1"], "gone": f"mysql://xatm:hunter2@127.0.0.1:{free_port()}/x"}
    config = write_config(tmp_path / "xatm.toml", urls, tmp_path / "log")
    code, out = doctor(config, "--json")
    assert code == 1
    (bad,) = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert (bad["subject"], bad["check"]) == ("gone", "reachable")
    assert "cannot connect" in bad["detail"]


def test_log_directory_problems(bank: Bank, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    config = write_config(tmp_path / "a.toml", {"pg1": bank.urls["pg1"]}, not_a_dir)
    code, out = doctor(config, "--json")
    assert code == 1
    (bad,) = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert bad["subject"] == "log" and "not a directory" in bad["detail"]
    config = write_config(tmp_path / "b.toml", {"pg1": bank.urls["pg1"]}, not_a_dir / "sub")
    code, out = doctor(config, "--json")
    assert code == 1
    (bad,) = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert bad["subject"] == "log"
    fresh = tmp_path / "new" / "log"
    config = write_config(tmp_path / "c.toml", {"pg1": bank.urls["pg1"]}, fresh)
    code, out = doctor(config, "--json")
    assert code == 0, out
    assert not fresh.exists()  # doctor changes nothing


def test_shared_log_is_checked_for_reachability(bank: Bank, tmp_path: Path) -> None:
    path = tmp_path / "xatm.toml"
    path.write_text(
        'node_id = "app"\n'
        f'log = "{bank.urls["pg2"]}"\n'
        f'[resources.pg1]\nurl = "{bank.urls["pg1"]}"\n'
    )
    code, out = doctor(path, "--json")
    assert code == 0, out
    checks = {(c["subject"], c["check"]): c for c in json.loads(out)["checks"]}
    assert checks[("log", "shared-log")]["ok"] is True
    assert ("log", "log-directory") not in checks
    dead = f"postgresql://xatm:hunter2@127.0.0.1:{free_port()}/xatm"
    path.write_text(
        f'node_id = "app"\nlog = "{dead}"\n[resources.pg1]\nurl = "{bank.urls["pg1"]}"\n'
    )
    code, out = doctor(path, "--json")
    assert code == 1
    (bad,) = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert (bad["subject"], bad["check"]) == ("log", "shared-log")
