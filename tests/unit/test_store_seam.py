"""One storage seam: the kind of log (a directory of files, or the shared PostgreSQL log) is
chosen once, in ``xatm.log.store``, from the configuration; every other module asks the node's
store and never switches on the kind itself (a None check of a log directory or a shared log,
an ``isinstance`` of a backend, a look for ``://`` in the configured log)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support import ROOT
from xatm.log.store import (
    FileStore,
    PostgresStore,
    directory_of,
    open_store,
    shared_log_of,
    shared_url_of,
    store_from_setting,
)

#: what a switch on the kind of log looks like
SWITCHES = {
    "a None check of the log's kind": re.compile(
        r"\b(shared_log|log_directory|log_url|log_spec|_shared)\s+is\s+(not\s+)?None"
    ),
    "the kind read from a manager or its context": re.compile(
        r"\b(ctx|_ctx|context|manager|_tm|tm|inspector)\.(shared_log|log_directory)\b"
    ),
    "an isinstance of a backend": re.compile(
        r"isinstance\([^)]*\b(FileStore|PostgresStore|FileLogs|SharedLogs|PostgresLog|FileLog"
        r"|FileFleet|SharedFleet|FileSagaStore|PostgresSagaStore|AuditTrail|SharedAuditTrail)\b"
    ),
    "a look for a URL in the configured log": re.compile(r"[\"']://[\"']|\blog_is_shared\("),
}

#: where a switch belongs: the choice itself, and what checks or reads the configured text
ALLOWED = {
    # the rule itself: is the configured log a URL?
    "xatm/core/urls.py": {"a look for a URL in the configured log"},
    "xatm/log/store.py": set(SWITCHES),  # the one choice, and the public attributes' helpers
    # a manager's arguments checked before anything is opened (markers need a file log)
    "xatm/coordinator/arguments.py": {
        "a None check of the log's kind",
        "a look for a URL in the configured log",
    },
    # the doctor's two checks of the log (asked of the store)
    "xatm/ops/doctor.py": {"a None check of the log's kind"},
    # a relative log directory is resolved against the config file's directory
    "xatm/core/config.py": {"a look for a URL in the configured log"},
    # the command's messages about the configured log (it uses the public modules only)
    "xatm/cli/look.py": {"a look for a URL in the configured log"},
}


def test_only_the_store_switches_on_the_kind_of_log() -> None:
    found = []
    for path in sorted((ROOT / "xatm").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(name, set())
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for what, pattern in SWITCHES.items():
                if what not in allowed and pattern.search(line):
                    found.append(f"{name}:{number}: {what}: {line.strip()}")
    assert found == [], "ask the node's store (xatm.log.store) instead:\n" + "\n".join(found)


def test_the_patterns_find_the_switches_they_name() -> None:
    """The check above is only as good as its patterns: each finds what it names."""
    samples = {
        "a None check of the log's kind": "    if ctx.shared_log is not None:",
        "the kind read from a manager or its context": "view = log_view(ctx.log_directory)",
        "an isinstance of a backend": "if isinstance(store, PostgresStore):",
        "a look for a URL in the configured log": 'shared = "://" in settings.log',
    }
    assert SWITCHES["a look for a URL in the configured log"].search("if log_is_shared(log):")
    for what, line in samples.items():
        assert SWITCHES[what].search(line), what


def test_the_store_is_chosen_once_from_the_configured_log(tmp_path: Path) -> None:
    assert isinstance(store_from_setting(str(tmp_path), "n"), FileStore)
    assert isinstance(
        open_store(log_directory=str(tmp_path), log_spec=None, node_id="n"), FileStore
    )
    url = "postgresql://u:secret@127.0.0.1:1/db"
    shared = store_from_setting(url, "n")
    assert isinstance(shared, PostgresStore)
    assert isinstance(open_store(log_directory=None, log_spec=url, node_id="n"), PostgresStore)
    assert FileStore(tmp_path).describe() == str(tmp_path)
    assert "secret" not in shared.describe() and "127.0.0.1" in shared.describe()


def test_what_a_store_keeps_no_files_for_says_so_without_opening_anything(
    tmp_path: Path,
) -> None:
    """The shared log keeps no side files, node logs or files to retire: it says so by its
    methods, without a connection (the server at the URL does not exist)."""
    shared = PostgresStore("postgresql://u:secret@127.0.0.1:1/db", "n")
    assert shared.record_node("n", markers=(), incarnation="0123456789") is None
    assert shared.nodes() == []
    retired = shared.retire_logs(1.0, own_node="n", prepared_nodes=set, audit=lambda r, o: None)
    assert retired == []
    assert directory_of(shared) is None and shared_url_of(shared) == shared.url
    shared.close()  # nothing was opened: nothing to close
    files = FileStore(tmp_path)
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "lock").touch()  # a node log's (its FileLog makes both)
    assert files.record_node("n", markers=("pg1",), incarnation="0123456789") == frozenset(
        {"0123456789"}
    )
    assert files.nodes() == ["n"] and directory_of(files) == str(tmp_path)
    assert shared_url_of(files) is None and shared_log_of(files) is None
    empty = FileStore(tmp_path / "nothing").view()
    assert empty.owner("x") == "unknown"
    assert empty.nodes() == [] and empty.audit() == []
