"""A coordinator process on the asyncio API: ``python -m tests.workers.aio_worker MODE CONFIG``.

``transfer`` (its crash matrix): the same config and output as ``tests.workers.worker``'s
``transfer`` mode: one transfer over the given resources with
:class:`xatm.aio.AsyncTransactionManager`, then exit 0, or die at the failpoint named by
XATM_FAILPOINT.

``shutdown``: ``count`` transfers at once, and ``main`` returns after ``delay`` seconds
without waiting for them, so that ``asyncio.run()`` cancels whatever is left at its shutdown
(at any await: a statement, a prepare, the log's fsync, phase 2). With ``close`` the
manager is closed first (``async with``), under the transactions still running. Each
transfer prints ``{"tid", "resources", "state"}`` as it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from xatm.aio import AsyncTransactionManager


async def one_transfer(cfg: dict[str, Any]) -> int:
    resources: list[str] = cfg["resources"]
    n = len(resources)
    account = int(cfg.get("account", 1))
    legs = [(resources[0], account, -10 * (n - 1))] + [(r, account, 10) for r in resources[1:]]
    async with AsyncTransactionManager(
        cfg["urls"],
        cfg["log"],
        cfg["node_id"],
        timeout=cfg.get("timeout", 30),
        commit_markers=cfg.get("commit_markers", []),
        sweeper=False,
    ) as tm:
        async with tm.transaction(timeout=cfg.get("tx_timeout")) as tx:
            for resource, acct, delta in legs:
                await tx.execute(
                    resource,
                    f"UPDATE {cfg['table']} SET bal = bal + %s WHERE id = %s",
                    (delta, acct),
                )
            for resource in sorted({leg[0] for leg in legs}):
                await tx.execute(
                    resource, f"INSERT INTO {cfg['journal']} (tid) VALUES (%s)", (cfg["tid"],)
                )
        print(json.dumps({"gtrid": tx.gtrid, "state": tx.state.value}), flush=True)
    return 0


async def shutdown(cfg: dict[str, Any]) -> int:
    # transfers of one account over several databases can deadlock across them (no server
    # sees the cycle): the transaction timeout ends it, and bounds the close's drain
    tm = AsyncTransactionManager(
        cfg["urls"], cfg["log"], cfg["node_id"], sweeper=False, timeout=cfg.get("timeout", 30)
    )
    await tm.open()
    async with tm.transaction() as tx:  # every resource checked and pooled before the clock
        for r in cfg["urls"]:
            await tx.execute(r, "SELECT 1")

    async def transfer(tid: str, resources: list[str], account: int) -> None:
        n = len(resources)
        tx = tm.transaction()
        try:
            async with tx:
                await tx.execute(
                    resources[0],
                    f"UPDATE {cfg['table']} SET bal = bal - %s WHERE id = %s",
                    (10 * (n - 1), account),
                )
                for r in resources[1:]:
                    await tx.execute(
                        r, f"UPDATE {cfg['table']} SET bal = bal + 10 WHERE id = %s", (account,)
                    )
                for r in resources:
                    await tx.execute(r, f"INSERT INTO {cfg['journal']} (tid) VALUES (%s)", (tid,))
        finally:
            line = {"tid": tid, "resources": resources, "state": tx.state.value}
            print(json.dumps(line), flush=True)

    tasks = [
        asyncio.ensure_future(transfer(t["tid"], t["resources"], t["account"]))
        for t in cfg["transfers"]
    ]
    await asyncio.sleep(cfg["delay"])
    if cfg["close"]:
        await tm.close()  # under the transactions still running
    _left.extend(tasks)  # left running (referenced): asyncio.run() cancels them
    return 0


_left: list[asyncio.Future[None]] = []


def main(argv: list[str]) -> int:
    mode, path = argv[1], argv[2]
    with open(path) as f:
        cfg = json.load(f)
    if mode == "transfer":
        return asyncio.run(one_transfer(cfg))
    if mode == "shutdown":
        return asyncio.run(shutdown(cfg))
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
