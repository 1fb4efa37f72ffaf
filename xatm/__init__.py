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

from ._failpoint import NAMES as FAILPOINTS
from ._manager import TransactionManager
from ._recovery import RecoveryAction, RecoveryReport
from ._transaction import BranchState, Transaction, TransactionState
from ._urls import ResourceSpec, parse_url, redact
from ._xid import FORMAT_ID, Xid
from .errors import (
    ConfigurationError,
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

__version__ = "0.1.0"

__all__ = [
    "FAILPOINTS",
    "FORMAT_ID",
    "BranchState",
    "ConfigurationError",
    "LogError",
    "LogLocked",
    "RecoveryAction",
    "RecoveryReport",
    "ResourceError",
    "ResourceNotFit",
    "ResourceSpec",
    "ResourceUnavailable",
    "Transaction",
    "TransactionError",
    "TransactionInDoubt",
    "TransactionManager",
    "TransactionRolledBack",
    "TransactionState",
    "TransactionTimeout",
    "XatmError",
    "Xid",
    "__version__",
    "parse_url",
    "redact",
]
