"""Field tests of issue 8 item 6: two managers with one node_id.

A node_id is an identity: each manager presumes abort for its own node's transactions that it
is not running. Two live managers with one node_id (one config started twice with two log
directories; two deployments sharing only a MariaDB server) each roll back the other's
in-flight branches. The expected behaviour: a live manager holds an identity lock for its
node_id on every resource, and a second one is refused at start with a ConfigurationError
that names the node and the resource.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Bank, MakeTM, Servers, journaled_transfer, run
from tests.support.field import attempt, books, lock_timeouts, roll_back_leftovers, transfer_books
from tests.support.omission import BlackholeProxy
from tests.support.recovery import crash, prepared_gtrids, wait_for
from xatm import ConfigurationError, TransactionManager
from xatm.admin import ResolutionRefused

TWIN_SECONDS = 10.0


@pytest.fixture(autouse=True)
def tidy(bank: Bank) -> Iterator[None]:
    yield
    roll_back_leftovers(bank, {"twin-a", "twin-b", "twin-c", "twin-r", "api-1"})


def names_node_and_a_resource(error: BaseException, node: str, resources: set[str]) -> bool:
    text = str(error)
    return node in text and any(r in text for r in resources)


def test_a_second_manager_of_a_live_node_id_is_refused(make_tm: MakeTM, tmp_path: Path) -> None:
    first = make_tm(node_id="twin-a", log=tmp_path / "a", sweeper=False)
    with pytest.raises(ConfigurationError) as refused:  # today: DID NOT RAISE
        make_tm(node_id="twin-a", log=tmp_path / "b", sweeper=False, lock_timeout=2)
    assert names_node_and_a_resource(refused.value, "twin-a", set(first.resource_names))
    first.close()  # the identity is free again
    make_tm(node_id="twin-a", log=tmp_path / "b", sweeper=False).close()


def test_a_twin_cannot_roll_back_a_live_nodes_transaction(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, at_step: dict[str, Callable[[], None]]
) -> None:
    """One config started twice, with two log directories. While the first commits a
    transfer (every branch prepared, COMMIT logged), the twin runs a recovery pass: the
    transfer is its own node's, not running in it, with no decision in its log."""
    live = make_tm(node_id="twin-b", log=tmp_path / "a", sweeper=False)
    twin, refused = attempt(
        lambda: make_tm(node_id="twin-b", log=tmp_path / "b", sweeper=False, lock_timeout=2)
    )
    if twin is not None:
        at_step["after_decision"] = lambda: twin.recover()
    _, failed = attempt(lambda: journaled_transfer(live, bank, "tw1"))
    books(bank, "tw1", ("pg1", "maria"))  # today: SPLIT (pg1 rolled back by the twin)
    assert failed is None, failed
    assert isinstance(refused, ConfigurationError), refused
    assert names_node_and_a_resource(refused, "twin-b", set(live.resource_names))
    assert all(not v for v in prepared_gtrids(bank).values())


def test_a_twin_with_another_log_cannot_resolve_its_nodes_transaction_by_hand(
    bank: Bank, make_tm: MakeTM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the simulator (seed 454): a coordinator dies after its COMMIT decision, its
    phase 2 having reached one branch; the same config then starts with another log
    directory (its node is free: the dead one's identity went with it), and an operator asks
    that process to resolve the transaction by hand while the other server does not answer
    the decision rule's look (a path through a proxy that goes silent, and answers again once
    the rule has spoken). Its log holds nothing of an incarnation it does not list: presumed
    abort would roll back the other branch and split the transfer. Refused, for both
    outcomes, unless forced; the right log's coordinator then commits it."""
    from xatm.ops import resolve as resolving

    gtrid = crash(bank, tmp_path / "a", "twin-r", "after_decision", tid="tr", account=3)
    # phase 2 reached pg1 only (as when the other server stops answering then)
    [xid] = [x for x in bank.xatm_prepared()["pg1"] if x.gtrid == gtrid]
    run(bank.conns["pg1"], f"COMMIT PREPARED '{xid.to_pg_gid()}'")
    proxy = BlackholeProxy(bank.urls["maria"])
    try:
        twin = make_tm(
            node_id="twin-r",
            resources={**bank.urls, "maria": proxy.url},
            log=tmp_path / "b",
            sweeper=False,
            timeout=2,
        )
        rule = resolving._rule

        def rule_then_heal(*args: Any) -> Any:
            verdict = rule(*args)
            proxy.heal()  # the server answers again: the branch can be found now
            return verdict

        monkeypatch.setattr(resolving, "_rule", rule_then_heal)
        for outcome in ("rollback", "commit"):
            proxy.blackhole()
            with pytest.raises(ResolutionRefused, match="another log"):
                twin.resolve(gtrid, outcome, actor="cli:test")
        assert gtrid in prepared_gtrids(bank)["maria"]
        twin.close()
    finally:
        proxy.close()
    owner = make_tm(node_id="twin-r", log=tmp_path / "a", sweeper=False)
    owner.recover()
    assert books(bank, "tr", ("pg1", "maria")) == {"pg1", "maria"}
    assert all(not v for v in prepared_gtrids(bank).values())


def test_two_deployments_sharing_only_mariadb_cannot_use_one_node_id(
    servers: Servers, make_tm: MakeTM, tmp_path: Path
) -> None:
    """XA RECOVER is server-wide: deployment B would roll back deployment A's branches."""
    if servers.set is None:
        pytest.skip("needs a second database on the private MariaDB server")
    servers.set.maria.create_database("field_other_app")
    a = {"pg1": servers.urls["pg1"], "maria": servers.urls["maria"]}
    b = {"pg2": servers.urls["pg2"], "maria": servers.set.maria.url("field_other_app")}
    make_tm(node_id="api-1", resources=a, log=tmp_path / "a", sweeper=False)
    with pytest.raises(ConfigurationError) as refused:  # today: DID NOT RAISE
        make_tm(node_id="api-1", resources=b, log=tmp_path / "b", sweeper=False, lock_timeout=2)
    assert names_node_and_a_resource(refused.value, "api-1", {"maria"})


def test_twin_processes_keep_the_books(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    """Two coordinator processes with the same node_id and config but their own log
    directories run transfers for ~10 s with a sweeper every 0.2 s. Expected: the second is
    refused at start (exit status not 0, the node named on stderr); either way every
    transfer is on all of its resources or on none, and no money is made or lost."""
    accounts = 6
    bank.create(accounts=accounts, balance=10_000)
    intents, acks = tmp_path / "intents", tmp_path / "acks"
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[Path] = []
    for i, log in enumerate((tmp_path / "log-a", tmp_path / "log-b")):
        cfg = {
            "urls": lock_timeouts(bank.urls),  # orphaned locks cost errors, not hangs
            "log": str(log),
            "node_id": "twin-c",
            "tid_prefix": f"twin-c{i}",
            "table": bank.table,
            "journal": bank.journal,
            "threads": 3,
            "seconds": TWIN_SECONDS,
            "seed": 8 + i,
            "accounts": accounts,
            "intents": str(intents),
            "acks": str(acks),
            "sweep_interval": 0.2,
            "lock_timeout": 1.0,  # a twin is refused after this wait, not after 30 s
        }
        path = tmp_path / f"twin{i}.json"
        path.write_text(json.dumps(cfg))
        errs.append(tmp_path / f"twin{i}.err")
        with errs[-1].open("wb") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.workers.worker", "chaos", str(path)],
                    cwd=ROOT,
                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
        if i == 0:  # the first one is up and working before the second starts
            wait_for(lambda: intents.exists() and intents.stat().st_size > 0, what="worker 1")
    try:
        wait_for(lambda: all(p.poll() is not None for p in procs), TWIN_SECONDS + 120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    # both exited on their own; a last pass as the first one settles anything left
    bank.wait_for_dead_sessions()
    with TransactionManager(bank.urls, tmp_path / "log-a", "twin-c", sweeper=False) as tm:
        tm.recover()
    result = transfer_books(bank, intents, acks)
    print("\ntwin books: " + json.dumps({k: v for k, v in result.items() if k != "split"}))
    assert result["split"] == [], result["split"][:5]  # today: SPLIT transfers
    assert result["lost"] == [], result["lost"][:5]
    assert result["balance_delta"] == 0
    assert result["committed"] > 0
    assert procs[0].returncode == 0, errs[0].read_text()[-2000:]
    assert procs[1].returncode not in (0, None)
    refusal = errs[1].read_text()
    assert "NodeInUse" in refusal and "twin-c" in refusal  # a ConfigurationError
    assert all(not v for v in prepared_gtrids(bank).values())
