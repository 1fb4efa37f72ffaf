"""The one first-line helper (``xatm.core.text.first_line``) and ``describe_error`` on it."""

from __future__ import annotations

from xatm.core.text import first_line
from xatm.core.urls import describe_error


def test_first_line() -> None:
    assert first_line("  one\ntwo\n") == "one"
    assert first_line(" \n ", "blank") == "blank"
    assert first_line("") == ""


def test_describe_error() -> None:
    assert describe_error(ValueError("at postgresql://u:secret@h/db\nmore")) == (
        "at postgresql://u:***@h/db"
    )
    assert describe_error(TimeoutError()) == "TimeoutError"
