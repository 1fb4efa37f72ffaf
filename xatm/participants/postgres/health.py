"""What ``xatm doctor`` checks of a PostgreSQL resource beyond 2PC fitness (the adapter's
``wait_findings``): bounded lock waits, dead clients noticed, connections kept for recovery,
and whether a failover to a standby can lose commits (asynchronous standbys, or
``synchronous_commit`` below ``on``).

The settings are read with plain ``SHOW``/``SELECT`` on a connection xatm opened (so the
session settings xatm sets on its connections are what is judged)."""

from __future__ import annotations

from typing import Any

from xatm.core.participant import Finding


def scalar(conn: Any, sql: str) -> Any:
    """The first column of the first row of ``sql`` (None if it returns no row)."""
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def _advice(check: str, detail: str) -> Finding:
    return Finding(check, True, detail, advice=True)


def wait_findings(conn: Any) -> list[Finding]:
    """Bounded lock waits, dead clients noticed, connections kept for recovery."""
    checks = []
    version = int(scalar(conn, "SHOW server_version_num"))
    lock = str(scalar(conn, "SHOW lock_timeout"))
    statement = str(scalar(conn, "SHOW statement_timeout"))
    if lock == "0":
        checks.append(
            _advice(
                "lock-timeout",
                "lock_timeout is 0 on xatm's sessions (the URL's options turn it off): a"
                " session waiting for a row that an in-doubt branch holds waits forever, and"
                " such sessions can take every connection; let xatm set it (drop lock_timeout"
                " from the URL's options) or set a value",
            )
        )
    else:
        checks.append(
            Finding(
                "lock-timeout",
                True,
                f"lock_timeout = {lock}, statement_timeout = {statement} (each transaction"
                " sets its own from the time it has left)",
            )
        )
    if version >= 140000:
        interval = str(scalar(conn, "SHOW client_connection_check_interval"))
        if interval == "0":
            checks.append(
                _advice(
                    "dead-clients",
                    "client_connection_check_interval is 0: a backend waiting for a lock does"
                    " not notice that its client died; set it (for example to '10s' in"
                    " postgresql.conf, or ALTER ROLE ... SET) so such backends go at once",
                )
            )
        else:
            checks.append(
                Finding("dead-clients", True, f"client_connection_check_interval = {interval}")
            )
    checks.append(_headroom(conn, version))
    return checks


def _headroom(conn: Any, version: int) -> Finding:
    """Can recovery still connect when the applications have taken every connection?"""
    keep = " (each TransactionManager also keeps one recovery connection per resource open)"
    if version >= 160000:
        reserved = int(scalar(conn, "SHOW reserved_connections"))
        if reserved > 0:
            return Finding(
                "recovery-headroom",
                True,
                f"reserved_connections = {reserved}: run `xatm recover` as a role granted"
                " pg_use_reserved_connections",
            )
        return _advice(
            "recovery-headroom",
            "no connections are kept for recovery: set reserved_connections (for example 3)"
            " and GRANT pg_use_reserved_connections TO the role that runs `xatm recover`, so"
            " that it gets in when waiting sessions have taken every connection" + keep,
        )
    limit = int(
        scalar(
            conn,
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user",
        )
    )
    usable = int(
        scalar(
            conn,
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int",
        )
    )
    if 0 <= limit < usable:
        return Finding(
            "recovery-headroom",
            True,
            f"this role may open {limit} of the {usable} connections: run `xatm recover` as"
            " another role to use the rest",
        )
    return _advice(
        "recovery-headroom",
        "no connections are kept for recovery (reserved_connections needs PostgreSQL 16):"
        f" limit the applications' role below the {usable} connections the server allows"
        " (ALTER ROLE ... CONNECTION LIMIT n) and run `xatm recover` as another role, or"
        " as a superuser (superuser_reserved_connections)" + keep,
    )


#: ``synchronous_commit`` values that acknowledge a commit (or a PREPARE) before a
#: synchronous standby has flushed it
_WEAK_COMMIT = ("off", "local", "remote_write")


#: what a failover to an asynchronous standby of a resource can lose
RESOURCE_LOSS = (
    "a failover to it can lose transactions xatm committed (recovery reports them after"
    " the switch, docs/operations.md)"
)
#: ... and of the shared log's database
LOG_LOSS = (
    "a failover to it can lose COMMIT decisions (the transactions begun before it are then"
    " left in doubt for an operator, docs/operations.md)"
)


def replication_findings(conn: Any, loss: str = RESOURCE_LOSS) -> list[Finding]:
    """Can a failover to a standby of this server lose what xatm was told is committed
    (``loss``: what it would lose, in words)?

    ``pg_stat_replication`` lists the standbys to any role, but shows their ``sync_state``
    only to a role with ``pg_read_all_stats`` (``pg_monitor``); without it, an empty
    ``synchronous_standby_names`` still says that every standby is asynchronous."""
    checks = []
    names = str(scalar(conn, "SHOW synchronous_standby_names")).strip()
    commit = str(scalar(conn, "SHOW synchronous_commit"))
    rows = conn.execute(
        "SELECT coalesce(application_name, '?'), sync_state FROM pg_stat_replication"
    ).fetchall()
    lose = (
        f" {loss}: set synchronous_standby_names (with"
        " synchronous_commit = on or remote_apply) so that a commit waits for the standby"
    )
    visible = [(str(n), str(s)) for n, s in rows if s is not None]
    if visible:
        weak = sorted(f"{n} ({s})" for n, s in visible if s in ("async", "potential"))
        if weak:
            checks.append(
                _advice("standbys", f"standby(s) {', '.join(weak)} replicate asynchronously:{lose}")
            )
        else:
            checks.append(
                Finding("standbys", True, f"{len(visible)} synchronous standby(s) ({names})")
            )
    elif rows and not names:
        checks.append(
            _advice(
                "standbys",
                f"{len(rows)} standby(s) stream from this server and synchronous_standby_names"
                f" is empty, so every one replicates asynchronously:{lose}",
            )
        )
    elif rows:
        checks.append(
            Finding(
                "standbys",
                True,
                f"{len(rows)} standby(s), synchronous_standby_names = {names!r}; which of them"
                " are synchronous is not shown to this role (grant it pg_monitor to let doctor"
                " tell)",
            )
        )
    elif names:
        checks.append(
            _advice(
                "standbys",
                f"synchronous_standby_names = {names!r} but no standby is connected: every"
                " commit and PREPARE waits until one is",
            )
        )
    else:
        checks.append(Finding("standbys", True, "no standby streams from this server"))
    if commit in _WEAK_COMMIT:
        checks.append(
            _advice(
                "synchronous-commit",
                f"synchronous_commit = {commit}: a commit or PREPARE is acknowledged before a"
                " synchronous standby has flushed it"
                + (
                    " (and, with off, before it is on this server's disk)"
                    if commit == "off"
                    else ""
                )
                + ": a failover (or a crash) can lose transactions xatm committed; set it to on"
                " or remote_apply (ALTER ROLE ... SET, or postgresql.conf)",
            )
        )
    else:
        checks.append(Finding("synchronous-commit", True, f"synchronous_commit = {commit}"))
    return checks
