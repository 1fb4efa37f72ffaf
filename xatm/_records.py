"""Coordinator log records and their framing on disk.

A log holds two kinds of record (presumed abort: an abort is never logged by the
coordinator):

``COMMIT``  the global commit decision for one gtrid, with the names of the resources that
            hold a prepared branch (and the PostgreSQL transaction id of each PostgreSQL
            branch). Forced to disk before any branch is committed.
``END``     every branch of that gtrid is committed; the COMMIT record is no longer needed.
            Written lazily: losing it only makes recovery check the branches once more.

On disk every record is framed as ``<length:u32 LE><crc32:u32 LE><payload>``, where the
payload is compact JSON. A frame whose length runs past the end of the file or whose CRC does
not match ends the readable part of its segment (a torn or corrupt tail).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

HEADER = struct.Struct("<II")
#: a frame longer than this is treated as corruption, not allocated
MAX_PAYLOAD = 1 << 20

RecordKind = Literal["COMMIT", "END"]


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
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        return HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> LogRecord:
        """Parse one payload (already checked against its CRC); ValueError if malformed."""
        body = json.loads(payload)
        if not isinstance(body, dict):
            raise ValueError("a record is not a JSON object")
        kind = body["k"]
        if kind not in ("COMMIT", "END"):
            raise ValueError(f"unknown record kind {kind!r}")
        gtrid = body["g"]
        if not isinstance(gtrid, str):
            raise ValueError("gtrid is not a string")
        branches = tuple(str(b) for b in body.get("b", ()))
        txids = body.get("x", {})
        if not isinstance(txids, dict):
            raise ValueError("txids is not a JSON object")
        return cls(
            kind,
            gtrid,
            branches,
            float(body.get("t", 0.0)),
            {str(k): int(v) for k, v in txids.items()},
        )


def read_frames(data: bytes, start: int) -> Iterator[tuple[int, LogRecord]]:
    """Yield (end offset, record) for each good frame from ``start``; stop at the first bad one."""
    pos = start
    size = len(data)
    while pos + HEADER.size <= size:
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length == 0 or length > MAX_PAYLOAD or end > size:
            return
        payload = data[pos + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return
        try:
            record = LogRecord.decode(payload)
        except (ValueError, KeyError, TypeError):
            return
        yield end, record
        pos = end
