"""The coordinator log: file and shared logs, the audit trail, each node's side files."""
