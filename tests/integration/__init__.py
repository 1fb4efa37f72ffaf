"""Tests on the private database servers: the protocol, APIs, logs, integrations."""
