"""The transfer as a FastAPI endpoint (``pip install 'xatm[fastapi]'``): the response is sent
only once the transaction committed; a rollback is a 409, an unreachable database a 503."""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

from xatm.fastapi import ManagerDep, TransactionDep, add_exception_handlers, lifespan

app = FastAPI(lifespan=lifespan(os.environ.get("XATM_CONFIG", "xatm.toml")))
add_exception_handlers(app)
TABLE = "acc"


class Transfer(BaseModel):
    src: int
    dst: int
    amount: int


@app.post("/transfer")
async def transfer(body: Transfer, tx: TransactionDep) -> dict[str, str]:
    debit = f"UPDATE {TABLE} SET bal = bal - %s WHERE id = %s"
    await tx.execute("ledger", debit, (body.amount, body.src))
    credit = f"UPDATE {TABLE} SET bal = bal + %s WHERE id = %s"
    await tx.execute("wallet", credit, (body.amount, body.dst))
    return {"gtrid": tx.gtrid}


@app.get("/indoubt")
async def indoubt(tm: ManagerDep) -> list[str]:
    report = await tm.recover(dry_run=True)
    return [a.gtrid for a in report.actions]
