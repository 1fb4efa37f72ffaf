"""The participants: each database server's two-phase commit, quirks and pools."""
