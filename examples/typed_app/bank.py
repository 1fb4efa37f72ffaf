"""Moving money between a PostgreSQL ledger and a MySQL/MariaDB wallet, threaded.

Everything here is checked by ``mypy --strict``: cursors, rows, the driver's own connection
(psycopg's, where the code needs it) and an ORM session are all typed.
"""

from __future__ import annotations

import psycopg
from sqlalchemy import text

from xatm import DBCursor, Transaction, TransactionManager, TransactionRolledBack


def open_manager(ledger: str, wallet: str, log: str) -> TransactionManager:
    return TransactionManager(
        resources={"ledger": ledger, "wallet": wallet},
        log=log,
        node_id="typed-sync",
        timeout=10.0,
        sweeper=False,
    )


def balance(tx: Transaction, resource: str, table: str, account: int) -> int:
    cur: DBCursor = tx.execute(resource, f"SELECT bal FROM {table} WHERE id = %s", (account,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no account {account} on {resource}")
    return int(row[0])


def move(tx: Transaction, table: str, src: int, dst: int, amount: int) -> None:
    if balance(tx, "ledger", table, src) < amount:
        tx.set_rollback_only("insufficient funds")
    tx.execute("ledger", f"UPDATE {table} SET bal = bal - %s WHERE id = %s", (amount, src))
    tx.execute("wallet", f"UPDATE {table} SET bal = bal + %s WHERE id = %s", (amount, dst))


def transfer(tm: TransactionManager, table: str, src: int, dst: int, amount: int) -> bool:
    """One transfer, retried on a deadlock or serialization failure; False if refused."""
    try:
        tm.run(lambda tx: move(tx, table, src, dst, amount), retries=3)
    except TransactionRolledBack:
        return False
    return True


def ledger_backend_pid(tm: TransactionManager) -> int:
    """The driver's own connection, typed as psycopg's (checked at run time too)."""
    with tm.transaction() as tx:
        conn: psycopg.Connection[tuple[object, ...]] = tx.connection("ledger", psycopg.Connection)
        return conn.info.backend_pid


def total_with_the_orm(tm: TransactionManager, table: str) -> int:
    """A SQLAlchemy session joined to the global transaction."""
    with tm.transaction() as tx:
        session = tx.session(bind="ledger")
        value = session.execute(text(f"SELECT SUM(bal) FROM {table}")).scalar_one()
        return int(value)
