"""A one-phase COMMIT whose session is cut in flight: the server commits, the client never
hears back, its process lives on (real servers, a TCP proxy in front of one database).

* **Commit-marker path**: the marker branch's COMMIT carries the decision row. The caller is
  told the outcome is in doubt (never "rolled back": it committed), the other branch stays
  prepared, and recovery finds the decision row and commits it: the books balance, the
  transfer is applied once on both sides, nothing is left prepared. Both databases as the
  marker branch, sync and asyncio.
* **A single branch** (the one-phase commit is the decision): the caller is told the outcome
  is in doubt, and the work is there: an acknowledged "rolled back" would be a lie.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import Bank, MakeTM, run
from tests.support.omission import BlackholeProxy
from xatm import TransactionInDoubt, TransactionRolledBack
from xatm.aio import AsyncTransactionManager

TIMEOUT = 5.0


def _statements(bank: Bank, src: str, dst: str, tid: str) -> list[tuple[str, str, Any]]:
    t, j = bank.table, bank.journal
    return [
        (src, f"UPDATE {t} SET bal = bal - 10 WHERE id = 1", None),
        (dst, f"UPDATE {t} SET bal = bal + 10 WHERE id = 1", None),
        (src, f"INSERT INTO {j} VALUES (%s)", (tid,)),
        (dst, f"INSERT INTO {j} VALUES (%s)", (tid,)),
    ]


def _books(bank: Bank, tid: str, src: str, dst: str) -> None:
    ids = bank.journal_ids()
    assert tid in ids[src] and tid in ids[dst], ids
    assert bank.balance(src, 1) == 990 and bank.balance(dst, 1) == 1010
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


@pytest.mark.parametrize("marker", ["pg1", "maria"])
def test_a_cut_at_the_marker_commit_is_in_doubt_and_recovery_commits_the_rest(
    marker: str, make_tm: MakeTM, bank: Bank, at_step: dict[str, Any]
) -> None:
    other = "maria" if marker == "pg1" else "pg1"
    proxy = BlackholeProxy(bank.urls[marker])
    try:
        tm = make_tm(
            resources={**bank.urls, marker: proxy.url},
            commit_markers=[marker],
            timeout=TIMEOUT,
            sweeper=False,
        )
        with tm.transaction() as warm:  # a pooled connection through the proxy
            warm.execute(marker, "SELECT 1")
        with pytest.raises(TransactionInDoubt), tm.transaction() as tx:
            for resource, sql, params in _statements(bank, marker, other, "cut"):
                tx.execute(resource, sql, params)
            # the marker branch's COMMIT (its decision row inside) is the next request with it
            at_step["after_prepare"] = lambda: proxy.cut_after_next_request(match=b"COMMIT")
        assert proxy.cuts == 1
        assert tx.state.value == "in-doubt"
        assert len(bank.xatm_prepared()[other]) == 1  # left prepared for recovery
        report = tm.recover()
        assert report.committed == 1 and report.rolled_back == 0 and report.in_doubt == 0
        _books(bank, "cut", marker, other)
    finally:
        proxy.close()


def test_the_asyncio_manager_tells_the_same_and_recovery_settles_it(
    bank: Bank, tmp_path: Any, at_step: dict[str, Any]
) -> None:
    proxy = BlackholeProxy(bank.urls["pg1"])

    async def main() -> None:
        tm = AsyncTransactionManager(
            resources={**bank.urls, "pg1": proxy.url},
            log=str(tmp_path / "alog"),
            node_id="cutaio",
            commit_markers=["pg1"],
            timeout=TIMEOUT,
            sweeper=False,
        )
        async with tm:
            with pytest.raises(TransactionInDoubt):
                async with tm.transaction() as tx:
                    for resource, sql, params in _statements(bank, "pg1", "maria", "acut"):
                        await tx.execute(resource, sql, params)
                    at_step["after_prepare"] = lambda: proxy.cut_after_next_request(match=b"COMMIT")
            assert proxy.cuts == 1
            assert len(bank.xatm_prepared()["maria"]) == 1
            report = await tm.recover()
            assert report.committed == 1 and report.rolled_back == 0

    try:
        asyncio.run(main())
        _books(bank, "acut", "pg1", "maria")
    finally:
        proxy.close()


@pytest.mark.parametrize("through", ["pg1", "maria"])
def test_a_cut_at_a_single_branchs_commit_is_in_doubt_not_rolled_back(
    through: str, make_tm: MakeTM, bank: Bank
) -> None:
    proxy = BlackholeProxy(bank.urls[through])
    try:
        tm = make_tm(resources={**bank.urls, through: proxy.url}, timeout=TIMEOUT, sweeper=False)
        with tm.transaction() as warm:
            warm.execute(through, "SELECT 1")
        t, j = bank.table, bank.journal
        with pytest.raises(TransactionInDoubt) as info, tm.transaction() as tx:
            tx.execute(through, f"UPDATE {t} SET bal = bal - 10 WHERE id = 1")
            tx.execute(through, f"UPDATE {t} SET bal = bal + 10 WHERE id = 2")
            tx.execute(through, f"INSERT INTO {j} VALUES (%s)", ("one",))
            proxy.cut_after_next_request(match=b"COMMIT")
        assert not isinstance(info.value, TransactionRolledBack)
        assert proxy.cuts == 1
        assert "one" in bank.journal_ids()[through]  # it committed: "in doubt" was the truth
        assert run(bank.conns[through], f"SELECT count(*) FROM {j}") == [(1,)]
        assert bank.total() == bank.initial_total
        with tm.transaction() as after:  # the pool dropped the cut connection
            after.execute(through, f"INSERT INTO {j} VALUES (%s)", ("two",))
        assert {"one", "two"} <= bank.journal_ids()[through]
    finally:
        proxy.close()
