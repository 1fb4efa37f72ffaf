"""The public face of xatm's event layer (``xatm._events``): subscribe to what the
coordinators of this process do, to export it anywhere (docs/operations.md, section 12)."""

from ._events import (
    BranchOp,
    Event,
    FailoverChecked,
    FailoverDetected,
    LogForced,
    ManagerClosed,
    ManagerOpened,
    Phase,
    RecoveryPassFinished,
    Subscriber,
    TransactionFinished,
    listening,
    subscribe,
    unsubscribe,
)

__all__ = [
    "BranchOp",
    "Event",
    "FailoverChecked",
    "FailoverDetected",
    "LogForced",
    "ManagerClosed",
    "ManagerOpened",
    "Phase",
    "RecoveryPassFinished",
    "Subscriber",
    "TransactionFinished",
    "listening",
    "subscribe",
    "unsubscribe",
]
