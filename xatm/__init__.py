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

from ._audit import AuditEntry
from ._config import Settings, load_config
from ._doctor import Check, DoctorReport
from ._failpoint import NAMES as FAILPOINTS
from ._filelog import Salvage, salvage_log
from ._inspect import (
    BranchInfo,
    Compaction,
    InDoubt,
    InDoubtReport,
    Inspector,
    NodeLog,
    SegmentInfo,
    TransactionInfo,
    UnknownTransaction,
    validate_gtrid,
)
from ._manager import TransactionManager
from ._report import RecoveryAction, RecoveryReport
from ._resolve import Resolution, ResolutionRefused
from ._saga import (
    Saga,
    SagaAbort,
    SagaError,
    SagaInProgress,
    SagaResult,
    SagaTakenOver,
    load_sagas,
)
from ._saga_runner import SagaRecoveryReport, SagaRefused
from ._saga_store import SagaRecord
from ._saga_view import SagaInfo, SagaView, validate_saga_id
from ._sweeper import ResourceBackoff, Sweeper, SweeperSettings, SweeperStatus, sweeper_settings
from ._transaction import BranchState, Transaction, TransactionState
from ._urls import ResourceSpec, parse_url, redact
from ._xid import FORMAT_ID, Xid
from .errors import (
    ConfigurationError,
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

__version__ = "0.1.0"

__all__ = [
    "FAILPOINTS",
    "FORMAT_ID",
    "AuditEntry",
    "BranchInfo",
    "BranchState",
    "Check",
    "Compaction",
    "ConfigurationError",
    "DoctorReport",
    "InDoubt",
    "InDoubtReport",
    "Inspector",
    "LogCorrupt",
    "LogError",
    "LogLocked",
    "NodeLog",
    "RecoveryAction",
    "RecoveryReport",
    "Resolution",
    "ResolutionRefused",
    "ResourceBackoff",
    "ResourceError",
    "ResourceNotFit",
    "ResourceSpec",
    "ResourceUnavailable",
    "Saga",
    "SagaAbort",
    "SagaError",
    "SagaInProgress",
    "SagaInfo",
    "SagaRecord",
    "SagaRecoveryReport",
    "SagaRefused",
    "SagaResult",
    "SagaTakenOver",
    "SagaView",
    "Salvage",
    "SegmentInfo",
    "Settings",
    "Sweeper",
    "SweeperSettings",
    "SweeperStatus",
    "Transaction",
    "TransactionError",
    "TransactionInDoubt",
    "TransactionInfo",
    "TransactionManager",
    "TransactionRolledBack",
    "TransactionState",
    "TransactionTimeout",
    "UnknownTransaction",
    "XatmError",
    "Xid",
    "__version__",
    "load_config",
    "load_sagas",
    "parse_url",
    "redact",
    "salvage_log",
    "sweeper_settings",
    "validate_gtrid",
    "validate_saga_id",
]
