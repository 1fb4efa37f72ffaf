"""The same transfer in an asyncio service (a FastAPI app would open the manager in its
lifespan: see ``xatm.fastapi``)."""

from __future__ import annotations

import psycopg

from xatm.aio import AsyncDBCursor, AsyncTransaction, AsyncTransactionManager


def make_manager(config: str) -> AsyncTransactionManager:
    """Built from the TOML file, like the threaded manager; opened by ``async with``."""
    return AsyncTransactionManager.from_config(config)


async def balance(tx: AsyncTransaction, resource: str, table: str, account: int) -> int:
    cur: AsyncDBCursor = await tx.execute(
        resource, f"SELECT bal FROM {table} WHERE id = %s", (account,)
    )
    row = await cur.fetchone()
    if row is None:
        raise LookupError(f"no account {account} on {resource}")
    return int(row[0])


async def transfer(tm: AsyncTransactionManager, table: str, src: int, dst: int, amount: int) -> int:
    """Retried on a deadlock or serialization failure; returns the ledger's new balance."""

    async def move(tx: AsyncTransaction) -> int:
        left = await balance(tx, "ledger", table, src) - amount
        await tx.execute("ledger", f"UPDATE {table} SET bal = %s WHERE id = %s", (left, src))
        await tx.execute(
            "wallet", f"UPDATE {table} SET bal = bal + %s WHERE id = %s", (amount, dst)
        )
        return left

    return await tm.run(move, retries=3)


async def ledger_server_version(tm: AsyncTransactionManager) -> int:
    async with tm.transaction() as tx:
        conn = await tx.connection("ledger", psycopg.AsyncConnection)
        return conn.info.server_version
