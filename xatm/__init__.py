"""xatm: atomic commit across PostgreSQL and MySQL/MariaDB databases.

    from xatm import TransactionManager

    tm = TransactionManager(
        resources={"ledger": "postgresql://app@db1/ledger", "wallet": "mysql://app@db2/wallet"},
        log="/var/lib/xatm",
        node_id="api-1",
    )
    with tm.transaction() as tx:
        tx.execute("ledger", "UPDATE acc SET bal = bal - %s WHERE id = %s", (10, 1))
        tx.execute("wallet", "UPDATE acc SET bal = bal + %s WHERE id = %s", (10, 2))

Leaving the block commits every branch or none. See docs/protocol.md for how.
"""

import importlib.util
import os

from xatm.coordinator.manager import TransactionManager
from xatm.core import events as _events
from xatm.core.config import Settings, load_config
from xatm.core.dbapi import DBConnection, DBCursor
from xatm.core.report import RecoveryReport
from xatm.core.steps import BranchState
from xatm.errors import (
    ConfigurationError,
    IdentityNotHeld,
    LogCorrupt,
    LogError,
    LogLocked,
    ResourceError,
    ResourceNotFit,
    ResourceUnavailable,
    TransactionError,
    TransactionInDoubt,
    TransactionRolledBack,
    TransactionTimeout,
    XatmError,
)
from xatm.sagas.barrier import SagaBarrierError
from xatm.sagas.definition import Saga, SagaAbort, SagaError, SagaInProgress, SagaResult
from xatm.transactions.transaction import SagaTransaction, Transaction, TransactionState

__version__ = "0.1.0"


def _install_prometheus() -> None:
    """Install the Prometheus collector in the default registry when the first manager is
    built, if prometheus_client is installed (``XATM_PROMETHEUS=0`` turns that off)."""
    if os.environ.get("XATM_PROMETHEUS", "").strip().lower() in ("0", "off", "false", "no"):
        return
    if importlib.util.find_spec("prometheus_client") is None:
        return
    from xatm import prometheus

    prometheus.autoinstall()


_events.on_first_manager(_install_prometheus)

__all__ = [
    "BranchState",
    "ConfigurationError",
    "DBConnection",
    "DBCursor",
    "IdentityNotHeld",
    "LogCorrupt",
    "LogError",
    "LogLocked",
    "RecoveryReport",
    "ResourceError",
    "ResourceNotFit",
    "ResourceUnavailable",
    "Saga",
    "SagaAbort",
    "SagaBarrierError",
    "SagaError",
    "SagaInProgress",
    "SagaResult",
    "SagaTransaction",
    "Settings",
    "Transaction",
    "TransactionError",
    "TransactionInDoubt",
    "TransactionManager",
    "TransactionRolledBack",
    "TransactionState",
    "TransactionTimeout",
    "XatmError",
    "__version__",
    "load_config",
]
