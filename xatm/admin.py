"""The operator's API: inspection, manual resolution, the logs, the sweeper, diagnostics.

What an application needs is in :mod:`xatm`; this module holds the types an operator's tools
(the ``xatm`` command, a dashboard, a runbook script) work with::

    from xatm import TransactionManager
    from xatm.admin import Inspector, ResolutionRefused

    with Inspector.from_config("/etc/xatm.toml") as look:
        for row in look.indoubt():
            print(row.gtrid, row.plan)
"""

from ._audit import AuditEntry
from ._deadline import Wait, report_waits
from ._doctor import Check, DoctorReport
from ._failpoint import NAMES as FAILPOINTS
from ._filelog import Salvage, SegmentInfo, salvage_log
from ._gid_forms import gtrid_of
from ._identity import NodeInUse
from ._inspect import (
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
from ._report import RecoveryAction, RecoveryReport
from ._resolve import Resolution, ResolutionRefused
from ._retention import Retirement
from ._saga import SagaTakenOver, load_sagas
from ._saga_runner import SagaRecoveryReport, SagaRefused
from ._saga_store import SagaRecord
from ._saga_view import SagaInfo, SagaView, validate_saga_id
from ._sweeper import ResourceBackoff, Sweeper, SweeperSettings, SweeperStatus, sweeper_settings
from ._urls import ResourceSpec, describe_error, parse_url, redact
from ._xid import FORMAT_ID, Xid

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
    "parse_url",
    "redact",
    "report_waits",
    "salvage_log",
    "sweeper_settings",
    "validate_gtrid",
    "validate_saga_id",
]
