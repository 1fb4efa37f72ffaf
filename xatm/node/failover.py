"""PostgreSQL failover: notice it, never make it worse, and report what it may have lost.

**Detection.** Every new connection to a PostgreSQL resource reads the server's timeline and
next transaction id in the session set-up it already sends
(``xatm.participants.postgres.participant``), and hands them to the manager's :class:`FailoverWatch`
before the connection is used. The watch compares them with the node's durable record
(``xatm.log.timelines``): a timeline other than the one recorded (a promoted standby, a
point-in-time restore) is a *switch*. A switch is written to the record (durably) before the
connection is handed out, with the new primary's next transaction id at that moment: the first
connection of this process to the new primary, before it wrote there. (A server put back to an older
copy of itself without a new timeline, a file-system snapshot say, is not seen: a lower next
transaction id cannot be told from a connection that read it a moment earlier than another.)

**Never worse.** With asynchronous replication the new primary may lack the last WAL of the
old one: a transaction's ``COMMIT PREPARED`` (its branch comes back *prepared* although its
decision was ended) or its ``PREPARE`` (the branch is gone). So the logs keep ended COMMIT
decisions for a while (``retain``), recovery looks a branch's decision up among them when
its resource switched after the branch was created (:func:`switched_since`), and commits a
branch that comes back. Where the retained decisions do not reach back to the branch's
creation, nothing can tell whether it was decided COMMIT: the branch is left in doubt
(``xatm.core.decide``, fact ``failover``) instead of being presumed aborted.

**The report** (``xatm.recovery.failover_report``, run by recovery passes once per
switch). For each COMMIT decision this node made before it detected the switch (and after
the previous one) with a branch on that resource, from what the log retains, the branch's
PostgreSQL transaction id ``t`` (logged with the decision) is looked up on the new primary:

* ``t`` at or above :attr:`xatm.log.timelines.Switch.lost_from` (the new primary's next
  transaction id when this process first connected to it, or that of the new timeline's
  first checkpoint): the new primary had not assigned ``t``, so neither its PREPARE nor its
  COMMIT PREPARED reached it: **lost** (certain);
* ``pg_xact_status(t)`` ``aborted``: **lost** (certain: whatever ``t`` is there, it is not
  a committed branch);
* ``in progress`` and the branch listed as prepared: it came back; recovery commits it
  (not lost);
* ``committed``: not reported. Not certain in one case: a transaction id assigned on the
  old primary after the standby's last replayed one, and assigned again on the new primary
  to another client's transaction that committed before this process first connected
  (``t`` below ``lost_from`` but at or above the next transaction id at the promotion,
  which PostgreSQL does not show without privileges);
* ``in progress`` not prepared (the id is another transaction's now), no status (too old),
  or no transaction id logged: **unknown** (possibly lost).

A lost transaction is a heuristic outcome (``HEURISTIC OUTCOME`` at ERROR, the audit trail,
the recovery report's ``heuristics``); an unknown one is *possibly lost* (WARNING, audit
action ``possibly-lost``, the report's ``possibly_lost``). Both are kept in the switch's
record, which ``xatm indoubt`` lists, and counted in the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Literal

from xatm.core import events as _events
from xatm.core.logfields import log_fields
from xatm.core.urls import redact
from xatm.log.timelines import Loss, LossStatus, ResourceTimeline, Switch, TimelineStore
from xatm.participants.postgres.participant import Change

logger = logging.getLogger("xatm.failover")

#: seconds of clock difference allowed between a gtrid's creation time (its host's clock)
#: and a horizon (the log's clock: the shared log's server) when asking whether the
#: retained decisions reach back to a branch
HORIZON_SKEW = 5.0
#: possibly lost transactions are listed by ``xatm indoubt`` for this long after the switch
LOSS_REPORT_AGE = 7 * 86400.0


class FailoverWatch:
    """One node's view of its PostgreSQL resources' timelines (see the module docstring).

    ``store`` keeps the record (None: in memory only); ``writable`` False only looks (an
    inspector): it follows the timelines it sees and records nothing."""

    def __init__(self, node: str, store: TimelineStore | None, *, writable: bool = True) -> None:
        self.node = node
        self._store = store
        self._writable = writable and store is not None
        self._lock = threading.Lock()
        self._records: dict[str, ResourceTimeline] = dict(store.load(node)) if store else {}
        #: the timeline the latest connection saw
        self._current: dict[str, int] = {}

    # -- detection (called by the PostgreSQL participants, once per new connection) -------
    def changed(self, resource: str, timeline: int, next_xid: int | None) -> Change:
        """What a new connection's state means (only ``same`` is handled here). A watch
        that does not write only follows the timeline: always ``same``."""
        if not self._writable:
            with self._lock:
                self._current[resource] = timeline
            return "same"
        with self._lock:
            record = self._records.get(resource)
            if record is None or record.timeline != timeline:
                return "timeline"
            self._current[resource] = timeline
            return "same"

    def record(self, resource: str, timeline: int, next_xid: int | None, bound: int | None) -> None:
        """Record a connection's state that :meth:`changed` did not find ``same``: the
        first one seen, a switch (written durably before this returns), or the same
        switch seen again by another connection (its next xid kept at the least)."""
        event = None
        with self._lock:
            self._current[resource] = timeline
            record = self._records.get(resource)
            if record is None:
                new = ResourceTimeline(timeline, time.time())
            elif record.timeline != timeline:
                event = Switch(record.timeline, timeline, time.time(), next_xid, bound)
                new = record.with_switch(event)
            else:
                # another connection recorded this switch first: keep the least next xid
                last = record.switches[-1] if record.switches else None
                if (
                    last is None
                    or last.new != timeline
                    or next_xid is None
                    or (last.next_xid is not None and last.next_xid <= next_xid)
                ):
                    return
                new = record.replace_switch(last, replace(last, next_xid=next_xid))
            self._save(resource, new)
            self._records[resource] = new
        if event is not None:
            logger.warning(
                "FAILOVER: PostgreSQL resource %r is on a new timeline: %d -> %d (next"
                " transaction id %s); recovery checks the transactions committed there before",
                resource,
                event.old,
                event.new,
                next_xid,
                extra=log_fields(self.node, resource=resource),
            )
            _events.failover_detected(self.node, resource, event.old, event.new)

    def _save(self, resource: str, record: ResourceTimeline) -> None:
        if not self._writable or self._store is None:
            return
        try:
            self._store.save(self.node, resource, record)
        except Exception as e:  # the record stays in memory: this process still knows
            logger.error(
                "cannot record the timeline of resource %r: %s (a restart may detect the"
                " failover again, later)",
                resource,
                redact(str(e)),
                extra=log_fields(self.node, resource=resource),
            )

    # -- what recovery and inspection ask --------------------------------------------------
    def records(self) -> dict[str, ResourceTimeline]:
        with self._lock:
            return dict(self._records)

    def current(self, resource: str) -> int | None:
        """The timeline the latest connection to ``resource`` saw (None: none yet)."""
        with self._lock:
            return self._current.get(resource)

    def lost_txid(self, resource: str, txid: int | None, decided_at: float) -> Switch | None:
        """The switch after which the branch with PostgreSQL transaction id ``txid``,
        decided at ``decided_at``, is certainly not on ``resource`` any more (None: none
        says so)."""
        if txid is None:
            return None
        with self._lock:
            record = self._records.get(resource)
        for switch in record.switches if record is not None else ():
            bound = switch.lost_from
            if switch.detected_at > decided_at and bound is not None and txid >= bound:
                return switch
        return None

    def mark_checked(self, resource: str, switch: Switch, done: Switch) -> None:
        with self._lock:
            record = self._records.get(resource)
            if record is None or switch not in record.switches:
                return
            new = record.replace_switch(switch, done)
            self._save(resource, new)
            self._records[resource] = new


def switched_since(
    records: Iterable[ResourceTimeline], created_at: float, current: int | None
) -> bool:
    """Did the resource fail over after ``created_at``, by any of these nodes' records of
    it: a switch detected later, or a node's last recorded timeline that is not the one the
    resource is on now (that node never saw the switch: whatever it prepared there, it
    prepared on the old timeline)?"""
    for record in records:
        if any(s.detected_at > created_at for s in record.switches):
            return True
        if current is not None and record.timeline != current:
            return True
    return False


def covered(created_at: float, horizon: float) -> bool:
    """Do the retained decisions (every COMMIT decided after ``horizon``) reach back to a
    branch created at ``created_at``?"""
    return created_at > horizon + HORIZON_SKEW


#: what a failover means for a branch with no pending decision: nothing (no switch since
#: it was created, or the retained decisions vouch that none was logged), a COMMIT found
#: among the retained (ended) decisions, or nothing can tell (the ``failover`` fact)
AfterFailover = Literal["none", "commit", "unknown"]


def after_failover(
    records: Iterable[ResourceTimeline | None],
    created_at: float,
    current: int | None,
    retained: Callable[[], bool],
    horizon: Callable[[], float],
) -> AfterFailover:
    """For a branch with no pending decision, created at ``created_at`` (recovery and
    inspection ask this alike): ``records`` are the records of its resource by this node
    and by the branch's node, ``current`` the resource's timeline now, ``retained`` whether
    the branch's node's log still holds a COMMIT of it (ended), ``horizon`` since when that
    log holds them all."""
    if not switched_since([r for r in records if r is not None], created_at, current):
        return "none"
    if retained():
        return "commit"
    return "none" if covered(created_at, horizon()) else "unknown"


# -- the report -------------------------------------------------------------------------------
def classify(
    txid: int | None, lost_from: int | None, status: str | None, prepared: bool
) -> tuple[LossStatus | None, str]:
    """The verdict on one branch of a transaction committed before the switch (see the
    module docstring): (``lost`` / ``unknown`` / None for not lost, why)."""
    if txid is None:
        return "unknown", "no PostgreSQL transaction id was logged for the branch"
    if lost_from is not None and txid >= lost_from:
        return "lost", (
            f"transaction {txid} was never assigned on the new primary (its next transaction"
            f" id was {lost_from} when this process first reached it): neither the PREPARE nor"
            " the COMMIT PREPARED was replicated"
        )
    if status == "future":
        return "lost", f"transaction {txid} was never assigned on the new primary"
    if status == "aborted":
        return "lost", f"transaction {txid} is aborted on the new primary"
    if status == "committed":
        return None, f"transaction {txid} is committed on the new primary"
    if status == "in progress":
        if prepared:
            return None, f"the branch came back prepared (transaction {txid}): recovery commits it"
        return "unknown", (
            f"transaction id {txid} belongs to a running transaction on the new primary: the"
            " branch's cannot be told apart"
        )
    return "unknown", f"the new primary no longer keeps the status of transaction {txid}"


def recent_losses(
    records: Mapping[str, Mapping[str, ResourceTimeline]], now: float
) -> list[tuple[str, str, Switch, Loss]]:
    """(node, resource, switch, loss) of every loss found after a switch detected within
    :data:`LOSS_REPORT_AGE`, oldest switch first (what ``xatm indoubt`` lists)."""
    out: list[tuple[str, str, Switch, Loss]] = []
    for node, by_resource in records.items():
        for resource, record in by_resource.items():
            for switch in record.switches:
                if now - switch.detected_at > LOSS_REPORT_AGE:
                    continue
                out.extend((node, resource, switch, loss) for loss in switch.losses)
    out.sort(key=lambda x: (x[2].detected_at, x[3].decided_at, x[3].gtrid))
    return out
