"""Coordinator log records and their framing on disk.

A log holds three kinds of record (presumed abort: an abort is never logged by the
coordinator):

``COMMIT``  the global commit decision for one gtrid, with the names of the resources that
            hold a prepared branch (and the PostgreSQL transaction id of each PostgreSQL
            branch). Forced to disk before any branch is committed.
``END``     every branch of that gtrid is committed; the COMMIT record is no longer needed.
            Written lazily: losing it only makes recovery check the branches once more.
``ABORT``   an operator rolled back that gtrid by hand although its COMMIT decision is
            logged (``xatm rollback --force``: a heuristic outcome). Forced to disk before
            any branch is rolled back, it overrules the COMMIT: the decision is no longer
            pending (recovery rolls back what is left), and it is not retained (a branch a
            failover brings back prepared is not committed from it).

On disk every record is framed as ``<length:u32 LE><crc32:u32 LE><payload>``, where the
payload is compact JSON. A frame whose length is 0, over :data:`MAX_PAYLOAD` or runs past the
end of the data, whose CRC does not match, or whose payload is not a record is *bad*: reading
stops there. Whether a bad frame is a torn tail or corruption is decided by the file log
(``xatm.log.file``), with :func:`next_good_frame`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

HEADER = struct.Struct("<II")
#: a frame longer than this is treated as corruption, not allocated
MAX_PAYLOAD = 1 << 20

RecordKind = Literal["COMMIT", "END", "ABORT"]

#: compact JSON (``json.dumps`` with these separators would build an encoder per call)
_JSON = json.JSONEncoder(separators=(",", ":"))
#: how every END payload :meth:`LogRecord.encode` writes begins and ends (read without a
#: JSON parse: half of a log's frames are ENDs)
_END_HEAD, _END_TAIL = b'{"k":"END","g":"', b'"}'
#: a JSON string's body that needs no unescaping: printable ASCII but ``"`` and ``\``
_PLAIN = re.compile(rb"[ !#-\[\]-~]*")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of the coordinator log."""

    kind: RecordKind
    gtrid: str
    branches: tuple[str, ...] = ()
    at: float = 0.0
    #: the server transaction id of each PostgreSQL branch (resource name -> txid)
    txids: Mapping[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The framed bytes of this record."""
        body: dict[str, object] = {"k": self.kind, "g": self.gtrid}
        if self.kind == "COMMIT":
            body["b"] = list(self.branches)
            body["t"] = round(self.at, 3)
            if self.txids:
                body["x"] = dict(self.txids)
        payload = _JSON.encode(body).encode("utf-8")
        return HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> LogRecord:
        """Parse one payload (already checked against its CRC); ValueError if malformed.

        Any other content, however hostile (bad UTF-8, deep nesting, wrong types, huge
        numbers), is a ValueError too, never another exception."""
        if payload.startswith(_END_HEAD) and payload.endswith(_END_TAIL):
            plain = payload[len(_END_HEAD) : -len(_END_TAIL)]
            if _PLAIN.fullmatch(plain):  # what json.loads would read, without parsing
                return cls("END", plain.decode("ascii"))
        try:
            body = json.loads(payload)
        except RecursionError:
            raise ValueError("a record is nested too deeply") from None
        if not isinstance(body, dict):
            raise ValueError("a record is not a JSON object")
        kind = body.get("k")
        if kind not in ("COMMIT", "END", "ABORT"):
            raise ValueError(f"unknown record kind {str(kind)[:40]!r}")
        gtrid = body.get("g")
        if not isinstance(gtrid, str):
            raise ValueError("gtrid is not a string")
        branches = body.get("b", [])
        if not isinstance(branches, list) or not all(isinstance(b, str) for b in branches):
            raise ValueError("branches is not a list of strings")
        at = body.get("t", 0.0)
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise ValueError("the decision time is not a finite number")
        txids = body.get("x", {})
        if not isinstance(txids, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in txids.values()
        ):
            raise ValueError("txids is not a JSON object of integers")
        # resource names repeat in every record: one string each (retained logs are big)
        return cls(
            kind,
            gtrid,
            tuple(sys.intern(b) for b in branches),
            float(at),
            {sys.intern(k): v for k, v in txids.items()},
        )


def frame_at(data: bytes, pos: int) -> tuple[int, LogRecord] | None:
    """The (end offset, record) of a good frame starting at ``pos``, or None."""
    if pos < 0 or pos + HEADER.size > len(data):
        return None
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if length == 0 or length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[pos + HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        return end, LogRecord.decode(payload)
    except ValueError:
        return None


def read_frames(data: bytes, start: int) -> Iterator[tuple[int, LogRecord]]:
    """Yield (end offset, record) for each good frame from ``start``; stop at the first bad one."""
    pos = start
    while (frame := frame_at(data, pos)) is not None:
        yield frame
        pos = frame[0]


def next_good_frame(data: bytes, start: int) -> int | None:
    """The offset of the first good frame starting at or after ``start``, or None.

    Used after a bad frame: a good frame further on means the bad one is damage in the
    middle of the data, not a write torn at its end. Every payload is a JSON object, so only
    the offsets ``HEADER.size`` bytes before a ``{`` are tried."""
    pos = start + HEADER.size
    while (brace := data.find(b"{", pos)) >= 0:
        if frame_at(data, brace - HEADER.size) is not None:
            return brace - HEADER.size
        pos = brace + 1
    return None
