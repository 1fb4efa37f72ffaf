"""Recovery: settle xatm's prepared branches by the decision rule; the sweeper."""
