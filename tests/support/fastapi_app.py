"""A FastAPI app on xatm.fastapi, served by uvicorn in tests/integration/test_fastapi.py.

Its config file is ``$XATM_CONFIG`` (resources pg1, maria and an unreachable ``dead``);
``$APP_TABLE`` is the bank's table; ``$APP_CID`` a file where the in-doubt endpoint writes
its MariaDB connection id before its commit.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException

from xatm.fastapi import (
    ManagerDep,
    SyncTransactionDep,
    TransactionDep,
    add_exception_handlers,
    lifespan,
)

app = FastAPI(lifespan=lifespan(os.environ["XATM_CONFIG"], drain=5))
add_exception_handlers(app)
T = os.environ["APP_TABLE"]


@app.post("/transfer")
async def transfer(tx: TransactionDep, amount: int, tid: str, rollback: bool = False) -> Any:
    await tx.execute("pg1", f"UPDATE {T} SET bal = bal - %s WHERE id = 1", (amount,))
    await tx.execute("maria", f"UPDATE {T} SET bal = bal + %s WHERE id = 1", (amount,))
    await tx.execute("pg1", f"INSERT INTO {T}_j (tid) VALUES (%s)", (tid,))
    if rollback:
        tx.set_rollback_only("the endpoint asked for it")
    return {"gtrid": tx.gtrid}


@app.post("/refuse")
async def refuse(tx: TransactionDep) -> Any:
    await tx.execute("pg1", f"UPDATE {T} SET bal = 0 WHERE id = 2")
    raise HTTPException(status_code=422, detail="refused by the endpoint")


@app.post("/sync-transfer")
def sync_transfer(tx: SyncTransactionDep, amount: int, tid: str) -> Any:
    tx.execute("pg1", f"UPDATE {T} SET bal = bal - %s WHERE id = 3", (amount,))
    tx.execute("maria", f"UPDATE {T} SET bal = bal + %s WHERE id = 3", (amount,))
    tx.execute("maria", f"INSERT INTO {T}_j (tid) VALUES (%s)", (tid,))
    return {"gtrid": tx.gtrid}


@app.post("/slow")
async def slow(tx: TransactionDep, tid: str) -> Any:
    await asyncio.sleep(1.5)  # the client has gone by now
    await tx.execute("pg1", f"INSERT INTO {T}_j (tid) VALUES (%s)", (tid,))
    return {"gtrid": tx.gtrid}


@app.post("/down")
async def down(tx: TransactionDep) -> Any:
    await tx.execute("dead", "SELECT 1")
    return {}


@app.post("/doubt")
async def doubt(tx: TransactionDep) -> Any:
    await tx.execute("maria", f"UPDATE {T} SET bal = 0 WHERE id = 4")
    conn: Any = await tx.connection("maria")
    Path(os.environ["APP_CID"]).write_text(str(conn.connection_id))
    return {"gtrid": tx.gtrid}


@app.get("/node")
async def node(tm: ManagerDep) -> Any:
    return {"node_id": tm.node_id}
