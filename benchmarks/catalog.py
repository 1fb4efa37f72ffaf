"""Every benchmark mode by name: the threaded ones (``benchmarks.modes``), the asyncio ones
(``benchmarks.aio_modes``, run as tasks on one event loop) and the multi-process ones
(``benchmarks.mp``, run as child processes)."""

from __future__ import annotations

from .aio_modes import RawAsyncMode, XatmAsyncCancelMode, XatmAsyncMode
from .modes import MODES as THREADED
from .modes import ModeFactory
from .mp import MODES as MULTIPROCESS

MODES: dict[str, ModeFactory] = {
    **THREADED,
    "xatm-async": XatmAsyncMode,  # type: ignore[dict-item]
    "raw-async": RawAsyncMode,  # type: ignore[dict-item]
    "xatm-async-cancel": XatmAsyncCancelMode,  # type: ignore[dict-item]
    **MULTIPROCESS,
}
