"""The crash matrices' helpers: a coordinator or saga process killed at a failpoint, and the
checks after its recovery (all or nothing, by the log)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import ROOT, Bank, MakeTM, run

#: the failpoints after which the transaction is decided committed
COMMITTED_AFTER = {"after_decision", "after_first_commit"}
#: the threaded coordinator process (``tests.workers.aio_worker`` is the asyncio one)
WORKER = "tests.workers.worker"


def run_worker(
    mode: str,
    cfg: dict[str, object],
    tmp_path: Path,
    failpoint: str | None,
    worker: str = WORKER,
) -> subprocess.CompletedProcess[str]:
    """Run ``worker`` (a module run with ``python -m``) in ``mode`` on ``cfg``, with
    ``XATM_FAILPOINT`` set to ``failpoint`` (it SIGKILLs itself there)."""
    path = tmp_path / f"{mode}-{cfg['node_id']}.json"
    path.write_text(json.dumps(cfg))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if failpoint:
        env["XATM_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", worker, mode, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def crash_and_recover(
    failpoint: str,
    resources: tuple[str, ...],
    recover_as: str,
    markers: list[str],
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    worker: str = WORKER,
) -> None:
    """Run one transfer in ``worker`` (a module), killed at ``failpoint``, recover, check
    the books."""
    mode = "marker" if markers else "strict"
    log = tmp_path / "log"
    cfg = {
        "urls": bank.urls,
        "log": str(log),
        "node_id": "crashy",
        "table": bank.table,
        "journal": bank.journal,
        "resources": list(resources),
        "tid": f"crash-{failpoint}",
        "commit_markers": markers,
    }
    proc = run_worker("transfer", cfg, tmp_path, failpoint, worker)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the killed coordinator's MariaDB session may still be running its last XA COMMIT
    # (after_first_commit): count the prepared branches once it is gone
    bank.wait_for_dead_sessions()
    n = len(resources)
    preparable = n if mode == "strict" else n - 1

    prepared = bank.xatm_prepared()
    left = sum(len(v) for v in prepared.values())
    if failpoint == "before_prepare":
        assert left == 0
    elif failpoint in ("after_prepare", "after_decision"):
        assert left == preparable
        assert len({x.gtrid for v in prepared.values() for x in v}) == 1
    else:  # after_first_commit: one branch committed, the others still prepared (some may
        assert left <= preparable - 1  # have been committed by the parallel phase 2 too)
    node = "crashy" if recover_as == "restarted" else "other"
    bank.wait_for_dead_sessions()
    tm = make_tm(node_id=node, log=log)
    report = tm.recover()
    assert report.unreachable == ()
    assert report.in_doubt == 0
    if failpoint in COMMITTED_AFTER:
        assert report.committed == left and report.rolled_back == 0
    else:
        assert report.rolled_back == left and report.committed == 0

    # all or nothing, as the log says
    journal = bank.journal_ids()
    tid = cfg["tid"]
    present = {r for r in resources if tid in journal[r]}
    if failpoint in COMMITTED_AFTER:
        assert present == set(resources)
        b = bank.balances()
        assert b[resources[0]][1] == 1000 - 10 * (n - 1)
        assert all(b[r][1] == 1010 for r in resources[1:])
    else:
        assert present == set()
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    # foreign prepared transactions are still there
    everything = bank.prepared()
    assert "foreign-matrix-pg1" in everything["pg1"]
    assert "foreign-matrix-pg2" in everything["pg2"]
    assert len([x for x in everything["maria"] if isinstance(x, str)]) >= 1
    # a second pass finds nothing to do, and the decision was closed with END
    again = tm.recover()
    assert (again.committed, again.rolled_back, again.in_doubt) == (0, 0, 0)
    if mode == "marker":  # the decision row is deleted once every branch is finished
        rows = run(
            bank.conns[markers[0]],
            "SELECT gtrid FROM xatm_decisions WHERE gtrid LIKE %s AND branches <> %s",
            ("xatm.crashy.%", '{"abort":1}'),  # recovery's abort fences stay a while
        )
        assert rows == []
    if recover_as == "restarted":
        assert tm._ctx.log.pending() == {}  # END appended (lazily)
    else:
        from xatm.log.file import read_segments

        pending, _ = read_segments(log / "crashy")  # the peer log was closed: END on disk
        assert pending == {}


def run_saga_worker(
    cfg: dict[str, Any], tmp_path: Path, failpoint: str | None
) -> subprocess.CompletedProcess[str]:
    """Run one saga in ``tests.workers.saga_worker``, killed at ``failpoint`` if it is set."""
    path = tmp_path / f"saga-{cfg['node_id']}.json"
    path.write_text(json.dumps(cfg))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if failpoint:
        env["XATM_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "tests.workers.saga_worker", "one", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
