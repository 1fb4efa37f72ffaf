"""Types reach the database: ``mypy --strict`` passes on a small typed app (examples/typed_app:
threaded, asyncio and a saga) and catches a wrong argument to a manager and a wrong resource
type; and the app runs on the test servers as written."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, Bank
from tests.support.recovery import write_config
from xatm import TransactionManager

APP = ROOT / "examples" / "typed_app"


def mypy(*paths: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


MISTAKES = """
from xatm import SagaTransaction, Transaction, TransactionManager
from xatm.aio import AsyncTransactionManager

wrong_resource = TransactionManager({"ledger": 5432}, "/var/lib/xatm", "api-1")  # line 4
typo = AsyncTransactionManager(  # line 5
    {"ledger": "postgresql://db1/ledger"}, "/var/lib/xatm", "api-1",
    sweep_intervall=3,
)


def body(tx: Transaction) -> int:
    row = tx.execute("ledger", "SELECT 1").fetchone()
    return int(row[0])  # line 13: the row may be None


def step(tx: SagaTransaction) -> int:
    return tx.idempotency_key  # line 17: a str
"""


def test_mypy_strict_passes_on_the_typed_app_and_catches_mistakes(tmp_path: Path) -> None:
    cache = tmp_path / "mypy-cache"
    clean = mypy(APP, cache=cache)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = tmp_path / "mistakes.py"
    bad.write_text(MISTAKES.lstrip("\n"))
    caught = mypy(bad, cache=cache)
    assert caught.returncode == 1, caught.stdout
    lines = {int(line.split(":")[1]) for line in caught.stdout.splitlines() if ": error:" in line}
    assert lines == {4, 5, 13, 17}, caught.stdout
    assert 'expected "str": "str | ResourceSpec | Engine"' in caught.stdout
    assert 'Unexpected keyword argument "sweep_intervall"' in caught.stdout


def test_the_typed_app_runs(bank: Bank, tmp_path: Path) -> None:
    from examples.typed_app import bank as app
    from examples.typed_app import sagas, service, web

    assert any(getattr(r, "path", "") == "/transfer" for r in web.app.routes)

    t = bank.table
    tm = app.open_manager(bank.urls["pg1"], bank.urls["maria"], str(tmp_path / "log"))
    try:
        assert app.transfer(tm, t, 1, 2, 10)
        assert not app.transfer(tm, t, 1, 2, 10_000)  # insufficient funds: refused
        assert app.ledger_backend_pid(tm) > 0
        assert app.total_with_the_orm(tm, t) == 4000 - 10
    finally:
        tm.close()
    saga_tm = TransactionManager(
        {"ledger": bank.urls["pg1"], "wallet": bank.urls["maria"]},
        tmp_path / "log",
        "typed-saga",
        sweeper=False,
        sagas=[sagas.build()],
    )
    try:
        assert saga_tm.run_saga("checkout", sagas.order(t, 3, 5)).state == "completed"
    finally:
        saga_tm.close()
    config = write_config(
        tmp_path / "xatm.toml",
        {"ledger": bank.urls["pg1"], "wallet": bank.urls["maria"]},
        tmp_path / "log",
        node_id="typed-aio",
    )

    async def main() -> tuple[int, int]:
        async with service.make_manager(str(config)) as atm:
            return await service.transfer(atm, t, 4, 1, 7), await service.ledger_server_version(atm)

    left, version = asyncio.run(main())
    assert left == 993 and version >= 100000
    assert bank.balance("pg1", 1) == 990 and bank.balance("maria", 2) == 1010
    assert bank.balance("pg1", 3) == 995 and bank.balance("maria", 1) == 1007
