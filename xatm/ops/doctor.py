"""``doctor``: is every resource, and the log directory, fit for two-phase commit?

Each check says what it looked at and, when it fails, exactly what to change:

* each resource is reachable (connects and logs in);
* PostgreSQL: ``max_prepared_transactions`` > 0 (0, the default, disables PREPARE);
* MariaDB >= 10.5 / MySQL >= 5.7.7 (older ones roll prepared XA back on disconnect),
  MySQL ``legacy_xa_rollback_at_disconnect`` OFF, and ``XA RECOVER`` allowed (MySQL 8 needs
  ``XA_RECOVER_ADMIN``) — the participants' own ``check()``;
* the log directory exists (or can be created), is writable, fsyncs, supports ``flock``,
  and is not on a network file system (the lock that proves a coordinator dead would lie).

And, as *advice* (``Check.advice``: reported, never a failure), what keeps waits on in-doubt
branches bounded and lets recovery in when the server is full (docs/operations.md):

* PostgreSQL: the sessions' ``lock_timeout`` is not 0 (xatm sets it unless the URL turns it
  off); ``client_connection_check_interval`` (PostgreSQL 14+) is not 0, so that a backend
  notices a dead client while it waits; connections are kept for recovery:
  ``reserved_connections`` (PostgreSQL 16+), or a connection limit on the role below what
  the server allows (older servers);
* PostgreSQL: no standby replicates asynchronously, and ``synchronous_commit`` is ``on`` or
  ``remote_apply``: otherwise a failover can lose what xatm committed (``xatm.node.failover``
  reports it afterwards); the same for the shared log's database, whose failover can lose
  COMMIT decisions;
* MySQL / MariaDB: ``innodb_lock_wait_timeout`` is not above the transaction timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xatm.core import deadline as _deadline
from xatm.core.deadline import step_bound
from xatm.core.participant import Participant
from xatm.core.urls import ResourceSpec, redact
from xatm.errors import ConfigurationError, ResourceError
from xatm.log.store import Store, directory_of, shared_url_of

_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "glusterfs", "ceph"}
)


@dataclass(frozen=True, slots=True)
class Check:
    """One check on one subject (a resource name, or ``log``)."""

    subject: str
    name: str
    ok: bool
    detail: str
    advice: bool = False  # a recommendation (``ok`` stays True): worth doing, not required

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "check": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "advice": self.advice,
        }


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Every check; ``ok`` when all passed."""

    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def advice(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.advice)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


def check_resource(
    name: str, participant: Participant, timeout: float | None = None
) -> list[Check]:
    """Reachability and 2PC fitness of one resource (and advice on bounded waits, judged
    against the transaction ``timeout``)."""
    where = participant.spec.redacted()
    try:
        conn = participant.connect()
    except ResourceError as e:
        return [Check(name, "reachable", False, f"{e}; is the server up and the URL right?")]
    bound = step_bound(30.0 if timeout is None else timeout)
    try:
        with _deadline.bounded(participant, conn, bound, "a doctor's check") as watch:
            checks = _checks(name, participant, conn, timeout)
    finally:
        participant.close(conn)
    if watch.fired:
        checks = [c for c in checks if c.ok]
        checks.append(
            Check(name, "reachable", False, f"{where}: no answer within {bound:g} s (cut)")
        )
    return checks


def _checks(name: str, participant: Participant, conn: Any, timeout: float | None) -> list[Check]:
    """The checks of one resource on ``conn`` (each failure becomes a failed check)."""
    where = participant.spec.redacted()
    try:
        version = participant.server_version(conn)
    except Exception as e:
        return [Check(name, "reachable", False, redact(f"{where}: {e}".strip()))]
    checks = [
        Check(name, "reachable", True, f"{where}: {version}"),
        Check(name, "driver", True, participant.driver_info(conn)),
    ]
    try:
        problems = participant.check(conn)
    except Exception as e:
        return [*checks, Check(name, "2pc", False, redact(f"the check failed: {e}".strip()))]
    if problems:
        checks += [Check(name, "2pc", False, p) for p in problems]
    else:
        checks.append(Check(name, "2pc", True, participant.two_phase_detail(conn)))
    try:
        checks += [
            Check(name, f.check, f.ok, f.detail, f.advice)
            for f in participant.wait_findings(conn, timeout)
        ]
    except Exception as e:
        checks.append(Check(name, "bounded-waits", True, redact(f"not checked: {e}".strip()), True))
    return checks


def _filesystem(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux), or None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, fstype = mount, parts[2]
    return fstype


def check_log_directory(directory: str | os.PathLike[str] | None) -> list[Check]:
    """The log directory: there (or creatable), writable, fsync, flock, local."""
    if directory is None:
        return [Check("log", "log-directory", False, "no log directory is configured")]
    path = Path(directory)
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return [Check("log", "log-directory", False, f"{parent} is not a directory")]
        if os.access(parent, os.W_OK | os.X_OK):
            return [Check("log", "log-directory", True, f"{path} will be created (in {parent})")]
        return [
            Check(
                "log",
                "log-directory",
                False,
                f"{path} does not exist and {parent} is not writable: create it for the"
                " user that runs xatm (mode 0700)",
            )
        ]
    if not path.is_dir():
        return [Check("log", "log-directory", False, f"{path} is not a directory")]
    probe = path / f".xatm-doctor-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return [
            Check(
                "log",
                "log-directory",
                False,
                f"{path} is not writable ({e.strerror}): give the user that runs xatm write access",
            )
        ]
    checks = []
    try:
        os.write(fd, b"xatm")
        os.fsync(fd)
        checks.append(Check("log", "log-directory", True, f"{path} is writable and fsyncs"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            checks.append(Check("log", "flock", True, "flock() works"))
        except OSError as e:
            checks.append(
                Check("log", "flock", False, f"flock() fails here ({e.strerror}): use a local disk")
            )
    except OSError as e:
        checks.append(Check("log", "log-directory", False, f"writing in {path} fails: {e}"))
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
    fstype = _filesystem(path)
    if fstype in _NETWORK_FS:
        checks.append(
            Check(
                "log",
                "local-disk",
                False,
                f"{path} is on a network file system ({fstype}): the log's lock cannot prove a"
                " coordinator dead there; use a local disk",
            )
        )
    elif fstype is not None:
        checks.append(Check("log", "local-disk", True, f"file system type {fstype}"))
    return checks


def check_shared_log(url: str | ResourceSpec) -> list[Check]:
    """A log kept in a PostgreSQL database: can it be reached?"""
    from xatm.core.urls import parse_url
    from xatm.participants.postgres.health import LOG_LOSS, replication_findings
    from xatm.participants.postgres.participant import PostgresParticipant

    try:
        spec = url if isinstance(url, ResourceSpec) else parse_url(url)
    except ConfigurationError as e:
        return [Check("log", "shared-log", False, str(e))]
    participant = PostgresParticipant("log", spec)
    try:
        conn = participant.connect()
    except ResourceError as e:
        return [Check("log", "shared-log", False, f"{e}; is the server up and the URL right?")]
    try:
        with _deadline.bounded(participant, conn, step_bound(30.0), "a doctor's check"):
            version = str(participant.scalar(conn, "SHOW server_version"))
            findings = replication_findings(conn, LOG_LOSS)
    except Exception as e:
        return [Check("log", "shared-log", False, redact(f"{spec.redacted()}: {e}".strip()))]
    finally:
        participant.close(conn)
    return [
        Check("log", "shared-log", True, f"{spec.redacted()}: PostgreSQL {version}"),
        *(Check("log", f.check, f.ok, f.detail, f.advice) for f in findings),
    ]


def diagnose(
    participants: Mapping[str, Participant], store: Store, timeout: float | None = None
) -> DoctorReport:
    """Run every check: the resources', then the log's of the kind the ``store`` has (a
    shared PostgreSQL log, or a directory); ``timeout``: the transaction timeout, which lock
    waits should not outlast."""
    checks: list[Check] = []
    for name, participant in participants.items():
        checks += check_resource(name, participant, timeout)
    log_url = shared_url_of(store)  # the doctor's two checks of the log ask the store which
    if log_url is not None:
        checks += check_shared_log(log_url)
    else:
        checks += check_log_directory(directory_of(store))
    return DoctorReport(tuple(checks))
