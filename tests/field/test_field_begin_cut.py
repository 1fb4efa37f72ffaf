"""A branch's begin whose connection is cut while the server still holds the branch's xid
for the lost session (MariaDB ends a session some time after its client is gone), on real
servers: the begin tried again on a new connection finds the xid in use (XAER_DUPID) and
is tried again, briefly, until the server let it go, instead of failing the transaction
(seen in CI as a saga compensated after a cut at its step's begin)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from tests.support import Bank, MakeTM, connect, run
from tests.support.omission import BlackholeProxy
from xatm.aio import AsyncTransactionManager
from xatm.core.xid import Xid, branch_xid
from xatm.participants.mysql.statements import end_statement, start_statement


def test_a_begin_tried_again_waits_until_the_lost_sessions_xid_is_free(
    make_tm: MakeTM, bank: Bank
) -> None:
    proxy = BlackholeProxy(bank.urls["maria"])
    holder = connect(bank.urls["maria"])  # stands for the lost session the server still ends
    try:
        tm = make_tm(resources={**bank.urls, "maria": proxy.url}, sweeper=False, timeout=10)

        def transfer(tx: object) -> None:
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")  # type: ignore[attr-defined]
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")  # type: ignore[attr-defined]

        with tm.transaction() as tx:  # a pooled connection through the proxy
            transfer(tx)
        with tm.transaction() as tx:
            xid = branch_xid(tx.gtrid, "maria")
            run(holder, start_statement(xid))

            def let_go() -> None:
                run(holder, end_statement(xid))
                run(holder, f"XA ROLLBACK {xid.to_mysql()}")

            released = threading.Timer(1.0, let_go)  # the cut itself takes 0.3 s
            released.start()
            proxy.cut_after_next_request(match=b"XA START")
            transfer(tx)  # cut, then XAER_DUPID until the xid is let go, then begun
        released.join()
        assert proxy.cuts == 1
        assert bank.balance("maria") == 1002 and bank.balance("pg1") == 998
        assert bank.total() == bank.initial_total
        assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    finally:
        proxy.close()
        holder.close()


def test_the_asyncio_manager_waits_the_same(bank: Bank, tmp_path: Path) -> None:
    proxy = BlackholeProxy(bank.urls["maria"])
    holder = connect(bank.urls["maria"])
    credit = f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1"
    debit = f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1"

    def let_go(xid: Xid) -> None:
        run(holder, end_statement(xid))
        run(holder, f"XA ROLLBACK {xid.to_mysql()}")

    async def main() -> None:
        tm = AsyncTransactionManager(
            resources={**bank.urls, "maria": proxy.url},
            log=str(tmp_path / "alog"),
            node_id="begincutaio",
            timeout=10,
            sweeper=False,
        )
        async with tm:
            async with tm.transaction() as tx:  # a pooled connection through the proxy
                await tx.execute("maria", credit)
                await tx.execute("pg1", debit)
            async with tm.transaction() as tx:
                xid = branch_xid(tx.gtrid, "maria")
                run(holder, start_statement(xid))
                asyncio.get_running_loop().call_later(1.0, let_go, xid)
                proxy.cut_after_next_request(match=b"XA START")
                await tx.execute("maria", credit)  # cut, then XAER_DUPID until let go
                await tx.execute("pg1", debit)

    try:
        asyncio.run(main())
        assert proxy.cuts == 1
        assert bank.balance("maria") == 1002 and bank.balance("pg1") == 998
        assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    finally:
        proxy.close()
        holder.close()
