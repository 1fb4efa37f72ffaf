"""What ``xatm doctor`` checks of a MySQL/MariaDB resource beyond 2PC fitness (the
adapter's ``wait_findings``): InnoDB's lock waits bounded by the transaction timeout."""

from __future__ import annotations

from typing import Any

from xatm.core.participant import Finding


def scalar(conn: Any, sql: str) -> Any:
    """The first column of the first row of ``sql`` (None if it returns no row)."""
    cur = conn.cursor()
    try:
        cur.execute(sql)
        row = cur.fetchone()
    finally:
        cur.close()
    return None if row is None else row[0]


def _advice(check: str, detail: str) -> Finding:
    return Finding(check, True, detail, advice=True)


def wait_findings(conn: Any, timeout: float | None) -> list[Finding]:
    """InnoDB bounds every lock wait: by no more than the transaction timeout?"""
    wait = float(scalar(conn, "SELECT @@innodb_lock_wait_timeout"))
    if timeout is not None and wait > timeout:
        return [
            _advice(
                "lock-timeout",
                f"innodb_lock_wait_timeout is {wait:g} s, above the transaction timeout"
                f" ({timeout:g} s): a statement may still wait for a lock after its"
                f" transaction ran out of time; set it to at most {int(timeout)}"
                f" (SET GLOBAL innodb_lock_wait_timeout = {int(timeout)}, and in the"
                " server's configuration)",
            )
        ]
    return [Finding("lock-timeout", True, f"innodb_lock_wait_timeout = {wait:g} s")]
