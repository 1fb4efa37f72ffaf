"""Saga definitions for the saga tests, the saga worker and the CLI tests (importable as
``tests.support.saga_defs:transfer``): a transfer from ``src`` on pg1 to ``dst`` on maria, then a
``finish`` step that aborts when the payload says so. Every step and compensation also writes
a journal row ``<tid>-<what>`` (a primary key): a step applied twice would fail on it."""

from __future__ import annotations

from typing import Any

from xatm import Saga, SagaAbort


def _move(tx: Any, resource: str, d: dict[str, Any], account: int, delta: int, what: str) -> None:
    tx.execute(resource, f"UPDATE {d['table']} SET bal = bal + %s WHERE id = %s", (delta, account))
    tx.execute(resource, f"INSERT INTO {d['journal']} (tid) VALUES (%s)", (f"{d['tid']}-{what}",))


def debit(tx: Any, d: dict[str, Any]) -> None:
    _move(tx, d.get("from", "pg1"), d, d["src"], -d["amt"], "debit")


def refund(tx: Any, d: dict[str, Any]) -> None:
    _move(tx, d.get("from", "pg1"), d, d["src"], d["amt"], "refund")


def credit(tx: Any, d: dict[str, Any]) -> None:
    _move(tx, d.get("to", "maria"), d, d["dst"], d["amt"], "credit")


def uncredit(tx: Any, d: dict[str, Any]) -> None:
    _move(tx, d.get("to", "maria"), d, d["dst"], -d["amt"], "uncredit")


def finish(tx: Any, d: dict[str, Any]) -> None:
    if d.get("abort"):
        raise SagaAbort("the payload asks to abort")
    tx.execute("pg1", f"INSERT INTO {d['journal']} (tid) VALUES (%s)", (f"{d['tid']}-finish",))


transfer = Saga("transfer", backoff=0.01, max_backoff=0.1)
transfer.step("debit", action=debit, compensation=refund, resources=["pg1"])
transfer.step("credit", action=credit, compensation=uncredit, resources=["maria"])
transfer.step("finish", action=finish, resources=["pg1"])

# one step across two databases: a single XA transaction
both = Saga("both", backoff=0.01, max_backoff=0.1)
both.step(
    "move",
    action=lambda tx, d: (debit(tx, d), credit(tx, d)),
    compensation=lambda tx, d: (refund(tx, d), uncredit(tx, d)),
    resources=["pg1", "maria"],
)
both.step("finish", action=finish, resources=["pg1"])

# one step only: it is also the last, so a crash right after it (``saga_after_step``) comes
# before the one write that notes it and ends the saga
single = Saga("single", backoff=0.01, max_backoff=0.1)
single.step(
    "move",
    action=lambda tx, d: (debit(tx, d), credit(tx, d)),
    compensation=lambda tx, d: (refund(tx, d), uncredit(tx, d)),
    resources=["pg1", "maria"],
)


def fragile_refund(tx: Any, d: dict[str, Any]) -> None:
    """A compensation that fails while the file named by ``d["broken"]`` exists."""
    import os

    if os.path.exists(d["broken"]):
        raise RuntimeError("the refund service is down")
    refund(tx, d)


# a saga whose compensation can be broken on purpose (stuck sagas, for operators)
fragile = Saga("fragile", compensation_attempts=2, backoff=0.01, max_backoff=0.05)
fragile.step("debit", action=debit, compensation=fragile_refund, resources=["pg1"])
fragile.step("finish", action=finish, resources=["pg1"])
