"""Durable saga state, next to the coordinator log: a file per saga, or a shared table.

The storage only: the sagas themselves (definitions, the runner) are ``xatm.sagas``, which
reaches this through the node's store (``xatm.log.store``); ``xatm.sagas.store`` re-exports it.

A saga's record is one small JSON document (name, key, payload, direction, the steps done
and compensated, the owner node, the last error), rewritten whole at each transition.

**File store** (the log is a directory): ``<log>/sagas.d/<file id>.saga``, append-only,
framed like the coordinator log (``<len:u32><crc32:u32><json>``); the last good frame is the
saga's state, a torn tail is ignored. The file id is the saga id without its last part, and
for a saga run with a key it is made from a hash of (saga name, key): creating the file is
the key's claim. It is created complete (written under a temporary name, then ``link()``ed
into place, which fails if the name exists), so nobody ever sees a half-made saga; it is
fsynced right after the link, before any step runs (a file without a record, which only an
operating-system crash during a creation can leave, is removed by the next creation of that
name). The process that runs a saga holds an ``flock`` on its file for as long as it runs
it: the kernel drops it when the process dies, however it dies, so "the lock can be taken"
proves the owner is dead, as for the node logs (``xatm.log.file``), and only one process at
a time can hold it. Forced writes (the start, the change of direction, a stuck compensation)
are fsynced, and the directory too after a creation (one fsync for the links made
concurrently: group commit); the others (each step done, the end) are plain ``write`` calls
(they survive a process crash; losing one to an OS crash only makes recovery run those steps
again, which their barriers turn into no-ops, to the same end). Recovery lists the
directory at every pass, so finished sagas are *retired* a minute after their end: fsynced,
linked into ``sagas.d/done/`` and unlinked from ``sagas.d`` (lookups by key or id read both;
a creation that wins the name checks ``done/`` afterwards, so a key is never run twice);
``done/`` is pruned after the retention.

**Shared store** (the log is ``postgresql://``): table ``<schema>.sagas`` of the shared log
(migration 2 of ``xatm.log.shared``). The key's claim is the insert (a unique index on (name,
key hash)); the owner is the ``node_id`` column, alive while its node lock is held (as for
2PC); a recoverer claims a dead owner's saga with a conditional ``UPDATE ... WHERE
node_id = <old owner>``, so exactly one wins; every write is conditional on still owning the
saga. Unforced writes go through connections set to ``synchronous_commit = off``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg import sql

from xatm.core.urls import ResourceSpec, redact
from xatm.errors import ConfigurationError, LogError, SagaTakenOver
from xatm.log import shared as _pglog
from xatm.log.file import fsync_dir

if TYPE_CHECKING:
    from xatm.log.shared import PostgresLog

logger = logging.getLogger("xatm.saga")

SAGA_DIR = "sagas.d"
DONE_DIR = "done"
_HEADER = struct.Struct("<II")
_MAX_FRAME = 1 << 24
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
        )


_FIELDS = frozenset(f.name for f in fields(SagaRecord))


def key_hash(name: str, key: str) -> str:
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()


def new_saga_id(name: str, key: str | None) -> str:
    """``<name>.<24 hex: hash of the key, or random>.<8 hex random>`` (at most 64 bytes)."""
    middle = key_hash(name, key)[:24] if key is not None else secrets.token_hex(12)
    return f"{name}.{middle}.{secrets.token_hex(4)}"


def file_id(saga_id: str) -> str:
    return saga_id.rsplit(".", 1)[0]


class Claim(Protocol):
    """The right to write one saga's record (held by the process that runs it)."""

    saga_id: str


class SagaStore(Protocol):
    """Where saga records live; see the module docstring."""

    def create(self, record: SagaRecord) -> Claim | None:
        """Store a new saga, claimed by this process; None if its key is taken."""

    def find_key(self, name: str, key: str) -> SagaRecord | None: ...

    def get(self, saga_id: str) -> SagaRecord | None: ...

    def claim(self, saga_id: str, *, force: bool = False) -> Claim | None:
        """Take the saga over if its owner is dead (or if ``force``, where possible)."""

    def read(self, claim: Claim) -> SagaRecord | None: ...

    def save(self, claim: Claim, record: SagaRecord, *, force: bool) -> None: ...

    def release(self, claim: Claim) -> None: ...

    def owner_alive(self, record: SagaRecord) -> bool: ...

    def records(self, *, include_final: bool = False) -> list[SagaRecord]: ...

    def retire(self, age: float) -> int:
        """Set final sagas older than ``age`` seconds apart from the ones in progress."""

    def prune(self, retention: float) -> int: ...

    def close(self) -> None: ...


# -- the file store --------------------------------------------------------------------------
@dataclass(eq=False)
class FileClaim:
    saga_id: str
    fd: int
    path: Path


def _frame(record: SagaRecord) -> bytes:
    payload = record.encode()
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _last_record(data: bytes) -> SagaRecord | None:
    pos, last = 0, None
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if length == 0 or length > _MAX_FRAME or end > len(data):
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            last = SagaRecord.decode(payload)
        except (ValueError, KeyError, TypeError):
            break
        pos = end
    return last


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class FileSagaStore:
    """Saga records as files under ``<log>/sagas.d`` (see the module docstring)."""

    def __init__(self, log_directory: str | os.PathLike[str]) -> None:
        self.directory = Path(log_directory) / SAGA_DIR
        self.done_directory = self.directory / DONE_DIR
        self._final: set[str] = set()  # files of the active directory known to be final
        self._lock = threading.Lock()
        # group commit of the directory's fsync: one fsync covers every link made before it
        self._dir_cond = threading.Condition(threading.Lock())
        self._dir_asked = 0
        self._dir_synced = 0
        self._dir_syncing = False
        self._made = False  # the directories exist (made or seen by this store)

    def _ensure_dir(self) -> None:
        if self._made:
            return
        try:
            self.done_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise LogError(f"cannot create the saga directory {self.directory}: {e}") from e
        self._made = True

    def path(self, saga_id: str) -> Path:
        if "/" in saga_id or saga_id.startswith("."):  # never a path outside the directory
            raise ConfigurationError(f"not a saga id: {saga_id[:80]!r}")
        return self.directory / f"{file_id(saga_id)}.saga"

    def create(self, record: SagaRecord) -> FileClaim | None:
        self._ensure_dir()
        path = self.path(record.saga_id)
        tmp = self.directory / f"tmp-{secrets.token_hex(8)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the directory was removed since: make it again
            self._made = False
            self._ensure_dir()
            fd = os.open(tmp, flags, 0o600)
        try:
            if not _try_lock(fd):  # nobody else knows this name
                raise LogError(f"cannot lock {tmp}")
            # complete before it gets its name, so no reader ever sees it half made
            os.write(fd, _frame(record))
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if not self._remove_unborn(path):
                        os.close(fd)
                        fd = -1
                        return None
            if record.key is not None and (self.done_directory / path.name).exists():
                # the key's saga finished and was retired (link into done/, then unlink
                # from here) before this link: the key is taken after all (a saga without
                # a key has a random name, which no retired saga has)
                path.unlink()
                os.close(fd)
                fd = -1
                return None
            # durable after its name: one fsync covers the file and its link (the journal
            # commit of most file systems); the directory's fsync makes sure of the link
            os.fsync(fd)
            self._sync_dir()
            return FileClaim(record.saga_id, fd, path)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise LogError(f"cannot write the saga record {record.saga_id}: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _remove_unborn(self, path: Path) -> bool:
        """A file with no record under a saga's name: what an operating-system crash can
        leave of a creation whose fsyncs did not finish (so none of its steps ran). Remove
        it (under its lock) and return True; False if the name holds a saga."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            if not _try_lock(fd):
                return False  # a live creator or owner holds it
            if self._read_path(path) is not None:
                return False
            path.unlink()
            logger.warning("removed %s: a saga record that never became durable", path)
            return True
        finally:
            os.close(fd)

    def _sync_dir(self) -> None:
        """Make the links made so far durable (fsync of the directory, shared by the
        concurrent callers: the first one leads, the others wait for its fsync)."""
        with self._dir_cond:
            self._dir_asked += 1
            mine = self._dir_asked
            while self._dir_synced < mine:
                if self._dir_syncing:
                    self._dir_cond.wait()
                    continue
                self._dir_syncing, target = True, self._dir_asked
                self._dir_cond.release()
                try:
                    fsync_dir(self.directory)
                finally:
                    self._dir_cond.acquire()
                    self._dir_syncing = False
                    self._dir_cond.notify_all()
                self._dir_synced = max(self._dir_synced, target)

    def _read_path(self, path: Path) -> SagaRecord | None:
        try:
            return _last_record(path.read_bytes())
        except FileNotFoundError:
            return None

    def _read_name(self, name: str) -> SagaRecord | None:
        """The saga file ``name``, active or retired (a retirement links the file into
        done/ before it unlinks it here, so one of the two reads finds it)."""
        record = self._read_path(self.directory / name)
        if record is None:
            record = self._read_path(self.done_directory / name)
        return record

    def find_key(self, name: str, key: str) -> SagaRecord | None:
        return self._read_name(f"{name}.{key_hash(name, key)[:24]}.saga")

    def get(self, saga_id: str) -> SagaRecord | None:
        record = self._read_name(self.path(saga_id).name)
        return record if record is not None and record.saga_id == saga_id else None

    def claim(self, saga_id: str, *, force: bool = False) -> FileClaim | None:
        path = self.path(saga_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if not _try_lock(fd):  # a live process runs it; ``force`` cannot break an flock
            os.close(fd)
            return None
        return FileClaim(saga_id, fd, path)

    def read(self, claim: Claim) -> SagaRecord | None:
        assert isinstance(claim, FileClaim)
        return self.get(claim.saga_id)

    def save(self, claim: Claim, record: SagaRecord, *, force: bool) -> None:
        assert isinstance(claim, FileClaim)
        try:
            os.write(claim.fd, _frame(record))
            if force:
                os.fsync(claim.fd)
        except OSError as e:
            raise LogError(f"cannot write the saga record {record.saga_id}: {e}") from e

    def release(self, claim: Claim) -> None:
        assert isinstance(claim, FileClaim)
        if claim.fd >= 0:
            os.close(claim.fd)  # drops the flock
            claim.fd = -1

    def owner_alive(self, record: SagaRecord) -> bool:
        """True if a live process holds the saga's lock (probed and released at once)."""
        probe = self.claim(record.saga_id)
        if probe is None:
            return self.path(record.saga_id).exists()
        self.release(probe)
        return False

    def _files(self, directory: Path | None = None) -> Iterator[Path]:
        directory = directory or self.directory
        if directory.is_dir():
            yield from sorted(directory.glob("*.saga"))

    def records(self, *, include_final: bool = False) -> list[SagaRecord]:
        out = []
        if include_final:
            for path in self._files(self.done_directory):
                record = self._read_path(path)
                if record is not None:
                    out.append(record)
        for path in self._files():
            if not include_final and path.name in self._final:
                continue
            record = self._read_path(path)
            if record is None:
                continue
            if record.final:
                with self._lock:
                    self._final.add(path.name)
                if not include_final:
                    continue
            out.append(record)
        return out

    def retire(self, age: float) -> int:
        """Move final sagas whose last write is older than ``age`` seconds into done/ (the
        active directory, which recovery lists at every pass, keeps only recent ones).

        Each file is fsynced first (its end was written without: by now the kernel has
        usually written it out, so this costs little), then linked into done/ and unlinked
        here; the two directories are fsynced once for the batch."""
        cutoff = time.time() - age
        moved = 0
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if not _try_lock(fd):
                        continue  # still held by its runner
                    record = self._read_path(path)
                    if record is None or not record.final:
                        continue
                    os.fsync(fd)
                    with contextlib.suppress(FileExistsError):
                        os.link(path, self.done_directory / path.name)
                    path.unlink()
                    moved += 1
                    with self._lock:
                        self._final.discard(path.name)
                finally:
                    os.close(fd)
        if moved:
            fsync_dir(self.done_directory)
            fsync_dir(self.directory)
        return moved

    def prune(self, retention: float) -> int:
        """Delete final sagas older than ``retention`` seconds (their keys become free)."""
        cutoff = time.time() - retention
        removed = 0
        for path in [*self._files(self.done_directory), *self._files()]:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= cutoff:
                    continue
                record = self._read_path(path)
                if record is not None and record.final:
                    path.unlink()
                    removed += 1
                    with self._lock:
                        self._final.discard(path.name)
        if self.directory.is_dir():
            for tmp in self.directory.glob("tmp-*"):
                with contextlib.suppress(OSError):
                    if tmp.stat().st_mtime < time.time() - 3600:
                        tmp.unlink()
        return removed

    def close(self) -> None:
        pass


# -- the shared store ------------------------------------------------------------------------
@dataclass(eq=False)
class SharedClaim:
    saga_id: str


class PostgresSagaStore:
    """Saga records in the shared log's ``sagas`` table (see the module docstring).

    ``log`` is the manager's (or an inspector's) PostgresLog: its connection settings and
    schema, and ``node_alive`` for owners' liveness."""

    def __init__(self, log: PostgresLog, node_id: str) -> None:
        self._log = log
        self.spec: ResourceSpec = log.spec
        self.node_id = node_id
        self._ident = sql.Identifier(log.schema)
        # idle connections: synchronous commits, and (for unforced writes) asynchronous ones
        self._idle: dict[bool, list[psycopg.Connection[Any]]] = {True: [], False: []}
        self._lock = threading.Lock()

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._ident)

    @contextlib.contextmanager
    def _conn(self, durable: bool = True) -> Iterator[psycopg.Connection[Any]]:
        idle = self._idle[durable]
        with self._lock:
            conn = idle.pop() if idle else None
        if conn is None or conn.closed or conn.broken:
            conn = _pglog.connect(self.spec, "xatm-sagas")
            if not durable:  # its commits do not wait for the WAL flush
                conn.execute("SET synchronous_commit TO OFF")
        try:
            yield conn
        except psycopg.Error as e:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise LogError(f"the shared saga store failed: {redact(str(e)).strip()}") from None
        else:
            with self._lock:
                if len(idle) < 8:
                    idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def create(self, record: SagaRecord) -> SharedClaim | None:
        khash = key_hash(record.name, record.key) if record.key is not None else None
        with self._conn() as conn:
            row = conn.execute(
                self._q(
                    "INSERT INTO {schema}.sagas (saga_id, name, key_hash, node_id, state, body)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING saga_id"
                ),
                (
                    record.saga_id,
                    record.name,
                    khash,
                    record.node,
                    record.state,
                    record.encode().decode(),
                ),
            ).fetchone()
        return SharedClaim(record.saga_id) if row else None

    def _one(self, where: str, params: tuple[Any, ...]) -> SagaRecord | None:
        with self._conn() as conn:
            row = conn.execute(
                self._q("SELECT node_id, body FROM {schema}.sagas WHERE " + where), params
            ).fetchone()
        if row is None:
            return None
        return replace(SagaRecord.decode(row[1]), node=str(row[0]))

    def find_key(self, name: str, key: str) -> SagaRecord | None:
        return self._one("name = %s AND key_hash = %s", (name, key_hash(name, key)))

    def get(self, saga_id: str) -> SagaRecord | None:
        return self._one("saga_id = %s", (saga_id,))

    def claim(self, saga_id: str, *, force: bool = False) -> SharedClaim | None:
        record = self.get(saga_id)
        if record is None:
            return None
        if record.node != self.node_id and not force and self._log.node_alive(record.node):
            return None
        with self._conn() as conn:
            cur = conn.execute(
                self._q(
                    "UPDATE {schema}.sagas SET node_id = %s WHERE saga_id = %s AND node_id = %s"
                ),
                (self.node_id, saga_id, record.node),
            )
            return SharedClaim(saga_id) if cur.rowcount == 1 else None

    def read(self, claim: Claim) -> SagaRecord | None:
        return self.get(claim.saga_id)

    def save(self, claim: Claim, record: SagaRecord, *, force: bool) -> None:
        record = replace(record, node=self.node_id)
        update = self._q(
            "UPDATE {schema}.sagas SET state = %s, body = %s, updated_at = now()"
            " WHERE saga_id = %s AND node_id = %s"
        )
        params = (record.state, record.encode().decode(), record.saga_id, self.node_id)
        with self._conn(durable=force) as conn:
            count = conn.execute(update, params).rowcount
        if count != 1:
            raise SagaTakenOver(f"saga {record.saga_id} was taken over by another process")

    def release(self, claim: Claim) -> None:
        pass

    def owner_alive(self, record: SagaRecord) -> bool:
        return bool(self._log.node_alive(record.node))

    def records(self, *, include_final: bool = False) -> list[SagaRecord]:
        where = "" if include_final else " WHERE state IN ('running', 'compensating')"
        with self._conn() as conn:
            rows = conn.execute(
                self._q("SELECT node_id, body FROM {schema}.sagas" + where + " ORDER BY created_at")
            ).fetchall()
        return [replace(SagaRecord.decode(b), node=str(n)) for n, b in rows]

    def retire(self, age: float) -> int:
        return 0  # the index on open sagas keeps recovery's query small already

    def prune(self, retention: float) -> int:
        with self._conn() as conn:
            cur = conn.execute(
                self._q(
                    "DELETE FROM {schema}.sagas WHERE state IN ('completed', 'compensated',"
                    " 'failed') AND updated_at < now() - %s * interval '1 second'"
                ),
                (retention,),
            )
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            idle = self._idle[True] + self._idle[False]
            self._idle = {True: [], False: []}
        for conn in idle:
            with contextlib.suppress(psycopg.Error):
                conn.close()
