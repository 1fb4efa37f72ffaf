"""The asyncio API's crash matrix: an asyncio coordinator SIGKILLed at every protocol step,
then recovery (the threaded manager's, or the asyncio manager's) settles it, all or nothing.

The checks are the threaded matrix's (``tests.support.crash.crash_and_recover``), with
the worker process running ``tests.workers.aio_worker`` instead of ``tests.workers.worker``.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, MakeTM
from tests.support.crash import COMMITTED_AFTER, crash_and_recover, run_worker
from xatm.admin import FAILPOINTS
from xatm.aio import AsyncTransactionManager

AIO_WORKER = "tests.workers.aio_worker"


@pytest.mark.parametrize("mode", ["strict", "marker"])
@pytest.mark.parametrize(
    "resources", [("pg1", "maria"), ("pg1", "pg2", "maria")], ids=["2-branches", "3-branches"]
)
@pytest.mark.parametrize("failpoint", FAILPOINTS)
@pytest.mark.usefixtures("foreign")
def test_async_crash_at_failpoint_then_recover(
    failpoint: str,
    resources: tuple[str, ...],
    mode: str,
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
) -> None:
    markers = ["pg1"] if mode == "marker" else []
    crash_and_recover(
        failpoint, resources, "restarted", markers, bank, make_tm, tmp_path, AIO_WORKER
    )


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_async_crash_then_async_recovery(
    failpoint: str, bank: Bank, servers: Any, tmp_path: Path
) -> None:
    resources = ("pg1", "pg2", "maria")
    cfg = {
        "urls": bank.urls,
        "log": str(tmp_path / "log"),
        "node_id": "crashy",
        "table": bank.table,
        "journal": bank.journal,
        "resources": list(resources),
        "tid": f"crash-{failpoint}",
    }
    proc = run_worker("transfer", cfg, tmp_path, failpoint, AIO_WORKER)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    bank.wait_for_dead_sessions()

    async def recover() -> tuple[int, int, int]:
        async with AsyncTransactionManager(
            bank.urls, tmp_path / "log", "crashy", sweeper=False
        ) as tm:
            report = await tm.recover()
            return report.committed, report.rolled_back, report.in_doubt

    committed, rolled_back, in_doubt = asyncio.run(recover())
    assert in_doubt == 0
    present = {r for r in resources if cfg["tid"] in bank.journal_ids()[r]}
    if failpoint in COMMITTED_AFTER:
        assert present == set(resources) and rolled_back == 0
    else:
        assert present == set() and committed == 0
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
