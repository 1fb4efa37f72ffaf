"""Examples: the demo of `make demo`, and a small typed app."""
