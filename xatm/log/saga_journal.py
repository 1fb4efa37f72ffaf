"""Sagas without a key, in their process's journal: one append-only file, group-committed.

``<log>/sagas.d/<journal id>.journal`` (16 hex): a file store opens one (created with
``O_EXCL``, flock()ed for as long as the store keeps it, fsynced with its directory) when it
creates its first saga without a key, and appends its sagas' records to it as frames
(``xatm.log.saga_record``); the last record of a saga is its state. A saga's id names its
journal: ``<name>.<journal id><sequence: 8 hex>.<8 hex>``. Creating a saga is one append and
one ``fdatasync`` shared with the sagas created meanwhile (group commit): no file is made
per saga. The other writes keep the file store's rule (forced ones are fdatasynced).

A journal holds only the sagas its process is running. A saga that leaves its runner
unfinished (stuck, or its runner stopped by an error) and every unfinished saga of a dead
process's journal (its flock can be taken: ``adopt``, at each recovery pass) *move out* to a
file of their own (``<log>/sagas.d/<file id>.saga``, unlocked), where recovery and operators
claim them as any other; the file is durable before the journal notes the move, and where a
saga has a file, the file is its record (``FileSagaStore`` looks there first).

A journal with nothing unfinished (closed by its store, outgrown and drained, or adopted) is
*retired*: linked into ``sagas.d/done/`` and unlinked, then deleted after the retention.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xatm.errors import LogError
from xatm.log.file import fsync_dir
from xatm.log.group_sync import GroupSync
from xatm.log.saga_record import SagaRecord, frame, read_records, try_lock

logger = logging.getLogger("xatm.saga")

SUFFIX = ".journal"
#: a journal that outgrew this many bytes takes no new sagas (a new one is opened)
MAX_BYTES = 64 << 20
_JID = re.compile(r"[0-9a-f]{16}")


def journal_id(saga_id: str) -> str | None:
    """The journal a saga id names, or None if it names none."""
    parts = saga_id.split(".")
    if len(parts) != 3 or len(parts[1]) != 24:
        return None
    jid = parts[1][:16]
    return jid if _JID.fullmatch(jid) else None


def _states(data: bytes) -> tuple[int, dict[str, SagaRecord]]:
    """(end of the last good frame, each saga's last record) of a journal's bytes."""
    good, last = 0, {}
    for end, record in read_records(data):
        good = end
        last[record.saga_id] = record
    return good, last


def _read_all(fd: int) -> bytes:
    chunks, at = [], 0
    while chunk := os.pread(fd, 1 << 20, at):
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)


def _unfinished(records: dict[str, SagaRecord]) -> dict[str, SagaRecord]:
    return {i: r for i, r in records.items() if not r.final and not r.moved}


@dataclass(eq=False)
class JournalClaim:
    """The right to write one saga of this store's journal (its runner's)."""

    saga_id: str
    journal: _Journal


class _Journal:
    """A journal this store writes, its flock held."""

    def __init__(self, jid: str, path: Path, fd: int) -> None:
        self.jid, self.path, self.fd = jid, path, fd
        self.size = 0  # the end of the last complete frame
        self.sequence = 0
        self.broken = False  # a failed write could not be undone: nothing more is appended
        self.sealed = False  # takes no new saga
        self.reserved = 0  # ids given (``new_id``) whose sagas are not created yet
        self.lock = threading.Lock()
        self.running: dict[str, SagaRecord] = {}  # claimed sagas: their last record written
        self.group = GroupSync(self._datasync)

    def _datasync(self) -> None:
        os.fdatasync(self.fd)

    def append(self, record: SagaRecord) -> None:
        """Write ``record`` whole at the end (a failed write is cut off again)."""
        data = frame(record)
        with self.lock:
            if self.broken:
                raise LogError(f"the saga journal {self.path} failed earlier")
            try:
                written = os.write(self.fd, data)
                if written != len(data):
                    raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
            except OSError as e:
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    self.broken = self.sealed = True
                raise LogError(f"cannot write the saga record {record.saga_id}: {e}") from e
            self.size += written
            if record.final or record.moved:
                self.running.pop(record.saga_id, None)
            else:
                self.running[record.saga_id] = record

    def sync(self) -> None:
        try:
            self.group.sync()
        except OSError as e:
            with self.lock:
                self.broken = self.sealed = True
            raise LogError(f"cannot fsync the saga journal {self.path}: {e}") from e


class SagaJournals:
    """The journals of one file store: its own (written) and everyone's (read, adopted).

    ``move_out(record)`` makes sure a saga has a file of its own, durably (made there, or
    made before), or raises ``LogError``; ``has_file(saga_id)``: whether it has one (a saga
    with a file is the file's). Both are the file store's."""

    def __init__(
        self,
        directory: Path,
        done_directory: Path,
        ensure_dir: Callable[[], None],
        move_out: Callable[[SagaRecord], None],
        has_file: Callable[[str], bool],
    ) -> None:
        self.directory = directory
        self.done_directory = done_directory
        self._ensure_dir = ensure_dir
        self._move_out = move_out
        self._has_file = has_file
        self._lock = threading.Lock()
        self._own: dict[str, _Journal] = {}
        self._current: _Journal | None = None
        #: other processes' journals as last read: path -> (bytes read, unfinished sagas)
        self._seen: dict[Path, tuple[int, dict[str, SagaRecord]]] = {}
        self._seen_lock = threading.Lock()

    # -- this store's sagas -------------------------------------------------------------------
    def new_id(self, name: str) -> str:
        """An id for a new saga without a key, in this store's current journal."""
        with self._lock:
            journal = self._current
            if journal is None or journal.sealed or journal.size >= MAX_BYTES:
                if journal is not None:
                    journal.sealed = True
                    self._drop_if_drained(journal)
                journal = self._current = self._open()
            journal.sequence += 1
            journal.reserved += 1
            return f"{name}.{journal.jid}{journal.sequence:08x}.{secrets.token_hex(4)}"

    def _open(self) -> _Journal:
        """A new journal, locked before it has its name: a recoverer that could open it by
        its name and lock it before its writer would take it for a dead one."""
        self._ensure_dir()
        jid = secrets.token_hex(8)
        path = self.directory / f"{jid}{SUFFIX}"
        tmp = self.directory / f"tmp-{jid}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise LogError(f"cannot create the saga journal {path}: {e}") from e
        try:
            if not try_lock(fd):  # nobody else knows this name
                raise OSError(errno.EAGAIN, "locked")
            os.fsync(fd)
            os.link(tmp, path)
            fsync_dir(self.directory)
        except OSError as e:
            os.close(fd)
            raise LogError(f"cannot create the saga journal {path}: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        journal = _Journal(jid, path, fd)
        self._own[jid] = journal
        return journal

    def _own_journal(self, saga_id: str) -> _Journal | None:
        """The journal of this store that ``saga_id`` names, if it is one of this store's."""
        jid = journal_id(saga_id)
        with self._lock:
            return self._own.get(jid) if jid is not None else None

    def owns(self, saga_id: str) -> bool:
        """True if ``saga_id`` was given by this store (``new_id``)."""
        return self._own_journal(saga_id) is not None

    def create(self, record: SagaRecord) -> JournalClaim:
        """Store a new saga (its id from ``new_id``), durably, claimed by this store."""
        journal = self._own_journal(record.saga_id)
        if journal is None:
            raise LogError(f"saga {record.saga_id} does not belong to an open journal")
        try:
            journal.append(record)
        finally:
            with self._lock:
                journal.reserved -= 1
        journal.sync()
        return JournalClaim(record.saga_id, journal)

    def save(self, claim: JournalClaim, record: SagaRecord, *, force: bool) -> None:
        claim.journal.append(record)
        if force:
            claim.journal.sync()

    def release(self, claim: JournalClaim) -> None:
        """The runner lets the saga go: if unfinished, it moves out to a file of its own."""
        journal = claim.journal
        with journal.lock:
            record = journal.running.get(claim.saga_id)
        if record is not None:
            try:
                self._move_out(record)
            except LogError as e:  # left here, listed as running: adopted after this process
                logger.warning("sagas: saga %s stays in its journal: %s", claim.saga_id, e)
                return
            try:  # the file is its record from now on
                journal.append(record.with_(moved=True))
            except LogError:
                with journal.lock:
                    journal.running.pop(claim.saga_id, None)
        with self._lock:
            self._drop_if_drained(journal)

    def _drop_if_drained(self, journal: _Journal) -> None:
        """Close and retire a sealed journal of ours with nothing running (``_lock`` held)."""
        drained = journal.sealed and not journal.running and not journal.reserved
        if not drained or journal.jid not in self._own:
            return
        del self._own[journal.jid]
        if self._current is journal:
            self._current = None
        if not journal.broken:
            self._retire(journal.path)
        os.close(journal.fd)  # after the retirement: nobody adopts it meanwhile

    def close(self) -> None:
        """Seal this store's journals; each is retired once its running sagas are let go."""
        with self._lock:
            for journal in list(self._own.values()):
                journal.sealed = True
                self._drop_if_drained(journal)

    # -- everyone's ---------------------------------------------------------------------------
    def _paths(self, directory: Path) -> Iterator[Path]:
        if directory.is_dir():
            yield from sorted(directory.glob(f"*{SUFFIX}"))

    def get(self, saga_id: str) -> SagaRecord | None:
        """The saga's last record in its journal (``moved``: its file is the record)."""
        journal = self._own_journal(saga_id)
        if journal is not None:
            with journal.lock:
                running = journal.running.get(saga_id)
            if running is not None:
                return running
        jid = journal_id(saga_id)
        if jid is None:
            return None
        # a retirement links the journal into done/ before it unlinks it here
        for directory in (self.directory, self.done_directory):
            try:
                return _states((directory / f"{jid}{SUFFIX}").read_bytes())[1].get(saga_id)
            except FileNotFoundError:
                continue
        return None

    def owner_alive(self, saga_id: str) -> bool:
        """True if a live process holds the saga's journal (probed and released at once)."""
        if self.owns(saga_id):
            return True
        jid = journal_id(saga_id)
        if jid is None:
            return False
        try:
            fd = os.open(self.directory / f"{jid}{SUFFIX}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # retired (or never was)
        try:
            return not try_lock(fd)
        finally:
            os.close(fd)

    def records(self, *, include_final: bool = False) -> list[SagaRecord]:
        """The sagas in journals: unfinished ones (every journal's), or all (slow: reads
        every journal, retired ones too). Moved ones are their files' (not listed here), also
        where the mover died before it noted the move (the file is there)."""
        out: list[SagaRecord] = []
        with self._lock:
            own = {j.path: j for j in self._own.values()}
        if include_final:
            for path in [*self._paths(self.done_directory), *self._paths(self.directory)]:
                with contextlib.suppress(FileNotFoundError):
                    records = _states(path.read_bytes())[1]
                    out += [r for r in records.values() if not r.moved]
            return [r for r in out if not self._has_file(r.saga_id)]
        listed = set()
        for path in self._paths(self.directory):
            listed.add(path)
            journal = own.get(path)
            if journal is not None:
                with journal.lock:
                    out += journal.running.values()
                continue
            unfinished = self._read_unfinished(path).values()
            out += [r for r in unfinished if not self._has_file(r.saga_id)]
        with self._seen_lock:
            for path in set(self._seen) - listed:
                del self._seen[path]
        return out

    def _read_unfinished(self, path: Path) -> dict[str, SagaRecord]:
        """Another process's journal, read on from where the last call stopped."""
        with self._seen_lock:
            offset, unfinished = self._seen.get(path, (0, {}))
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return {}
        end, last = _states(data)
        if end:
            unfinished = {**unfinished, **last}
            unfinished = _unfinished(unfinished)
            with self._seen_lock:
                self._seen[path] = (offset + end, unfinished)
        return unfinished

    def adopt(self) -> int:
        """Move every unfinished saga of dead processes' journals to a file of its own and
        retire those journals; the number of sagas moved."""
        moved = 0
        for path in self._paths(self.directory):
            with self._lock:
                if any(j.path == path for j in self._own.values()):
                    continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not try_lock(fd):
                    continue  # its process is alive (or another recoverer adopts it)
                if os.fstat(fd).st_nlink == 0:
                    continue  # retired by another recoverer before this one got the lock
                data = _read_all(fd)
                left = _unfinished(_states(data)[1])
                for record in left.values():
                    self._move_out(record)
                    moved += 1
                self._retire(path)
            except (OSError, LogError) as e:
                logger.warning("sagas: cannot adopt the journal %s: %s", path, e)
            finally:
                os.close(fd)
        return moved

    def _retire(self, path: Path) -> None:
        """Link a journal with nothing unfinished into done/ and unlink it here."""
        try:
            with contextlib.suppress(FileExistsError):
                os.link(path, self.done_directory / path.name)
            path.unlink()
            fsync_dir(self.done_directory)
            fsync_dir(self.directory)
        except FileNotFoundError:
            pass  # retired by another adopter
        except OSError as e:
            logger.warning("sagas: cannot retire the journal %s: %s", path, e)

    def prune(self, retention: float) -> int:
        """Delete retired journals last written more than ``retention`` seconds ago."""
        cutoff = time.time() - retention
        removed = 0
        for path in self._paths(self.done_directory):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
