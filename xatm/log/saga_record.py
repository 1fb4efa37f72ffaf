"""One saga's durable record (``SagaRecord``), its ids, and the frames it is written in.

A frame is ``<len:u32><crc32:u32><json>``, as in the coordinator log; a file of frames is
read up to its first bad frame (a torn tail is ignored). Both file forms of the saga store
(``xatm.log.saga_state``: a file per saga; ``xatm.log.saga_journal``: a process's journal)
write them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import secrets
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

HEADER = struct.Struct("<II")
MAX_FRAME = 1 << 24
#: the final states of a saga (``xatm.sagas.definition.STATES`` lists them all)
FINAL_STATES = frozenset({"completed", "compensated", "failed"})


@dataclass(frozen=True)
class SagaRecord:
    """The durable state of one saga."""

    saga_id: str
    name: str
    key: str | None
    node: str  # the node that owns (runs) it
    state: str  # running | compensating | completed | compensated | failed
    data: Any
    done: tuple[str, ...] = ()  # steps whose action committed, in order
    compensated: tuple[str, ...] = ()  # steps whose compensation committed (or was empty)
    to_compensate: tuple[str, ...] = ()  # steps to undo, in reverse order (set on abort)
    step: str = ""  # the step it is at (for people)
    error: str = ""
    stuck: bool = False  # a compensation keeps failing: recovery retries, operators look
    #: the routine events of the run that started it: (at, step, action, outcome, actor,
    #: reason); everything else (failures, recovery, operators) is in the audit trail
    history: tuple[tuple[float, str, str, str, str, str], ...] = ()
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: in a journal (``xatm.log.saga_journal``): the saga moved out to a file of its own
    moved: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def with_(self, **changes: Any) -> SagaRecord:
        """A copy with ``changes`` and ``updated_at`` now (what ``dataclasses.replace``
        does, without calling ``__init__``: a saga makes several per step)."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"not fields of SagaRecord: {sorted(changes.keys() - _FIELDS)}")
        new = object.__new__(SagaRecord)
        new.__dict__.update(self.__dict__, **changes)
        new.__dict__["updated_at"] = time.time()
        return new

    def encode(self) -> bytes:
        body = {
            "saga_id": self.saga_id,
            "name": self.name,
            "key": self.key,
            "node": self.node,
            "state": self.state,
            "data": self.data,
            "done": list(self.done),
            "compensated": list(self.compensated),
            "to_compensate": list(self.to_compensate),
            "step": self.step,
            "error": self.error,
            "stuck": self.stuck,
            "history": [list(h) for h in self.history],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.moved:
            body["moved"] = True
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes | str) -> SagaRecord:
        body = json.loads(payload)
        if not isinstance(body, dict):
            raise ValueError("a saga record is not a JSON object")
        return cls(
            saga_id=str(body["saga_id"]),
            name=str(body["name"]),
            key=None if body.get("key") is None else str(body["key"]),
            node=str(body["node"]),
            state=str(body["state"]),
            data=body.get("data"),
            done=tuple(str(s) for s in body.get("done", ())),
            compensated=tuple(str(s) for s in body.get("compensated", ())),
            to_compensate=tuple(str(s) for s in body.get("to_compensate", ())),
            step=str(body.get("step", "")),
            error=str(body.get("error", "")),
            stuck=bool(body.get("stuck", False)),
            history=tuple(
                (float(h[0]), str(h[1]), str(h[2]), str(h[3]), str(h[4]), str(h[5]))
                for h in body.get("history", ())
            ),
            created_at=float(body.get("created_at", 0.0)),
            updated_at=float(body.get("updated_at", 0.0)),
            moved=bool(body.get("moved", False)),
        )


_FIELDS = frozenset(f.name for f in fields(SagaRecord))


def key_hash(name: str, key: str) -> str:
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()


def new_saga_id(name: str, key: str | None) -> str:
    """``<name>.<24 hex: hash of the key, or random>.<8 hex random>`` (at most 64 bytes)."""
    middle = key_hash(name, key)[:24] if key is not None else secrets.token_hex(12)
    return f"{name}.{middle}.{secrets.token_hex(4)}"


def name_of(saga_id: str) -> str:
    """The saga name a saga id (:func:`new_saga_id`) begins with."""
    return saga_id.split(".", 1)[0]


def file_id(saga_id: str) -> str:
    return saga_id.rsplit(".", 1)[0]


def frame(record: SagaRecord) -> bytes:
    payload = record.encode()
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def last_record(data: bytes) -> SagaRecord | None:
    """The last good record of a saga file (its state)."""
    last = None
    for _, record in read_records(data):
        last = record
    return last


def try_lock(fd: int) -> bool:
    """flock ``fd`` exclusively if nobody holds it; False if somebody does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def read_records(data: bytes, start: int = 0) -> Iterator[tuple[int, SagaRecord]]:
    """``(end offset, record)`` of each good frame from ``start``, up to the first bad one."""
    pos = start
    while pos + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length == 0 or length > MAX_FRAME or end > len(data):
            return
        payload = data[pos + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return
        try:
            record = SagaRecord.decode(payload)
        except (ValueError, KeyError, TypeError):
            return
        yield end, record
        pos = end
