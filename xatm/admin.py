"""The operator's API: inspection, manual resolution, the logs, the sweeper, diagnostics.

What an application needs is in :mod:`xatm`; this module holds the types an operator's tools
(the ``xatm`` command, a dashboard, a runbook script) work with::

    from xatm import TransactionManager
    from xatm.admin import Inspector, ResolutionRefused

    with Inspector.from_config("/etc/xatm.toml") as look:
        for row in look.indoubt():
            print(row.gtrid, row.plan)
"""

from xatm.core.deadline import Wait, report_waits
from xatm.core.failpoint import NAMES as FAILPOINTS
from xatm.core.report import RecoveryAction, RecoveryReport
from xatm.core.urls import ResourceSpec, describe_error, log_is_shared, parse_url, redact
from xatm.core.xid import FORMAT_ID, Xid
from xatm.log.audit import AuditEntry
from xatm.log.file import Salvage, SegmentInfo, salvage_log
from xatm.node.identity import NodeInUse
from xatm.ops.doctor import Check, DoctorReport
from xatm.ops.gid_forms import gtrid_of
from xatm.ops.inspect import (
    BranchInfo,
    Compaction,
    InDoubt,
    InDoubtReport,
    Inspector,
    NodeLog,
    TransactionInfo,
    UnknownTransaction,
    validate_gtrid,
)
from xatm.ops.resolve import Resolution, ResolutionRefused
from xatm.recovery.retention import Retirement
from xatm.recovery.sweeper import (
    ResourceBackoff,
    Sweeper,
    SweeperSettings,
    SweeperStatus,
    sweeper_settings,
)
from xatm.sagas.definition import SagaTakenOver, load_sagas
from xatm.sagas.runner import SagaRecoveryReport, SagaRefused
from xatm.sagas.store import SagaRecord
from xatm.sagas.view import SagaInfo, SagaView, validate_saga_id

__all__ = [
    "FAILPOINTS",
    "FORMAT_ID",
    "AuditEntry",
    "BranchInfo",
    "Check",
    "Compaction",
    "DoctorReport",
    "InDoubt",
    "InDoubtReport",
    "Inspector",
    "NodeInUse",
    "NodeLog",
    "RecoveryAction",
    "RecoveryReport",
    "Resolution",
    "ResolutionRefused",
    "ResourceBackoff",
    "ResourceSpec",
    "Retirement",
    "SagaInfo",
    "SagaRecord",
    "SagaRecoveryReport",
    "SagaRefused",
    "SagaTakenOver",
    "SagaView",
    "Salvage",
    "SegmentInfo",
    "Sweeper",
    "SweeperSettings",
    "SweeperStatus",
    "TransactionInfo",
    "UnknownTransaction",
    "Wait",
    "Xid",
    "describe_error",
    "gtrid_of",
    "load_sagas",
    "log_is_shared",
    "parse_url",
    "redact",
    "report_waits",
    "salvage_log",
    "sweeper_settings",
    "validate_gtrid",
    "validate_saga_id",
]
