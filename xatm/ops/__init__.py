"""Operators' tools: inspection, manual resolution with an audit trail, doctor."""
