"""Helpers for the sweeper, inspection and CLI tests: crashed coordinators and configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import ROOT, Bank

_CHILD = """
import json, sys
from xatm import TransactionManager
cfg = json.loads(sys.argv[1])
tm = TransactionManager(cfg["urls"], cfg["log"], cfg["node_id"], timeout=30, sweeper=False,
                        commit_markers=cfg.get("markers", []), parallel=cfg["parallel"])
t, j = cfg["table"], cfg["journal"]
res = cfg["resources"]
with tm.transaction() as tx:
    a = cfg["account"]
    tx.execute(res[0], f"UPDATE {t} SET bal = bal - %s WHERE id = %s", (10 * (len(res) - 1), a))
    for r in res[1:]:
        tx.execute(r, f"UPDATE {t} SET bal = bal + 10 WHERE id = %s", (a,))
    for r in res:
        tx.execute(r, f"INSERT INTO {j} (tid) VALUES (%s)", (cfg["tid"],))
    print(tx.gtrid, flush=True)
print("survived", flush=True)
"""


def crash(
    bank: Bank,
    log: Path | str,
    node_id: str,
    failpoint: str,
    resources: tuple[str, ...] = ("pg1", "maria"),
    tid: str = "t",
    markers: tuple[str, ...] = (),
    account: int = 1,
    urls: dict[str, str] | None = None,
    parallel: bool = True,
) -> str:
    """Run one transfer (of 10 on ``account``) in a child coordinator (its log: a directory,
    or a shared log's URL) that SIGKILLs itself at ``failpoint``; return the gtrid it was
    working on. Branches it leaves prepared lock that account's rows: crash the next one on
    another account. ``urls``: the child's resources, if not the bank's; ``parallel=False``:
    its branches one after another (``after_first_commit`` then leaves the others prepared)."""
    cfg = {
        "urls": urls or bank.urls,
        "log": str(log),
        "node_id": node_id,
        "table": bank.table,
        "journal": bank.journal,
        "resources": list(resources),
        "tid": tid,
        "markers": list(markers),
        "account": account,
        "parallel": parallel,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "XATM_FAILPOINT": failpoint},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.split()[0]


def write_config(
    path: Path, urls: dict[str, str], log: Path, node_id: str = "app", extra: str = ""
) -> Path:
    """A TOML config for the CLI."""
    lines = [f'node_id = "{node_id}"', f'log = "{log}"', "timeout = 30"]
    for name, url in urls.items():
        lines += [f"[resources.{name}]", f'url = "{url}"']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until it holds (no timing is asserted: the deadline is generous)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what or condition}")
        time.sleep(0.05)


def prepared_gtrids(bank: Bank) -> dict[str, set[str]]:
    """The gtrids of xatm's prepared branches on each resource."""
    return {name: {x.gtrid for x in xids} for name, xids in bank.xatm_prepared().items()}
