"""What each node has seen of its PostgreSQL resources' timelines, kept durably.

A PostgreSQL standby that is promoted starts a new timeline; so does a restore to a point
in time. xatm notes, per node and per PostgreSQL resource, the last timeline it saw and the
switches it detected (``xatm.node.failover`` decides what a switch means; this module only keeps
the record). Each node keeps its own record, where its log is:

* a file log: ``<log>/<node_id>/timelines``, one JSON document for every resource of the
  node, replaced atomically (written to a temporary file, fsynced, renamed, the directory
  fsynced), beside the node's ``markers``;
* the shared log: one row per (node, resource) of the table ``timelines``
  (``xatm.log.shared``).

A record is small: the current timeline, when it was first seen, and at most
:data:`MAX_SWITCHES` switches, each with what the failover check found (:class:`Loss`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from xatm.log.file import fsync_dir

if TYPE_CHECKING:
    from xatm.log.shared import PostgresLog

FILE = "timelines"
#: switches kept per resource (the oldest go first)
MAX_SWITCHES = 16

#: what the failover check found for one transaction: ``lost`` (certain: its branch on the
#: resource is not on the new primary), ``unknown`` (cannot be told: possibly lost)
LossStatus = Literal["lost", "unknown"]


@dataclass(frozen=True, slots=True)
class Loss:
    """A transaction xatm committed on the resource before the switch, that the new primary
    does not have (``lost``) or of which it cannot tell (``unknown``)."""

    gtrid: str
    txid: int | None
    decided_at: float
    status: LossStatus
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Switch:
    """One change of a resource's timeline, as this node saw it.

    ``next_xid``: the new primary's next transaction id when this process first connected
    to it (before it wrote there); ``bound``: the next transaction id of the new timeline's
    first checkpoint, if one was readable. Both are at least the next transaction id at the
    promotion, so a transaction id of the old timeline at or above either was never
    replayed on the new one. ``checked_at``: when the failover check ran (None: not yet),
    ``losses``: what it found, ``window_start``: the oldest decision time it could check."""

    old: int
    new: int
    detected_at: float
    next_xid: int | None = None
    bound: int | None = None
    checked_at: float | None = None
    window_start: float | None = None
    checked: int = 0  # decisions checked
    losses: tuple[Loss, ...] = ()

    @property
    def lost_from(self) -> int | None:
        """The least transaction id certainly not replayed on the new timeline."""
        known = [x for x in (self.next_xid, self.bound) if x is not None]
        return min(known) if known else None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["losses"] = [loss.to_json() for loss in self.losses]
        return body


@dataclass(frozen=True, slots=True)
class ResourceTimeline:
    """One node's record of one PostgreSQL resource."""

    timeline: int
    seen_at: float
    switches: tuple[Switch, ...] = field(default=())

    def with_switch(self, switch: Switch) -> ResourceTimeline:
        kept = (*self.switches, switch)[-MAX_SWITCHES:]
        return ResourceTimeline(switch.new, switch.detected_at, kept)

    def replace_switch(self, old: Switch, new: Switch) -> ResourceTimeline:
        return replace(self, switches=tuple(new if s == old else s for s in self.switches))

    def to_json(self) -> dict[str, Any]:
        return {
            "timeline": self.timeline,
            "seen_at": self.seen_at,
            "switches": [s.to_json() for s in self.switches],
        }

    @classmethod
    def from_json(cls, body: Any) -> ResourceTimeline:
        """Parse a record; ValueError if it is not one."""
        try:
            switches = tuple(
                Switch(
                    **{
                        **{k: v for k, v in s.items() if k != "losses"},
                        "losses": tuple(Loss(**loss) for loss in s.get("losses", ())),
                    }
                )
                for s in body.get("switches", ())
            )
            return cls(int(body["timeline"]), float(body["seen_at"]), switches)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"not a timeline record: {e}") from None


class TimelineStore(Protocol):
    """Where the nodes' timeline records are kept."""

    def load(self, node: str) -> dict[str, ResourceTimeline]:
        """``node``'s records, by resource (unreadable ones are left out)."""
        ...

    def save(self, node: str, resource: str, record: ResourceTimeline) -> None:
        """Replace ``node``'s record of ``resource``, durably."""
        ...

    def every_node(self) -> dict[str, dict[str, ResourceTimeline]]:
        """Every node's records, by node."""
        ...


def _parse(text: str) -> ResourceTimeline | None:
    try:
        return ResourceTimeline.from_json(json.loads(text))
    except ValueError:
        return None


class FileTimelines:
    """Records in ``<log>/<node_id>/timelines`` (file logs)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def load(self, node: str) -> dict[str, ResourceTimeline]:
        try:
            body = json.loads((self.directory / node / FILE).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(body, dict):
            return {}
        out = {}
        for resource, text in body.items():
            record = _parse(json.dumps(text))
            if record is not None:
                out[str(resource)] = record
        return out

    def save(self, node: str, resource: str, record: ResourceTimeline) -> None:
        node_dir = self.directory / node
        node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        every = {r: v.to_json() for r, v in self.load(node).items()}
        every[resource] = record.to_json()
        tmp = node_dir / f"{FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(every, sort_keys=True).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, node_dir / FILE)
        fsync_dir(node_dir)

    def every_node(self) -> dict[str, dict[str, ResourceTimeline]]:
        out = {}
        if self.directory.is_dir():
            for child in sorted(self.directory.iterdir()):
                if (child / FILE).is_file():
                    out[child.name] = self.load(child.name)
        return out


class SharedTimelines:
    """Records in the shared log's ``timelines`` table."""

    def __init__(self, log: PostgresLog) -> None:
        self._log = log

    def load(self, node: str) -> dict[str, ResourceTimeline]:
        return {r: rec for _, r, rec in self._rows(node)}

    def save(self, node: str, resource: str, record: ResourceTimeline) -> None:
        self._log.save_timeline(node, resource, json.dumps(record.to_json(), sort_keys=True))

    def every_node(self) -> dict[str, dict[str, ResourceTimeline]]:
        out: dict[str, dict[str, ResourceTimeline]] = {}
        for node, resource, record in self._rows(None):
            out.setdefault(node, {})[resource] = record
        return out

    def _rows(self, node: str | None) -> list[tuple[str, str, ResourceTimeline]]:
        out = []
        for n, r, body in self._log.timelines(node):
            record = _parse(body)
            if record is not None:
                out.append((n, r, record))
        return out


def histories(
    records: Mapping[str, Mapping[str, ResourceTimeline]], resource: str
) -> list[ResourceTimeline]:
    """The records of ``resource`` in several nodes' records."""
    return [r[resource] for r in records.values() if resource in r]
