"""An ORM coordinator process for the SQLAlchemy crash tests:
``python -m tests.workers.sa_worker CONFIG``.

It moves ``amount`` from the ledger row (a PostgreSQL engine) to the wallet row (a MariaDB
engine) through one ``tx.session()``, then exits 0 — or dies at the failpoint named by
XATM_FAILPOINT, exactly like a crash. CONFIG is JSON: {"pg_url", "mysql_url", "log",
"node_id", "suffix", "amount"}; the tables are the ones ``tests.integration.test_sqlalchemy`` made.
"""

from __future__ import annotations

import json
import sys

from sqlalchemy import create_engine

from tests.support.sa_models import make_models, sa_url
from xatm import TransactionManager


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    _, ledger_cls, wallet_cls = make_models(cfg["suffix"])
    pg = create_engine(sa_url(cfg["pg_url"]))
    my = create_engine(sa_url(cfg["mysql_url"]))
    resources = {"ledger": pg, "wallet": my}
    with TransactionManager(resources, cfg["log"], cfg["node_id"], timeout=30, sweeper=False) as tm:
        with tm.transaction() as tx:
            session = tx.session(binds={ledger_cls: "ledger", wallet_cls: "wallet"})
            ledger = session.get(ledger_cls, 1)
            wallet = session.get(wallet_cls, 1)
            ledger.balance -= cfg["amount"]
            wallet.balance += cfg["amount"]
            session.add(wallet_cls(id=2, owner="new", balance=cfg["amount"]))
        print(json.dumps({"gtrid": tx.gtrid, "state": tx.state.value}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
