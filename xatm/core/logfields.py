"""The structured fields xatm puts on its log records: ``node``, ``gtrid`` and ``resource``.

Every log call of the library that knows them passes ``extra=log_fields(...)``, so that an
application's own formatter (python-json-logger, structlog's stdlib bridge, a
``%(gtrid)s`` in a format string guarded by a filter) finds them as attributes of the
:class:`logging.LogRecord`. Only the fields that are known are set: a record without a
``gtrid`` attribute is about no one transaction.
"""

from __future__ import annotations

#: the attribute names xatm may set on a LogRecord
FIELDS = ("node", "gtrid", "resource")


def log_fields(
    node: str | None = None, gtrid: str | None = None, resource: str | None = None
) -> dict[str, str]:
    """The ``extra`` mapping of one log call: the given fields that are not None."""
    found = {"node": node, "gtrid": gtrid, "resource": resource}
    return {name: value for name, value in found.items() if value}
