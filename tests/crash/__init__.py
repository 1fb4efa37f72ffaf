"""Crash tests: SIGKILL matrices, phase-2 faults, log interrupts, a full disk."""
