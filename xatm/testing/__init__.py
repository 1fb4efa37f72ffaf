"""Testing aids: private database servers for tests and demos."""
