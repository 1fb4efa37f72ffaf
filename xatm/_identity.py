"""Node identity: at most one live process per node_id on every resource it uses.

Every gtrid carries its coordinator's node_id, and recovery presumes abort for a branch of its
own node that this process is not running. That is safe only if no other process runs under
the same node_id against the same database server: two processes with one node_id (two log
directories, or two deployments sharing a MariaDB server) would roll back each other's
branches. So a manager holds, for its whole life, a session lock named after its node_id on
every resource (the adapters' ``take_identity``: ``GET_LOCK('xatm:node:<id>', 0)`` on
MySQL/MariaDB, server-wide like ``XA RECOVER``; a session advisory lock on PostgreSQL, per
database like the filtered ``pg_prepared_xacts``):

* at start, a lock held by another session makes the manager refuse to start
  (:class:`~xatm.ConfigurationError` naming the node and the resource), after waiting up to
  ``wait`` seconds (a killed predecessor's session may take a moment to go);
* a resource that cannot be reached at start gets its lock when it is next asked for;
* a keeper thread checks every lock once a second (a ping on its connection) and takes a
  lost one back at once (its session cut, its server restarted), so that a second process
  with the same node_id finds it held;
* before an own-node presumed abort, recovery asks :meth:`IdentityLocks.held`, which checks
  that the lock's session is still alive (one round trip) and takes the lock again if the
  session was lost; where it cannot, recovery leaves the branch.

The locks live on connections of their own, outside the pools, so they also keep a
connection to each server that recovery can count on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from . import _deadline
from ._participant import Connection, Participant
from .errors import ConfigurationError, ResourceError

logger = logging.getLogger("xatm.identity")

#: seconds between two checks of the identity locks by the keeper thread
KEEP_INTERVAL = 1.0


class IdentityLocks:
    """The identity locks of one node_id on every resource of one manager."""

    def __init__(self, participants: Mapping[str, Participant], node_id: str) -> None:
        self._participants = dict(participants)
        self.node_id = node_id
        self._conns: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # one check at a time: a connection per thread
        self._closed = False
        self._warned: set[str] = set()  # resources whose lock another process holds
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def acquire(self, wait: float) -> None:
        """Take the lock on every reachable resource; raise ConfigurationError (releasing
        every lock taken) if another session holds one for longer than ``wait`` seconds."""
        deadline = time.monotonic() + max(0.0, wait)
        for name, participant in self._participants.items():
            while True:
                try:
                    got = self._take(name, participant)
                except ResourceError as e:
                    logger.warning("identity lock on %r not taken yet: %s", name, e)
                    break
                if got:
                    break
                if time.monotonic() >= deadline:
                    self.close()
                    raise ConfigurationError(
                        f"node_id {self.node_id!r} is already in use on resource {name!r}: another"
                        f" live process holds its identity lock there (a second process with"
                        f" the same node_id, or another application on the same database"
                        f" server using it). Give every coordinator process its own node_id"
                    )
                time.sleep(0.1)

    def _take(self, name: str, participant: Participant) -> bool:
        """Connect and take the lock; True if taken (kept), False if another holds it."""
        conn = participant.connect()
        try:
            with _deadline.bounded(participant, conn, _deadline.GRACE, "an identity check"):
                got = participant.take_identity(conn, self.node_id)
        except Exception as e:
            participant.close(conn)
            raise ResourceError(str(e), resource=name) from None
        if not got:
            participant.close(conn)
            return False
        with self._lock:
            if self._closed:
                participant.close(conn)
                return False
            old = self._conns.pop(name, None)
            self._conns[name] = conn
        if old is not None:
            participant.close(old)
        return True

    def keep(self, interval: float = KEEP_INTERVAL) -> None:
        """Check every lock each ``interval`` seconds on a background thread, taking a lost
        one (its session cut, its server restarted) back at once, before another process
        with the same node_id could take it."""
        if self._keeper is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                for name in list(self._participants):
                    if self._stop.is_set():
                        return
                    try:
                        self.held(name)
                    except Exception:  # a check must never end the thread
                        logger.debug("identity check on %r failed", name, exc_info=True)

        self._keeper = threading.Thread(
            target=loop, name=f"xatm-identity-{self.node_id}", daemon=True
        )
        self._keeper.start()

    def held(self, name: str) -> bool:
        """Does this process (still) hold the node's identity on ``name``? Takes it again
        if its session was lost and nobody else has it. One round trip."""
        with self._checking:
            return self._held(name)

    def _held(self, name: str) -> bool:
        participant = self._participants.get(name)
        if participant is None or self._closed:
            return False
        with self._lock:
            conn = self._conns.get(name)
        if conn is not None and _ping(participant, conn):
            return True
        try:
            if self._take(name, participant):
                self._warned.discard(name)
                return True
        except ResourceError:
            return False
        if name in self._warned:
            return False
        self._warned.add(name)
        logger.error(
            "node_id %r: another process holds this node's identity lock on %r: two processes"
            " run with the same node_id; recovery leaves this node's branches there alone",
            self.node_id,
            name,
        )
        return False

    def close(self) -> None:
        """Release every lock (closing its session)."""
        self._stop.set()
        keeper = self._keeper
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout=10.0)
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, {}
        for name, conn in conns.items():
            self._participants[name].close(conn)


def _ping(participant: Participant, conn: Connection) -> bool:
    """A ping of a lock's session, bounded (``xatm._deadline``): a silent server is a lost
    session."""
    with _deadline.bounded(participant, conn, _deadline.GRACE, "an identity check"):
        return participant.ping(conn)
