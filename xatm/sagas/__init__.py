"""Sagas: definitions, the durable runner, its store, the barrier, operators' view."""
