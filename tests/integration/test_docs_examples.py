"""Every code example in README.md and docs/*.md runs as written.

The convention (also stated in docs/getting-started.md):

- A ```python block is **runnable**: it is run as a script of its own (``python example.py``,
  a fresh process, in an empty working directory) against the test suite's private servers,
  and must exit 0 within two minutes, leaving no prepared transaction behind.
- A ```python block whose previous non-blank line is ``<!-- fragment -->`` is a **fragment**
  (a signature, a piece of a larger program): it is only compiled. Use it sparingly.
- Examples are written against readable placeholders, which the test replaces before running:
  a URL whose host is ``db1`` (PostgreSQL), ``db2`` (MariaDB/MySQL), ``db3`` (a second
  PostgreSQL) or ``logdb`` (the shared log's PostgreSQL database) points at the matching
  private server (its scheme's ``+driver`` and its query options are kept); the directory
  ``/var/lib/xatm`` is a fresh temporary one. The working directory holds ``xatm.toml``
  (resources ``ledger`` on db1 and ``wallet`` on db2, log ``./xatm-log``), so
  ``TransactionManager.from_config("xatm.toml")`` works as in getting-started.md.
- Each database has a table ``acc (id INT PRIMARY KEY, bal INT NOT NULL)`` with accounts 1 to 4
  holding 1000 each, made afresh for every example (the tables ``ledger`` and ``wallet`` that
  examples create are dropped first).
- ```sh / ```console / ```bash blocks and the command lists of operations.md are checked
  for their ``xatm`` commands: every subcommand and every option must exist in the CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest

from tests.support import ROOT, Servers, connect, run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    fragment: bool
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    out: list[Block] = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            start = i
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            prev = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
            rel = str(path.relative_to(ROOT))
            code = "\n".join(lines[start + 1 : j]) + "\n"
            out.append(Block(rel, start + 1, m.group(1), prev == FRAGMENT, code))
            i = j + 1
    return out


PYTHON = [b for b in blocks() if b.lang == "python"]


def test_the_docs_have_examples() -> None:
    assert len(PYTHON) >= 15
    assert any(b.doc == "docs/getting-started.md" for b in PYTHON)
    fragments = [b for b in PYTHON if b.fragment]
    assert len(fragments) <= len(PYTHON) // 3, "fragments are for signatures, used sparingly"


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_a_python_block_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec")


# -- running the runnable blocks --------------------------------------------------------------

_URL = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+]*)://(?:[^@/\s\"']*@)?(?P<host>db1|db2|db3|logdb)"
    r"(?::\d+)?(?:/[A-Za-z0-9_]*)?(?P<query>\?[^\s\"']*)?"
)


def _placeholders(servers: Servers, log_url: str) -> dict[str, str]:
    return {
        "db1": servers.urls["pg1"],
        "db2": servers.urls["maria"],
        "db3": servers.urls["pg2"],
        "logdb": log_url,
    }


def substitute(code: str, urls: dict[str, str], log_dir: Path) -> str:
    """The example with its placeholder URLs and directory pointing at the test's own."""

    def url(m: re.Match[str]) -> str:
        real = urlsplit(urls[m.group("host")])
        scheme = m.group("scheme")
        if "+" not in scheme:
            scheme = real.scheme
        query = m.group("query") or (f"?{real.query}" if real.query else "")
        return f"{scheme}://{real.netloc}{real.path}{query}"

    return _URL.sub(url, code).replace("/var/lib/xatm", str(log_dir))


def _config(urls: dict[str, str]) -> str:
    return (
        'node_id = "docs"\n'
        'log = "xatm-log"\n'
        f'[resources.ledger]\nurl = "{urls["db1"]}"\n'
        f'[resources.wallet]\nurl = "{urls["db2"]}"\n'
    )


#: tables the examples make (dropped before each one)
EXAMPLE_TABLES = ("acc", "ledger", "wallet")


def _fresh_accounts(urls: dict[str, str]) -> None:
    for name in ("db1", "db2"):
        conn = connect(urls[name])
        try:
            engine = " ENGINE=InnoDB" if name == "db2" else ""
            for table in EXAMPLE_TABLES:
                run(conn, f"DROP TABLE IF EXISTS {table}")
            run(conn, f"CREATE TABLE acc (id INT PRIMARY KEY, bal INT NOT NULL){engine}")
            run(conn, "INSERT INTO acc VALUES (1, 1000), (2, 1000), (3, 1000), (4, 1000)")
        finally:
            conn.close()


def _prepared_left(urls: dict[str, str]) -> list[str]:
    left: list[str] = []
    for name in ("db1", "db3"):
        conn = connect(urls[name])
        try:
            left += [r[0] for r in run(conn, "SELECT gid FROM pg_prepared_xacts")]
        finally:
            conn.close()
    conn = connect(urls["db2"])
    try:
        left += [repr(r[3]) for r in run(conn, "XA RECOVER")]
    finally:
        conn.close()
    return left


RUNNABLE = [b for b in PYTHON if not b.fragment]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_a_python_example_runs(
    block: Block, servers: Servers, log_url: str, tmp_path: Path
) -> None:
    urls = _placeholders(servers, log_url)
    _fresh_accounts(urls)
    (tmp_path / "xatm.toml").write_text(_config(urls))
    script = tmp_path / "example.py"
    script.write_text(substitute(block.code, urls, tmp_path / "var-lib-xatm"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XATM_PROMETHEUS": "0"}
    env.pop("XATM_CONFIG", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"{block.id} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    assert _prepared_left(urls) == [], f"{block.id} left prepared transactions"


# -- the xatm commands the docs show ----------------------------------------------------------

_SHELL = {"sh", "bash", "console", "shell", ""}


def commands() -> list[tuple[str, str]]:
    """(where, command line) for every ``xatm ...`` line of a shell-ish block."""
    found: list[tuple[str, str]] = []
    for b in blocks():
        if b.lang not in _SHELL:
            continue
        for k, line in enumerate(b.code.splitlines()):
            text = line.strip().removeprefix("$ ")
            text = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", text)  # VAR=value before the command
            if text.startswith("xatm ") or text == "xatm":
                # a command list: the command, then two spaces and what it does
                text = re.split(r"\s{2,}|\s#", text)[0]
                text = re.split(r"\s[|>]|&&|;", text)[0]
                found.append((f"{b.doc}:{b.line + 1 + k}", text))
    return found


COMMANDS = commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 10


def _options(cmd: click.Command) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_exists(where: str, line: str) -> None:
    from xatm.cli.main import main

    tokens = shlex.split(line.replace("[", " ").replace("]", " "))[1:]
    cmd: click.Command = main
    allowed = _options(main)
    for tok in tokens:
        if tok.startswith("-"):
            name = tok.split("=", 1)[0]
            assert name in allowed, f"{where}: `{line}`: no option {name}"
            continue
        if isinstance(cmd, click.Group):
            group = cmd
            subs = [group.get_command(click.Context(group), alt) for alt in tok.split("|")]
            for alt, sub in zip(tok.split("|"), subs, strict=True):
                if sub is None and alt.islower() and alt.isalpha():
                    raise AssertionError(f"{where}: `{line}`: no command {alt!r}")
                if sub is not None:  # `retry|abort`: the options of either
                    cmd = sub
                    allowed |= _options(sub)
