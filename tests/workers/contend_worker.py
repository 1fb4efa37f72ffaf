"""A coordinator that keeps many threads waiting on one row:
``python -m tests.workers.contend_worker CONFIG``.

Every thread runs, until the process is killed, transactions that update row ``account`` on
each resource of CONFIG's ``urls`` (in name order). When an in-doubt branch holds that row,
every thread's connection waits on its lock; a failed transaction (lock timeout, no free
connection) is simply tried again, so the threads keep their connections busy.

CONFIG is JSON: {"urls": {...}, "log": DIR, "node_id": ..., "table": ..., "threads": N,
"timeout": seconds, "account": id}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from xatm import TransactionManager


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg: dict[str, Any] = json.load(f)
    tm = TransactionManager(
        cfg["urls"], cfg["log"], cfg["node_id"], timeout=cfg["timeout"], sweeper=False
    )
    names = sorted(cfg["urls"])

    def work() -> None:
        while True:
            try:
                with tm.transaction() as tx:
                    for name in names:
                        tx.execute(
                            name,
                            f"UPDATE {cfg['table']} SET bal = bal + 0 WHERE id = %s",
                            (cfg["account"],),
                        )
            except Exception:  # lock timeout, too many clients...: try again
                time.sleep(0.05)

    for _ in range(int(cfg["threads"])):
        threading.Thread(target=work, daemon=True).start()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
