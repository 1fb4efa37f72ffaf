"""The saga records' storage, as the sagas see it: kept in ``xatm.log.saga_state`` and
``xatm.log.saga_record`` (next to the coordinator log, served by the node's store,
``xatm.log.store``) and re-exported here."""

from xatm.log.saga_record import (
    FINAL_STATES,
    SagaRecord,
    file_id,
    key_hash,
    name_of,
    new_saga_id,
)
from xatm.log.saga_state import (
    DONE_DIR,
    SAGA_DIR,
    Claim,
    FileClaim,
    FileSagaStore,
    PostgresSagaStore,
    SagaStore,
    SharedClaim,
)

__all__ = [
    "DONE_DIR",
    "FINAL_STATES",
    "SAGA_DIR",
    "Claim",
    "FileClaim",
    "FileSagaStore",
    "PostgresSagaStore",
    "SagaRecord",
    "SagaStore",
    "SharedClaim",
    "file_id",
    "key_hash",
    "name_of",
    "new_saga_id",
]
