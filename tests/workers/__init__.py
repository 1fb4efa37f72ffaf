"""Worker processes the tests start (``python -m tests.workers.<name>``)."""
