"""One global transaction, threaded and asyncio: the commit protocol driven."""
