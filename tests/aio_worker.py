"""A coordinator process on the asyncio API, for its crash matrix:
``python -m tests.aio_worker transfer CONFIG``.

The same config and output as ``tests.worker``'s ``transfer`` mode: one transfer over the
given resources with :class:`xatm.aio.AsyncTransactionManager`, then exit 0, or die at the
failpoint named by XATM_FAILPOINT.
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


def main(argv: list[str]) -> int:
    mode, path = argv[1], argv[2]
    with open(path) as f:
        cfg = json.load(f)
    if mode != "transfer":
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return asyncio.run(one_transfer(cfg))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
