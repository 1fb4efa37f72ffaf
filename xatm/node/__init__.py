"""A coordinator node: its identity lease, failover watch, and the context of its parts."""
