"""A small typed application on xatm: threaded, asyncio and a saga; ``mypy --strict`` passes."""
