"""Human output of the ``xatm`` command: tables, ages, times, JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from xatm.cli import logs


def age(seconds: float | None) -> str:
    """``45s``, ``2m03s``, ``1h02m``, ``3d04h``."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(at: float | None) -> str:
    """A UTC timestamp, to the second."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A plain text table; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append(indent + "  ".join(padded).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def warn(message: str) -> None:
    logs.notice(message, logging.WARNING, text=f"warning: {message}")


class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._shown = 0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"... {text}"
        sys.stderr.write("\r" + line.ljust(self._shown))
        sys.stderr.flush()
        self._shown = len(line)

    def done(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r" + " " * self._shown + "\r")
            sys.stderr.flush()
            self._shown = 0
