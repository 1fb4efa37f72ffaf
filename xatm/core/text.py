"""Text helpers shared by every layer: the first line of a (multi-line) message."""

from __future__ import annotations


def first_line(text: str, default: str = "") -> str:
    """The first line of ``text`` once stripped (``default`` when it is blank): how xatm
    shows a driver's error, whose text may run over several lines."""
    text = text.strip()
    return text.splitlines()[0] if text else default
