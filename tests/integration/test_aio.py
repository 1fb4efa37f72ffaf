"""The asyncio API (xatm.aio): transfers, roll back, markers, recovery, on real servers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support import Bank, CommitsBlocked, Servers
from xatm import TransactionInDoubt, TransactionRolledBack, TransactionState, XatmError
from xatm.aio import AsyncTransactionManager
from xatm.errors import ConfigurationError


def manager(servers: Servers, tmp_path: Path, **kwargs: Any) -> AsyncTransactionManager:
    kwargs.setdefault("resources", servers.urls)
    kwargs.setdefault("log", tmp_path / "log")
    kwargs.setdefault("node_id", "aio")
    kwargs.setdefault("sweeper", False)
    return AsyncTransactionManager(**kwargs)


async def transfer(tm: AsyncTransactionManager, bank: Bank, tid: str, names: list[str]) -> Any:
    async with tm.transaction() as tx:
        for i, name in enumerate(names):
            delta = -10 * (len(names) - 1) if i == 0 else 10
            await tx.execute(name, f"UPDATE {bank.table} SET bal = bal + %s WHERE id = 1", (delta,))
            await tx.execute(name, f"INSERT INTO {bank.journal} (tid) VALUES (%s)", (tid,))
    return tx


def test_transfer_over_three_resources(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            tx = await transfer(tm, bank, "t1", ["pg1", "pg2", "maria"])
            assert tx.state.value == "committed"
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.balances()["pg1"][1] == 980
    assert bank.balances()["maria"][1] == 1010
    assert bank.journal_ids() == {"pg1": {"t1"}, "pg2": {"t1"}, "maria": {"t1"}}
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_block_raising_rolls_back(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            with pytest.raises(ZeroDivisionError):
                async with tm.transaction() as tx:
                    await tx.execute("pg1", f"UPDATE {bank.table} SET bal = 0")
                    await tx.execute("maria", f"UPDATE {bank.table} SET bal = 0")
                    1 / 0  # noqa: B018
            assert tx.state.value == "rolled-back"
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.total() == bank.initial_total


def test_one_branch_and_read_only(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            async with tm.transaction() as tx:
                await tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 2")
            async with tm.transaction() as tx:
                cur = await tx.execute("pg2", f"SELECT bal FROM {bank.table} WHERE id = 2")
                assert (await cur.fetchone())[0] == 1000
                cur = await tx.execute("maria", f"SELECT bal FROM {bank.table} WHERE id = 2")
                assert (await cur.fetchone())[0] == 1000
                await tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 2")

    asyncio.run(main())
    assert bank.balances()["pg1"][2] == 998
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_a_no_vote_rolls_every_branch_back(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            await transfer(tm, bank, "dup", ["pg1", "maria"])
            with pytest.raises(TransactionRolledBack):
                async with tm.transaction() as tx:
                    await tx.execute("pg1", f"UPDATE {bank.table} SET bal = 0")
                    await tx.execute("maria", f"UPDATE {bank.table} SET bal = 0")
                    tx.set_rollback_only("test")
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.total() == bank.initial_total


def test_commit_marker_path(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path, commit_markers=["pg1"]) as tm:
            for i in range(3):
                await transfer(tm, bank, f"m{i}", ["pg1", "maria"])

    asyncio.run(main())
    assert bank.journal_ids()["maria"] == {"m0", "m1", "m2"}
    assert bank.total() == bank.initial_total


def test_shared_log_and_recover(servers: Servers, bank: Bank, tmp_path: Path, log_url: str) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path, log=log_url, node_id="aioshared") as tm:
            await transfer(tm, bank, "s1", ["pg1", "pg2", "maria"])
            report = await tm.recover()
            assert not report.unreachable and report.in_doubt == 0

    asyncio.run(main())
    assert bank.journal_ids()["pg2"] == {"s1"}


def test_unknown_resource_is_a_clear_error(servers: Servers, tmp_path: Path) -> None:
    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            with pytest.raises(ConfigurationError, match="unknown resource"):
                async with tm.transaction() as tx:
                    await tx.execute("nope", "SELECT 1")

    asyncio.run(main())


# A cancellation reaches the task at its next await. Cancelled at before_prepare, the task
# learns it while the prepares run, and the decision is refused. From after_prepare on,
# the protocol passes the decision's fence before its next await (the log write, or the
# marker branch's commit): the transaction is decided, so it commits.
STEPS_BEFORE = ["before_prepare"]
STEPS_AFTER = ["after_prepare", "before_decision", "after_decision", "after_first_commit"]


@pytest.mark.parametrize("step", STEPS_BEFORE + STEPS_AFTER)
@pytest.mark.parametrize("markers", [[], ["pg1"]], ids=["strict", "marker"])
def test_cancelled_at_each_step(
    step: str,
    markers: list[str],
    servers: Servers,
    bank: Bank,
    tmp_path: Path,
    at_step: dict[str, Any],
) -> None:
    """Cancelled at a protocol step: rolled back before the decision, committed after it
    (phase 2 finished all the same); the caller gets CancelledError either way."""
    if step == "before_decision" and markers:
        pytest.skip("the marker path has no logged decision")

    async def main() -> Any:
        async with manager(servers, tmp_path, commit_markers=markers) as tm:
            task = asyncio.ensure_future(transfer(tm, bank, "x", ["pg1", "pg2", "maria"]))
            at_step[step] = task.cancel
            with pytest.raises(asyncio.CancelledError):
                await task
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}
            return tm

    asyncio.run(main())
    present = {r for r, ids in bank.journal_ids().items() if "x" in ids}
    if step in STEPS_AFTER:
        assert present == {"pg1", "pg2", "maria"}
    else:
        assert present == set()
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_cancelled_inside_the_block(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    """Cancelled while a statement runs (a lock wait): that connection is closed, the other
    branches roll back, nothing stays locked."""

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            async with tm.transaction() as holder:
                await holder.execute("maria", f"UPDATE {bank.table} SET bal = bal WHERE id = 3")

                async def blocked() -> None:
                    async with tm.transaction() as tx:
                        await tx.execute("pg1", f"UPDATE {bank.table} SET bal = 0 WHERE id = 3")
                        await tx.execute("maria", f"UPDATE {bank.table} SET bal = 0 WHERE id = 3")

                task = asyncio.ensure_future(blocked())
                await asyncio.sleep(0.3)  # let it reach the lock wait on maria
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.balances()["pg1"][3] == 1000
    assert bank.balances()["maria"][3] == 1000


def test_bad_arguments_are_clear_errors(servers: Servers, tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ConfigurationError, match="node_id"):
            async with manager(servers, tmp_path, node_id="no spaces allowed"):
                pass
        with pytest.raises(ConfigurationError, match="timeout"):
            async with manager(servers, tmp_path, timeout=-1):
                pass
        tm = manager(servers, tmp_path)
        with pytest.raises(XatmError, match="not open"):
            tm.transaction()

    asyncio.run(main())


def test_an_interrupted_one_phase_commit_is_in_doubt(
    servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    """mysql.connector.aio: ``XA COMMIT ... ONE PHASE`` answered 1317 (query interrupted)
    leaves the outcome unknown (TransactionInDoubt), as in the threaded manager; before, it
    was read as a certain no (TransactionRolledBack)."""
    cid: list[int] = []

    async def main() -> None:
        async with manager(servers, tmp_path) as tm:
            async with tm.transaction() as tx:  # the resource is checked
                await tx.execute("maria", "SELECT 1")
            blocked = await asyncio.to_thread(CommitsBlocked, bank.urls["maria"])
            try:
                interrupter = asyncio.ensure_future(
                    asyncio.to_thread(blocked.interrupt, lambda: cid[0] if cid else None)
                )
                with pytest.raises(TransactionInDoubt):
                    async with tm.transaction() as tx:
                        await tx.execute("maria", f"UPDATE {bank.table} SET bal = 0 WHERE id = 1")
                        cid.append((await tx.connection("maria")).connection_id)
                await interrupter
            finally:
                await asyncio.to_thread(blocked.close)
            assert tx.state is TransactionState.IN_DOUBT
            assert tm.in_use == {"pg1": 0, "pg2": 0, "maria": 0}

    asyncio.run(main())
    assert bank.balances()["maria"][1] == 1000  # MariaDB rolled it back, as it happens
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


# -- built like the threaded manager (from a config, the same checked arguments) ------------


def test_the_same_arguments_as_the_threaded_manager() -> None:
    """Every argument of TransactionManager, with the same defaults and annotations: no
    ``**kwargs`` for a typo to hide in."""
    import inspect

    from xatm import TransactionManager

    threaded = inspect.signature(TransactionManager.__init__).parameters
    asyncio_ = inspect.signature(AsyncTransactionManager.__init__).parameters
    assert list(threaded) == list(asyncio_)
    for name, p in threaded.items():
        q = asyncio_[name]
        assert (p.kind, p.default, p.annotation) == (q.kind, q.default, q.annotation), name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in asyncio_.values())


def test_bad_arguments_fail_at_construction(servers: Servers, tmp_path: Path) -> None:
    """A typo is a TypeError and a bad value a ConfigurationError, raised by the constructor
    itself (not later, at ``async with``, from a worker thread); nothing is opened."""
    with pytest.raises(TypeError, match="sweep_intervall"):
        AsyncTransactionManager(servers.urls, tmp_path / "log", "aio", sweep_intervall=3)  # type: ignore[call-arg]
    for bad, match in (
        ({"sweep_interval": 0}, "interval"),
        ({"pool_size": "8"}, "pool_size"),
        ({"commit_markers": ["nowhere"]}, "commit_markers"),
        ({"sagas": ["no.such.module:x"]}, "cannot import"),
        ({"resources": {"bad": "oracle://h/db"}}, "unsupported scheme"),
        ({"fail_fast": "yes"}, "fail_fast"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            manager(servers, tmp_path, **bad)
    assert not (tmp_path / "log").exists()


def test_from_config_and_run_saga(servers: Servers, bank: Bank, tmp_path: Path) -> None:
    """AsyncTransactionManager.from_config reads the file the threaded manager reads (its
    [sweeper] table and sagas included); ``await tm.run_saga`` runs a saga."""
    from tests.support.recovery import write_config

    config = write_config(tmp_path / "xatm.toml", bank.urls, tmp_path / "log", node_id="aiocfg")
    text = config.read_text()
    config.write_text(
        'sagas = ["tests.support.saga_defs:transfer"]\n' + text + "[sweeper]\nenabled = false\n"
    )

    async def main() -> None:
        tm = AsyncTransactionManager.from_config(config)
        async with tm:
            assert tm.node_id == "aiocfg" and tm.sync.sweeper.status().passes == 0
            assert not tm.sync.sweeper.running
            data = {"table": bank.table, "journal": bank.journal, "tid": "as1", "src": 1}
            result = await tm.run_saga("transfer", {**data, "dst": 2, "amt": 5}, key="as1")
            assert result.state == "completed", result

    asyncio.run(main())
    assert bank.balance("pg1", 1) == 995 and bank.balance("maria", 2) == 1005
