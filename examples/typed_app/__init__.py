"""A small typed application on xatm: threaded (``bank``), asyncio (``service``), a saga
(``sagas``) and a FastAPI endpoint (``web``); ``mypy --strict`` passes on it."""
