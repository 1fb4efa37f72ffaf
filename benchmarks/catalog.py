"""Every benchmark mode by name: the threaded ones (``benchmarks.modes``) and the asyncio ones
(``benchmarks.aio_modes``, run as tasks on one event loop)."""

from __future__ import annotations

from .aio_modes import RawAsyncMode, XatmAsyncMode
from .modes import MODES as THREADED
from .modes import ModeFactory

MODES: dict[str, ModeFactory] = {
    **THREADED,
    "xatm-async": XatmAsyncMode,  # type: ignore[dict-item]
    "raw-async": RawAsyncMode,  # type: ignore[dict-item]
}
