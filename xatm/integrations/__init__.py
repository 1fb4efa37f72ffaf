"""Integrations that join xatm through its public hooks."""
