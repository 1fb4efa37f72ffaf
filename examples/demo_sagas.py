"""The saga part of ``make demo``: the same transfer, as a saga of two local transactions.

``transfer`` debits the ledger (PostgreSQL) in one step and credits the wallet (MariaDB) in
the next, each with a compensation, then runs a ``confirm`` step that aborts when the payload
asks it to. Every step and compensation writes its journal row (``<id>`` for the move,
``<id>-r`` for its reversal), so the demo's invariant check covers sagas too. The story:

1. a saga that completes;
2. one whose last step aborts: its two steps are compensated, in reverse;
3. one whose process is killed (SIGKILL) right after its first step committed
   (``XATM_FAILPOINT=saga_after_step``); ``xatm sagas`` shows it running with a dead owner,
   and ``xatm recover`` (a manager that has the saga's definition) finishes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xatm import Saga, SagaAbort, TransactionManager

SAGA_IDS = ("s01", "s02", "s03")
CRASHED = "s03"
REFERENCE = f"{__package__ or 'examples'}.demo_sagas:transfer"


def _ledger(tx: Any, tid: str, account: int, amount: int) -> None:
    tx.execute(
        "ledger", "UPDATE ledger SET balance = balance + %s WHERE account = %s", (amount, account)
    )
    tx.execute(
        "ledger",
        "INSERT INTO ledger_moves (transfer_id, account, amount) VALUES (%s, %s, %s)",
        (tid, account, amount),
    )


def _wallet(tx: Any, tid: str, account: int, amount: int) -> None:
    tx.execute(
        "wallet", "UPDATE wallet SET balance = balance + %s WHERE account = %s", (amount, account)
    )
    tx.execute(
        "wallet",
        "INSERT INTO wallet_moves (transfer_id, account, amount) VALUES (%s, %s, %s)",
        (tid, account, amount),
    )


def debit(tx: Any, d: dict[str, Any]) -> None:
    _ledger(tx, d["tid"], d["src"], -d["amount"])


def refund(tx: Any, d: dict[str, Any]) -> None:
    _ledger(tx, d["tid"] + "-r", d["src"], d["amount"])


def credit(tx: Any, d: dict[str, Any]) -> None:
    _wallet(tx, d["tid"], d["dst"], d["amount"])


def uncredit(tx: Any, d: dict[str, Any]) -> None:
    _wallet(tx, d["tid"] + "-r", d["dst"], -d["amount"])


def confirm(tx: Any, d: dict[str, Any]) -> None:
    if d.get("reject"):
        raise SagaAbort("the fraud check rejects it")
    tx.execute("ledger", "SELECT balance FROM ledger WHERE account = %s", (d["src"],)).close()


transfer = Saga("transfer", backoff=0.02)
transfer.step("debit", action=debit, compensation=refund, resources=["ledger"])
transfer.step("credit", action=credit, compensation=uncredit, resources=["wallet"])
transfer.step("confirm", action=confirm, resources=["ledger"])


def payload(tid: str, src: int, dst: int, amount: int, **extra: Any) -> dict[str, Any]:
    return {"tid": tid, "src": src, "dst": dst, "amount": amount, **extra}


def story(
    config: Path,
    crash_config: Path,
    say: Callable[[str], None],
    run_cli: Callable[..., None],
    timeout: float,
) -> dict[str, str]:
    """Run the three sagas (see the module docstring); their final states, by tid."""
    states: dict[str, str] = {}
    say("the same transfer as a saga: step 'debit' (ledger, PostgreSQL), step 'credit' (wallet,")
    say("MariaDB), step 'confirm'; each step is a local transaction of its own, guarded by a")
    say("barrier row (xatm_barrier) so that it takes effect once; docs/sagas.md")
    with TransactionManager.from_config(config) as tm:
        done = tm.run_saga("transfer", data=payload("s01", 1, 3, 120), key="order-s01")
        states["s01"] = done.state
        say(f"s01: ledger #1 -> wallet #3, 120: {done.state} ({', '.join(done.done)})")
        say(f"     saga id {done.saga_id}, key 'order-s01'")
        again = tm.run_saga("transfer", data=payload("s01", 1, 3, 120), key="order-s01")
        say(f"     the same key again: {again.state}, same saga id, nothing run twice")
        undone = tm.run_saga(
            "transfer", data=payload("s02", 2, 5, 80, reject=True), key="order-s02"
        )
        states["s02"] = undone.state
        say(f"s02: ledger #2 -> wallet #5, 80, rejected by its last step: {undone.state}")
        say(f"     ({undone.error}; compensated in reverse: {', '.join(undone.compensated)})")

    say("s03: ledger #4 -> wallet #1, 60, in a process killed right after its first step")
    say("     (XATM_FAILPOINT=saga_after_step): the ledger is debited, the wallet not yet")
    env = {**os.environ, "XATM_FAILPOINT": "saga_after_step"}
    cmd = [sys.executable, "-m", "examples.demo_sagas", str(crash_config), CRASHED]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the saga's process should have been SIGKILLed: {out!r}")
    say(f"     killed (exit status {child.returncode}); what the operator sees:")
    run_cli("sagas")
    say("")
    say("`xatm recover` finishes it: the owner is dead, the saga's definition is in the")
    say("config (sagas = [...]), so it runs on from where it was: 'credit', then 'confirm'")
    run_cli("recover")
    with TransactionManager.from_config(config) as tm:
        record = tm.sagas.store.find_key("transfer", f"order-{CRASHED}")
        states[CRASHED] = record.state if record is not None else "missing"
        if record is not None:
            run_cli("saga", "show", record.saga_id)
    return states


def crash_child(config: str, tid: str) -> int:
    """The saga process that is killed at its failpoint."""
    with TransactionManager.from_config(config) as tm:
        tm.run_saga("transfer", data=payload(tid, 4, 1, 60), key=f"order-{tid}")
    print("survived the failpoint: XATM_FAILPOINT was not set?", flush=True)
    return 3


if __name__ == "__main__":
    raise SystemExit(crash_child(sys.argv[1], sys.argv[2]))
