"""Tests without servers: pure functions, the file log, configuration, the public API."""
