"""Retention of file logs, as the sweeper and operators see it: kept in
``xatm.log.file.retention`` (the store, ``xatm.log.store``, asks it) and re-exported here."""

from xatm.log.file.retention import (
    DEFAULT_LOG_RETENTION,
    RETIRE_EVERY,
    Retirement,
    last_write,
    retire_logs,
)

__all__ = ["DEFAULT_LOG_RETENTION", "RETIRE_EVERY", "Retirement", "last_write", "retire_logs"]
