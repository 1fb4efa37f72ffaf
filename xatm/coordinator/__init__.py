"""The TransactionManager: its arguments, and the pieces it puts together."""
