"""Field tests of issue 8 item 3: presumed abort without reading the resource that may hold
the decision row.

A transaction whose gtrid carries the marker flag may have its COMMIT decision as a row of
``xatm_decisions`` in one of its resources. It must never be presumed aborted before that
resource has been read: not by a peer configured with other resources, nor by a manager
that once saw the resource without the table and now cannot reach it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Bank, MakeTM, Servers, run
from tests.support.field import (
    books,
    delete_marker_rows,
    maria_sessions,
    roll_back_leftovers,
    wait_sessions_gone,
)
from tests.support.recovery import crash, prepared_gtrids

NODES = {"fm-a", "fm-b"}


@pytest.fixture
def tidy(bank: Bank) -> Iterator[None]:
    yield
    roll_back_leftovers(bank, NODES)
    delete_marker_rows(bank, NODES)


@pytest.mark.parametrize(
    "peer_resources",
    [
        pytest.param(("pg2", "maria"), id="peer-without-the-marker-resource"),
        pytest.param(("pg1", "pg2", "maria"), id="peer-without-commit-markers"),
    ],
)
def test_peer_with_another_resource_set_takes_over_a_marker_transaction(
    peer_resources: tuple[str, ...],
    bank: Bank,
    make_tm: MakeTM,
    tmp_path: Path,
    tidy: None,
) -> None:
    """Node fm-a (commit_markers=["pg1"]) dies after its marker commit: pg1 holds the work
    and the decision row, maria is prepared. A peer sharing the log directory, configured
    with other resources (and no commit_markers), takes over fm-a's log. It must leave
    maria prepared (or commit it), never roll it back."""
    log = tmp_path / "log"
    gtrid = crash(bank, log, "fm-a", "after_decision", ("pg1", "maria"), "p1", markers=("pg1",))
    bank.wait_for_dead_sessions()
    assert prepared_gtrids(bank)["maria"] == {gtrid}
    peer = make_tm(
        node_id="fm-peer",
        log=log,
        sweeper=False,
        resources={name: bank.urls[name] for name in peer_resources},
    )
    report = peer.recover()
    # a node with every resource finishes the job
    final = make_tm(node_id="fm-final", log=log, sweeper=False)
    final.recover()
    assert books(bank, "p1", ("pg1", "maria")) == {"pg1", "maria"}  # today (a): SPLIT
    assert report.rolled_back == 0
    assert all(not v for v in prepared_gtrids(bank).values())
    assert bank.total() == bank.initial_total


def test_a_marker_resource_seen_without_the_table_then_down_is_not_presumed_empty(
    servers: Servers, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A long-running recoverer (no commit_markers) reads pg1 before any decision table
    exists there. Then a coordinator with commit_markers=["pg1"] creates the table, commits
    a decision row and dies with maria prepared. pg1 goes down. The recoverer's next pass
    must not presume abort: pg1 may hold the decision (it does)."""
    if servers.set is None:
        pytest.skip("external servers are not stopped")
    database = f"field_nomarker_{os.getpid()}"
    servers.set.pg1.create_database(database)
    urls = dict(servers.urls, pg1=servers.set.pg1.url(database))
    bank = Bank(urls, f"acc3b_{os.getpid()}")
    try:
        run(bank.conns["pg1"], "DROP TABLE IF EXISTS xatm_decisions")
        bank.create(accounts=4, balance=1000)
        log = tmp_path / "log"
        recoverer = make_tm(node_id="fm-rec", resources=urls, log=log, sweeper=False)
        assert recoverer.recover().clean  # pg1 read: no xatm_decisions table there
        keep = maria_sessions(bank)
        gtrid = crash(
            bank, log, "fm-b", "after_decision", ("pg1", "maria"), "q1", markers=("pg1",), urls=urls
        )
        wait_sessions_gone(bank, keep)
        assert prepared_gtrids(bank)["maria"] == {gtrid}
        assert bank.journal_ids()["pg1"] == {"q1"}
        servers.set.pg1.stop()
        try:
            down = recoverer.recover()
        finally:
            servers.set.pg1.start()
        bank.reconnect("pg1")
        for _ in range(3):
            if recoverer.recover().clean:
                break
        assert books(bank, "q1", ("pg1", "maria")) == {"pg1", "maria"}  # today: SPLIT
        assert down.rolled_back == 0 and down.in_doubt == 1
        assert all(not v for v in prepared_gtrids(bank).values())
        assert bank.total() == bank.initial_total
    finally:
        roll_back_leftovers(bank, NODES)
        bank.close()
