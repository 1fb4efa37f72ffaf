"""Smaller defects at the edges of the manager: doctor with a shared log, a failed prune,
arguments checked before anything is opened, and nothing left open by a failed start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Servers, connect, run
from xatm import ConfigurationError, TransactionManager
from xatm._sweeper import Sweeper

MakeTM = Callable[..., TransactionManager]


def test_doctor_checks_the_shared_log(make_tm: MakeTM, log_url: str) -> None:
    tm = make_tm("doc", log=log_url, sweeper=False)
    report = tm.doctor()
    logs = [c for c in report.checks if c.subject == "log"]
    assert [(c.name, c.ok) for c in logs] == [("shared-log", True)], logs
    assert "no log directory" not in str(report.to_json())


def test_a_failed_prune_does_not_fail_the_recovery_pass(make_tm: MakeTM, log_url: str) -> None:
    tm = make_tm("pruner", log=log_url, sweeper=False)
    conn = connect(log_url)
    try:
        # a real error from the database on the prune's DELETE, nowhere else
        run(
            conn,
            "CREATE OR REPLACE FUNCTION xatm.no_prune() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'pruning refused for this test'; END$$",
        )
        run(
            conn,
            "CREATE TRIGGER no_prune BEFORE DELETE ON xatm.decisions"
            " FOR EACH STATEMENT EXECUTE FUNCTION xatm.no_prune()",
        )
        report = tm.recover()
        assert report.committed == report.rolled_back == 0
        assert not report.problems
    finally:
        run(conn, "DROP TRIGGER IF EXISTS no_prune ON xatm.decisions")
        conn.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"sweep_interval": 0},
        {"sweep_interval": -1.0},
        {"sweep_interval": "10"},
        {"pool_size": 0},
        {"segment_bytes": -5},
        {"lock_timeout": -1},
    ],
)
def test_bad_arguments_are_refused_before_the_log_is_opened(
    servers: Servers, tmp_path: Path, log_url: str, bad: dict[str, object]
) -> None:
    log = tmp_path / "log"
    with pytest.raises(ConfigurationError):
        TransactionManager(servers.urls, log, "edge", sweeper=False, **bad)  # type: ignore[arg-type]
    assert not log.exists()  # nothing was opened, so nothing can leak
    with pytest.raises(ConfigurationError):
        TransactionManager(servers.urls, log_url, "edge", sweeper=False, **bad)  # type: ignore[arg-type]
    # the shared log's node lock was never taken: the same node_id starts at once
    TransactionManager(servers.urls, log_url, "edge", sweeper=False, lock_timeout=0).close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_start_releases_the_log(
    servers: Servers,
    tmp_path: Path,
    log_url: str,
    monkeypatch: pytest.MonkeyPatch,
    shared: bool,
) -> None:
    log: str | Path = log_url if shared else tmp_path / "log"

    def refuse(self: Sweeper) -> None:
        raise RuntimeError("cannot start a thread")

    monkeypatch.setattr(Sweeper, "start", refuse)
    with pytest.raises(RuntimeError):
        TransactionManager(servers.urls, log, "failing", sweeper=True)
    monkeypatch.undo()
    TransactionManager(servers.urls, log, "failing", sweeper=False, lock_timeout=0).close()
