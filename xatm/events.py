"""The public face of xatm's event layer (``xatm.core.events``): subscribe to what the
coordinators of this process do, to export it anywhere (docs/operations.md, section 12)."""

from xatm.core.events import (
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
