"""The participant adapter for a resource: one per kind of database server."""

from __future__ import annotations

from ._mysql import MySQLParticipant
from ._participant import Participant
from ._postgres import PostgresParticipant
from ._urls import ResourceSpec


def make_participant(name: str, spec: ResourceSpec, timeout: float | None = None) -> Participant:
    """The participant adapter for ``spec``'s kind of server (``timeout``: the transaction
    timeout, which bounds its sessions' waits and sets its drivers' backstops at connect)."""
    if spec.kind == "postgresql":
        return PostgresParticipant(name, spec, timeout=timeout)
    return MySQLParticipant(name, spec, timeout=timeout)
