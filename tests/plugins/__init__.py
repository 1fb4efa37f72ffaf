"""Shared pytest fixtures, as plugins loaded by tests/conftest.py (``pytest_plugins``)."""
