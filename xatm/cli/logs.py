"""What the ``xatm`` command writes on stderr: log records and notices, as text or JSON lines.

``--log-format text`` (default): ``2025-01-31T12:00:00.123Z xatm: WARNING: message``, one
line per record (a message's line breaks become `` | ``; an exception is appended as
``: Type: message``, its traceback only with ``XATM_DEBUG=1``). ``--log-format json`` (or
``XATM_LOG_FORMAT=json``): one JSON object per line with ``time``, ``level``, ``logger``,
``message``, ``node``, ``gtrid``, ``resource`` (null when the record is not about one),
and ``exception`` (``Type: message``) and ``traceback`` when it carries one. The command's
own notices (``xatm sweep: stopping``, warnings, the one-line error of a failed command) go
the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import traceback
from typing import Any

import click

from xatm.admin import redact

FORMATS = ("text", "json")

#: the format chosen for this command: ``text`` or ``json``
_format = "text"
#: the node_id of the command's own manager (or the config's): a record without one gets it
_node: str | None = None


def _utc(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def one_line(text: str) -> str:
    """``text`` with its line breaks as `` | `` (a driver's DETAIL and HINT lines)."""
    return " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _exception(record: logging.LogRecord) -> tuple[str | None, str | None]:
    """(``Type: message`` on one line, the traceback) of the record's exception, if any."""
    info = record.exc_info
    if not info or info[1] is None:
        return None, None
    error = info[1]
    head = one_line(redact(f"{type(error).__name__}: {error}"))
    tb = redact("".join(traceback.format_exception(*info)))
    return head, tb


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        head, tb = _exception(record)
        data: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "node": getattr(record, "node", None) or _node,
            "gtrid": getattr(record, "gtrid", None),
            "resource": getattr(record, "resource", None),
        }
        if head is not None:
            data["exception"] = head
            data["traceback"] = tb
        return json.dumps(data, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<UTC time> xatm: LEVEL: message``, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_utc(record.created)} xatm: {record.levelname}: {one_line(record.getMessage())}"
        head, tb = _exception(record)
        if head is not None:
            text += f": {head}"
            if os.environ.get("XATM_DEBUG") and tb:
                text += "\n" + tb.rstrip()
        return redact(text)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(verbose: int, log_format: str) -> None:
    """Log the ``xatm`` logger's records to stderr in ``log_format``, at ERROR (``-v``:
    INFO, ``-vv``: DEBUG)."""
    global _format
    _format = log_format if log_format in FORMATS else "text"
    logger = logging.getLogger("xatm")
    for old in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(old)
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if _format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.ERROR)


def set_node(node: str | None) -> None:
    """The node_id a record that names none is attributed to (the command's own)."""
    global _node
    _node = node


def is_json() -> bool:
    return _format == "json"


def notice(
    message: str, level: int = logging.INFO, *, text: str | None = None, **fields: str | None
) -> None:
    """A message of the command itself, shown whatever the log level: ``text`` (default
    ``message``) as it is in the text format, a JSON line (logger ``xatm.cli``) of
    ``message`` in the JSON format."""
    if _format != "json":
        click.echo(message if text is None else text, err=True)
        return
    record = logging.LogRecord("xatm.cli", level, "", 0, message, None, None)
    for name, value in fields.items():
        setattr(record, name, value)
    click.echo(JsonFormatter().format(record), err=True)
