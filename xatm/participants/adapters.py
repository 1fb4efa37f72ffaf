"""The participant adapter for a resource: one per kind of database server."""

from __future__ import annotations

from xatm.core.participant import Participant
from xatm.core.urls import ResourceSpec
from xatm.participants.mysql.participant import MySQLParticipant
from xatm.participants.postgres.participant import PostgresParticipant


def make_participant(name: str, spec: ResourceSpec, timeout: float | None = None) -> Participant:
    """The participant adapter for ``spec``'s kind of server (``timeout``: the transaction
    timeout, which bounds its sessions' waits and sets its drivers' backstops at connect)."""
    if spec.kind == "postgresql":
        return PostgresParticipant(name, spec, timeout=timeout)
    return MySQLParticipant(name, spec, timeout=timeout)
