"""Durable saga state, next to the coordinator log: files and journals, or a shared table.

The storage only: the sagas themselves (definitions, the runner) are ``xatm.sagas``, which
reaches this through the node's store (``xatm.log.store``); ``xatm.sagas.store`` re-exports it.

A saga's record is one small JSON document (name, key, payload, direction, the steps done
and compensated, the owner node, the last error), rewritten whole at each transition.

**File store** (the log is a directory). A saga *without* a key goes to its process's
journal (``xatm.log.saga_journal``: one append-only file per process, group-committed; a saga
left unfinished, or whose process died, moves out to a file of its own, below). A saga with a
key, and every saga that moved out: ``<log>/sagas.d/<file id>.saga``, append-only,
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
saga. Unforced writes go through connections set to ``synchronous_commit = off``. A call
that finds its pooled session cut (the server restarted or failed over) is sent once more on
a new one; a running saga whose row is gone (a failover to a standby that never received it)
is written again from the runner's copy at its next write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg
from psycopg import sql

from xatm.core.urls import ResourceSpec, redact
from xatm.errors import ConfigurationError, LogError, SagaTakenOver
from xatm.log import shared as _pglog
from xatm.log.file import fsync_dir
from xatm.log.group_sync import GroupSync
from xatm.log.saga_journal import JournalClaim, SagaJournals, journal_id
from xatm.log.saga_record import (
    SagaRecord,
    file_id,
    frame,
    key_hash,
    last_record,
    new_saga_id,
    try_lock,
)

if TYPE_CHECKING:
    from xatm.log.shared import PostgresLog

logger = logging.getLogger("xatm.saga")

SAGA_DIR = "sagas.d"
DONE_DIR = "done"


class Claim(Protocol):
    """The right to write one saga's record (held by the process that runs it)."""

    saga_id: str


class SagaStore(Protocol):
    """Where saga records live; see the module docstring."""

    def new_id(self, name: str, key: str | None) -> str:
        """The id of a new saga (``create`` it next)."""

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

    def adopt(self) -> int:
        """Make dead processes' sagas claimable where they are not yet (recovery, first)."""

    def lost_writes(self) -> tuple[float, ...]:
        """When the store's database came up without writes it had acknowledged (the
        shared log's failovers: ``xatm.log.shared.PostgresLog.log_switches``); none for
        files."""

    def close(self) -> None: ...


# -- the file store --------------------------------------------------------------------------
@dataclass(eq=False)
class FileClaim:
    saga_id: str
    fd: int
    path: Path


class FileSagaStore:
    """Saga records as files under ``<log>/sagas.d`` (see the module docstring)."""

    def __init__(self, log_directory: str | os.PathLike[str]) -> None:
        self.directory = Path(log_directory) / SAGA_DIR
        self.done_directory = self.directory / DONE_DIR
        self._final: set[str] = set()  # files of the active directory known to be final
        self._lock = threading.Lock()
        # group commit of the directory's fsync: one fsync covers every link made before it
        self._dir_sync = GroupSync(lambda: fsync_dir(self.directory))
        self._made = False  # the directories exist (made or seen by this store)
        #: sagas without a key: this process's journal (xatm.log.saga_journal)
        self.journals = SagaJournals(
            self.directory, self.done_directory, self._ensure_dir, self._move_out, self._has_file
        )

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

    def new_id(self, name: str, key: str | None) -> str:
        """A saga with a key gets a file (its name is the key's claim); one without, a place
        in this process's journal."""
        return new_saga_id(name, key) if key is not None else self.journals.new_id(name)

    def create(self, record: SagaRecord) -> FileClaim | JournalClaim | None:
        if self.journals.owns(record.saga_id):
            return self.journals.create(record)
        return self._create_file(record)

    def _move_out(self, record: SagaRecord) -> None:
        """Give a saga of a journal a file of its own (unless it has one: made before, and
        maybe retired since), durably."""
        claim = self._create_file(record)
        if claim is not None:
            self.release(claim)

    def _create_file(self, record: SagaRecord) -> FileClaim | None:
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
            if not try_lock(fd):  # nobody else knows this name
                raise LogError(f"cannot lock {tmp}")
            # complete before it gets its name, so no reader ever sees it half made
            os.write(fd, frame(record))
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if not self._remove_unborn(path):
                        os.close(fd)
                        fd = -1
                        return None
            if (self.done_directory / path.name).exists():
                # the key's saga (or this saga, moved out of a journal) finished and was
                # retired (link into done/, then unlink from here) before this link: the
                # name is taken after all
                path.unlink()
                os.close(fd)
                fd = -1
                return None
            # durable after its name: one fsync covers the file and its link (the journal
            # commit of most file systems); the directory's fsync makes sure of the link
            os.fsync(fd)
            self._dir_sync.sync()
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
            if not try_lock(fd):
                return False  # a live creator or owner holds it
            if self._read_path(path) is not None:
                return False
            path.unlink()
            logger.warning("removed %s: a saga record that never became durable", path)
            return True
        finally:
            os.close(fd)

    def _read_path(self, path: Path) -> SagaRecord | None:
        try:
            return last_record(path.read_bytes())
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
        """Its file's record (a saga with a file is the file's), else its journal's."""
        record = self._read_name(self.path(saga_id).name)
        if record is not None:
            return record if record.saga_id == saga_id else None
        record = self.journals.get(saga_id)
        if record is not None and record.moved:  # its file was made since the look above
            record = self._read_name(self.path(saga_id).name)
        return record

    def claim(self, saga_id: str, *, force: bool = False) -> FileClaim | None:
        path = self.path(saga_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if not try_lock(fd):  # a live process runs it; ``force`` cannot break an flock
            os.close(fd)
            return None
        return FileClaim(saga_id, fd, path)

    def read(self, claim: Claim) -> SagaRecord | None:
        assert isinstance(claim, FileClaim | JournalClaim)
        return self.get(claim.saga_id)

    def save(self, claim: Claim, record: SagaRecord, *, force: bool) -> None:
        if isinstance(claim, JournalClaim):
            self.journals.save(claim, record, force=force)
            return
        assert isinstance(claim, FileClaim)
        try:
            os.write(claim.fd, frame(record))
            if force:
                os.fsync(claim.fd)
        except OSError as e:
            raise LogError(f"cannot write the saga record {record.saga_id}: {e}") from e

    def release(self, claim: Claim) -> None:
        if isinstance(claim, JournalClaim):
            self.journals.release(claim)  # unfinished, it moves out to a file of its own
            return
        assert isinstance(claim, FileClaim)
        if claim.fd >= 0:
            os.close(claim.fd)  # drops the flock
            claim.fd = -1

    def owner_alive(self, record: SagaRecord) -> bool:
        """True if a live process holds the saga's lock (probed and released at once)."""
        probe = self.claim(record.saga_id)
        if probe is not None:
            self.release(probe)
            return False
        if self.path(record.saga_id).exists():
            return True
        return journal_id(record.saga_id) is not None and self.journals.owner_alive(record.saga_id)

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
        return out + self.journals.records(include_final=include_final)

    def _has_file(self, saga_id: str) -> bool:
        """The saga has a file of its own, active or retired."""
        name = self.path(saga_id).name
        return (self.directory / name).exists() or (self.done_directory / name).exists()

    def adopt(self) -> int:
        return self.journals.adopt()

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
                    if not try_lock(fd):
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
        return removed + self.journals.prune(retention)

    def lost_writes(self) -> tuple[float, ...]:
        return ()

    def close(self) -> None:
        self.journals.close()


# -- the shared store ------------------------------------------------------------------------
_T = TypeVar("_T")


class _CutWhileIdle(LogError):
    """A pooled session of the shared store was found cut (the server restarted or failed
    over while it was idle): the call may be sent again on a new one."""


def _said(e: psycopg.Error) -> str:
    return redact(str(e)).strip()


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
    def _conn(
        self, durable: bool = True, seconds: float = _pglog.POINT_BOUND, *, pooled: bool = True
    ) -> Iterator[psycopg.Connection[Any]]:
        """A session of the store (``pooled=False``: a new one), its calls bounded."""
        idle = self._idle[durable]
        with self._lock:
            conn = idle.pop() if idle and pooled else None
        if conn is not None and _pglog.cut_while_idle(conn):
            with contextlib.suppress(psycopg.Error):
                conn.close()
            conn = None
        reused = conn is not None
        watch = None
        try:
            if conn is None:
                conn = _pglog.connect(self.spec, "xatm-sagas")
                if not durable:  # its commits do not wait for the WAL flush
                    with _pglog.bounded(conn, "a session set-up", _pglog.POINT_BOUND):
                        conn.execute("SET synchronous_commit TO OFF")
            with _pglog.bounded(conn, "a saga record", seconds) as watch:
                yield conn
        except psycopg.Error as e:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                if conn.broken:  # the server cut it: the idle ones went the same way
                    self._drop_idle()
                    if reused and not (watch is not None and watch.fired):  # not silent
                        raise _CutWhileIdle(f"the shared saga store failed: {_said(e)}") from None
            raise LogError(f"the shared saga store failed: {_said(e)}") from None
        else:
            with self._lock:
                if len(idle) < 8:
                    idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _drop_idle(self) -> None:
        """Close every idle session (after one was found cut: a restart or a failover)."""
        with self._lock:
            stale = [*self._idle[True], *self._idle[False]]
            self._idle[True].clear()
            self._idle[False].clear()
        for conn in stale:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _call(
        self,
        fn: Callable[[psycopg.Connection[Any]], _T],
        durable: bool = True,
        seconds: float = _pglog.POINT_BOUND,
    ) -> _T:
        """``fn`` on a session of the store; once more, on a new session, if a pooled one
        was found cut (``fn`` must be safe to run twice)."""
        try:
            with self._conn(durable, seconds) as conn:
                return fn(conn)
        except _CutWhileIdle:
            with self._conn(durable, seconds, pooled=False) as conn:
                return fn(conn)

    def new_id(self, name: str, key: str | None) -> str:
        return new_saga_id(name, key)

    def _exists(self, conn: psycopg.Connection[Any], saga_id: str) -> bool:
        query = self._q("SELECT 1 FROM {schema}.sagas WHERE saga_id = %s")
        return conn.execute(query, (saga_id,)).fetchone() is not None

    def _insert(
        self, conn: psycopg.Connection[Any], record: SagaRecord, *, keyed: bool = True
    ) -> bool:
        """Insert ``record`` unless its id (or, ``keyed``, its key) is taken: True if it was."""
        khash = key_hash(record.name, record.key) if record.key is not None and keyed else None
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
        return row is not None

    def create(self, record: SagaRecord) -> SharedClaim | None:
        # sent twice, the second finds the first's row: its id is new, so it is this one's
        created = self._call(
            lambda conn: self._insert(conn, record) or self._exists(conn, record.saga_id)
        )
        return SharedClaim(record.saga_id) if created else None

    def _one(self, where: str, params: tuple[Any, ...]) -> SagaRecord | None:
        query = self._q("SELECT node_id, body FROM {schema}.sagas WHERE " + where)
        row = self._call(lambda conn: conn.execute(query, params).fetchone())
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
        # a whole overwrite: safe to send twice
        count = self._call(lambda conn: conn.execute(update, params).rowcount, durable=force)
        if count != 1 and not self._restore(record):
            raise SagaTakenOver(f"saga {record.saga_id} was taken over by another process")

    def _restore(self, record: SagaRecord) -> bool:
        """The saga's row is not in the table at all: its store lost it (a failover of the
        log's database to a standby that never received it, or a restore). Written again
        from the runner's copy, so that the saga is run to its end and recovery finds it;
        if its key names another saga by now (one created on the new primary since), it is
        written without its key. False if the row is there (another process owns it)."""
        with self._conn() as conn:
            if self._exists(conn, record.saga_id):
                return False
            restored = self._insert(conn, record)
            if not restored and record.key is not None:
                restored = self._insert(conn, record, keyed=False)
                if restored:
                    logger.error(
                        "saga %s: its key %r names another saga, created after this one's"
                        " record was lost (a retry with the same key?): both run",
                        record.saga_id,
                        record.key,
                    )
        if restored:
            logger.warning(
                "saga %s: its record was gone from the saga store (did the shared log's database"
                " fail over, or was it restored?): written again from this process's copy",
                record.saga_id,
            )
        return restored

    def release(self, claim: Claim) -> None:
        pass

    def owner_alive(self, record: SagaRecord) -> bool:
        return bool(self._log.node_alive(record.node))

    def records(self, *, include_final: bool = False) -> list[SagaRecord]:
        where = "" if include_final else " WHERE state IN ('running', 'compensating')"
        query = self._q("SELECT node_id, body FROM {schema}.sagas" + where + " ORDER BY created_at")
        rows = self._call(lambda conn: conn.execute(query).fetchall(), seconds=_pglog.SCAN_BOUND)
        return [replace(SagaRecord.decode(b), node=str(n)) for n, b in rows]

    def adopt(self) -> int:
        return 0  # a dead owner's saga is claimed where it is (``claim``)

    def retire(self, age: float) -> int:
        return 0  # the index on open sagas keeps recovery's query small already

    def prune(self, retention: float) -> int:
        with self._conn(seconds=_pglog.SCAN_BOUND) as conn:
            cur = conn.execute(
                self._q(
                    "DELETE FROM {schema}.sagas WHERE state IN ('completed', 'compensated',"
                    " 'failed') AND updated_at < now() - %s * interval '1 second'"
                ),
                (retention,),
            )
            return cur.rowcount

    def lost_writes(self) -> tuple[float, ...]:
        return self._log.log_switches()

    def close(self) -> None:
        self._drop_idle()
