"""A saga process for the saga crash and chaos tests:
``python -m tests.workers.saga_worker MODE CONFIG``.

MODE ``one``: run one saga (``saga``, ``data``, ``key`` from CONFIG), print its result as
JSON, exit 0 (or die at the failpoint named by XATM_FAILPOINT). MODE ``chaos``: run
transfer sagas in several threads until killed or until the deadline; each key (a JSON line
with its payload) is written to the intents file before its saga starts (some keys twice,
also keys of earlier workers: ``again``; ``keyless_rate`` of them run without a key, the
key then only a name in the payload, never submitted again), and ``<key> <state>`` to the acks file
once ``run_saga`` returned (both straight to the OS: a SIGKILL loses nothing written).

CONFIG is JSON: {"urls": {...}, "log": DIR or URL, "node_id": ..., "table": ...,
"journal": ..., plus per mode: "saga", "data", "key" (one); "threads", "seconds", "seed",
"accounts", "intents", "acks", "abort_rate", "repeat_rate", "keyless_rate" (chaos)}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from typing import Any

from tests.support import saga_defs
from tests.workers.worker import run_threads
from xatm import TransactionManager

SAGAS = [saga_defs.transfer, saga_defs.both, saga_defs.single]


def manager(cfg: dict[str, Any], **kwargs: Any) -> TransactionManager:
    return TransactionManager(
        cfg["urls"], cfg["log"], cfg["node_id"], timeout=5, sagas=SAGAS, **kwargs
    )


def one(cfg: dict[str, Any]) -> int:
    with manager(cfg, sweeper=False) as tm:
        result = tm.run_saga(cfg["saga"], data=cfg["data"], key=cfg.get("key"))
        print(json.dumps(result.to_json()), flush=True)
    return 0


def chaos(cfg: dict[str, Any]) -> int:
    rng = random.Random(cfg["seed"])
    accounts = int(cfg["accounts"])
    deadline = time.monotonic() + float(cfg["seconds"])
    intents = os.open(cfg["intents"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    acks = os.open(cfg["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    tm = manager(cfg, sweep_interval=0.5)
    tm.recover()
    counter = iter(range(10**9))
    lock = threading.Lock()
    # keys to submit again: from this worker, and from earlier (killed) workers
    recent: list[tuple[str, dict[str, Any]]] = [(k, d) for k, d in cfg.get("again", [])]

    def work(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
                again = (
                    recent[r.randrange(len(recent))]
                    if recent and r.random() < float(cfg["repeat_rate"])
                    else None
                )
            keyless = False
            if again is not None:
                key, data = again
            else:
                key = f"{cfg['node_id']}-{n}"
                data = {
                    "table": cfg["table"],
                    "journal": cfg["journal"],
                    "tid": key,
                    "src": r.randint(1, accounts),
                    "dst": r.randint(1, accounts),
                    "amt": r.randint(1, 9),
                    "abort": r.random() < float(cfg["abort_rate"]),
                }
                # without a key (its record in the process's journal): never submitted again
                keyless = r.random() < float(cfg.get("keyless_rate", 0.0))
                if not keyless:
                    with lock:
                        recent.append((key, data))
                        del recent[:-20]
            body = {"key": key, "data": data, **({"keyless": True} if keyless else {})}
            line = json.dumps(body, separators=(",", ":"))
            os.write(intents, (line + "\n").encode())
            try:
                result = tm.run_saga("transfer", data=data, key=None if keyless else key, wait=5)
            except Exception:  # every failure is fine: it just is not acked
                time.sleep(0.05)
                continue
            os.write(acks, f"{key} {result.state}\n".encode())

    run_threads(int(cfg["threads"]), work, rng)
    tm.close()
    return 0


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        cfg = json.load(f)
    return one(cfg) if mode == "one" else chaos(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
