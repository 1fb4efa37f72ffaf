"""Chaos runs: transfers while coordinators, connections and servers are killed."""
