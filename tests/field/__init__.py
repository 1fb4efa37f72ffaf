"""Omission faults: identity leases, silent servers, bounded waits, failover, field_*."""
