"""A coordinator process for the crash and chaos tests:
``python -m tests.workers.worker MODE CONFIG``.

MODE ``transfer``: one transfer over the given resources, then exit 0 (or die at the failpoint
named by XATM_FAILPOINT). MODE ``chaos``: transfers in several threads until killed or until
the deadline; every transfer is announced in the intents file before it starts and written to
the acks file once ``commit`` returned (both written straight to the OS, so a SIGKILL loses
nothing that was written).

CONFIG is JSON: {"urls": {...}, "log": DIR, "node_id": ..., "table": ..., "journal": ...,
plus per mode: "resources", "tid" (transfer) or "threads", "seconds", "seed", "accounts",
"intents", "acks" (chaos); optional in chaos: "sweep_interval" (the manager's sweeper),
"tid_prefix" (transfer ids, default the node_id: two processes of one node_id need two),
"calls" (a file to which each transaction's duration in seconds is appended), "timeout"
(the manager's, default 5)}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from xatm import TransactionManager, XatmError


def apply_transfer(
    tx: Any, cfg: dict[str, Any], legs: list[tuple[str, int, int]], tid: str
) -> None:
    """legs: (resource, account, delta); deltas sum to zero."""
    for resource, account, delta in legs:
        tx.execute(
            resource, f"UPDATE {cfg['table']} SET bal = bal + %s WHERE id = %s", (delta, account)
        )
    for resource in sorted({leg[0] for leg in legs}):
        tx.execute(resource, f"INSERT INTO {cfg['journal']} (tid) VALUES (%s)", (tid,))


def one_transfer(cfg: dict[str, Any]) -> int:
    resources: list[str] = cfg["resources"]
    n = len(resources)
    account = int(cfg.get("account", 1))
    legs = [(resources[0], account, -10 * (n - 1))] + [(r, account, 10) for r in resources[1:]]
    markers = cfg.get("commit_markers", [])
    with TransactionManager(
        cfg["urls"],
        cfg["log"],
        cfg["node_id"],
        timeout=cfg.get("timeout", 30),
        commit_markers=markers,
        sweeper=False,
    ) as tm:
        with tm.transaction(timeout=cfg.get("tx_timeout")) as tx:
            apply_transfer(tx, cfg, legs, cfg["tid"])
        print(json.dumps({"gtrid": tx.gtrid, "state": tx.state.value}), flush=True)
    return 0


def chaos(cfg: dict[str, Any]) -> int:
    rng = random.Random(cfg["seed"])
    names = sorted(cfg["urls"])
    accounts = int(cfg["accounts"])
    deadline = time.monotonic() + float(cfg["seconds"])
    intents = os.open(cfg["intents"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    acks = os.open(cfg["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    extra = {k: cfg[k] for k in ("sweep_interval", "lock_timeout") if k in cfg}
    tm = TransactionManager(
        cfg["urls"],
        cfg["log"],
        cfg["node_id"],
        timeout=cfg.get("timeout", 5),
        commit_markers=cfg.get("commit_markers", []),
        **extra,
    )
    tm.recover()
    counter = iter(range(10**9))
    lock = threading.Lock()
    calls = (
        os.open(cfg["calls"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if "calls" in cfg
        else None
    )

    def took(started: float) -> None:
        """Note how long one transaction took (the ``calls`` file: one line each)."""
        if calls is not None:
            os.write(calls, f"{time.monotonic() - started:.3f}\n".encode())

    def work(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            tid = f"{cfg.get('tid_prefix', cfg['node_id'])}-{n}"
            k = 3 if r.random() < 0.25 else 2
            chosen = r.sample(names, k)
            amount = r.randint(1, 9)
            legs = [(chosen[0], r.randint(1, accounts), -amount * (k - 1))]
            legs += [(res, r.randint(1, accounts), amount) for res in chosen[1:]]
            os.write(intents, f"{tid} {','.join(sorted(chosen))}\n".encode())
            started = time.monotonic()
            try:
                with tm.transaction() as tx:
                    apply_transfer(tx, cfg, legs, tid)
            except (XatmError, Exception):  # every failure is fine: it just is not acked
                took(started)
                time.sleep(0.05)
                continue
            took(started)
            os.write(acks, f"{tid}\n".encode())

    run_threads(int(cfg["threads"]), work, rng)
    tm.close()
    return 0


def run_threads(n: int, work: Callable[[int], None], rng: random.Random) -> None:
    """Run ``work(seed)`` on ``n`` threads, each with its own seed, until all have ended."""
    threads = [
        threading.Thread(target=work, args=(rng.randrange(1 << 30),), daemon=True) for _ in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        cfg = json.load(f)
    if mode == "transfer":
        return one_transfer(cfg)
    return chaos(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
