"""A saga whose second step calls an outside service, deduplicated by the step's key."""

from __future__ import annotations

from typing import Any, TypedDict

from xatm import Saga, SagaTransaction


class Order(TypedDict):
    table: str
    account: int
    amount: int


def charge_card(idempotency_key: str, amount: int) -> None:
    """An outside service that deduplicates on the key it is given (a stand-in)."""


def debit(tx: SagaTransaction, data: Order) -> None:
    tx.execute(
        "ledger",
        f"UPDATE {data['table']} SET bal = bal - %s WHERE id = %s",
        (data["amount"], data["account"]),
    )


def refund(tx: SagaTransaction, data: Order) -> None:
    tx.execute(
        "ledger",
        f"UPDATE {data['table']} SET bal = bal + %s WHERE id = %s",
        (data["amount"], data["account"]),
    )


def charge(tx: SagaTransaction, data: Order) -> None:
    charge_card(tx.idempotency_key, data["amount"])  # a str: no assert needed
    tx.execute("wallet", f"UPDATE {data['table']} SET bal = bal + 0 WHERE id = %s", (1,))


def build() -> Saga:
    checkout = Saga("checkout")
    checkout.step("debit", action=debit, compensation=refund, resources=["ledger"])
    checkout.step("charge", action=charge, resources=["wallet"])
    return checkout


def order(table: str, account: int, amount: int) -> dict[str, Any]:
    return dict(Order(table=table, account=account, amount=amount))
