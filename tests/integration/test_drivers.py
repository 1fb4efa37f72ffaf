"""MySQL drivers: the one selected for this run is the one in use, and driver-level facts.

Run under each driver by CI (XATM_TEST_MYSQL_DRIVER=connector-pure|connector-c|pymysql|
mysqldb, see tests/support/__init__.py); the tests about marker probes, connections left inside XA
and server-side rollbacks hold for every driver.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    MYSQL_DRIVER,
    Bank,
    CommitsBlocked,
    MakeTM,
    connect,
    mysql_connection_id,
    mysql_errno,
    mysql_errors,
    run,
)
from tests.support.recovery import wait_for
from xatm import ConfigurationError, TransactionInDoubt, TransactionManager, TransactionRolledBack
from xatm.admin import parse_url
from xatm.core.participant import PhaseTwo
from xatm.core.xid import branch_xid, new_gtrid
from xatm.participants.mysql import drivers as _mysql_drivers
from xatm.participants.mysql.participant import MySQLParticipant
from xatm.recovery import markers as _marker_recovery

#: XATM_TEST_MYSQL_DRIVER -> (connection class name, does doctor say "C extension active")
EXPECTED_CLASS = {
    "connector-pure": ("MySQLConnection", False),
    "connector-c": ("CMySQLConnection", True),
    "pymysql": ("Connection", False),
    "mysqldb": ("Connection", False),
}


def participant_of(tm: TransactionManager, name: str) -> Any:
    participant, _ = tm._ctx.resources.get(name)
    return participant


# -- the driver in use --------------------------------------------------------------------------


def test_the_selected_driver_is_the_one_in_use(bank: Bank, make_tm: MakeTM) -> None:
    """The C-extension leg must really run the C extension (no silent fall back to pure)."""
    tm = make_tm()
    with tm.transaction() as tx:
        conn = tx.connection("maria")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal WHERE id = 1")
    module = type(conn).__module__
    name = type(conn).__name__
    if MYSQL_DRIVER in ("connector-pure", "connector-c", ""):
        assert module.startswith("mysql.connector")
    elif MYSQL_DRIVER == "pymysql":
        assert module.startswith("pymysql")
    else:
        assert module.startswith("MySQLdb")
    if MYSQL_DRIVER in EXPECTED_CLASS:
        expected, c_active = EXPECTED_CLASS[MYSQL_DRIVER]
        assert name == expected
        assert _mysql_drivers.is_c_extension(conn) is c_active
    detail = {c.subject: c.detail for c in tm.doctor().checks if c.name == "driver"}
    assert name in detail["maria"]
    if MYSQL_DRIVER == "connector-c":
        assert "C extension active" in detail["maria"]
    assert detail["pg1"].startswith("psycopg ")


@pytest.mark.parametrize(
    ("scheme", "driver"),
    [
        ("mysql", "mysqlconnector"),
        ("mariadb", "mysqlconnector"),
        ("mysql+mysqlconnector", "mysqlconnector"),
        ("mysql+pymysql", "pymysql"),
        ("mariadb+pymysql", "pymysql"),
        ("mysql+mysqldb", "mysqldb"),
    ],
)
def test_url_scheme_picks_the_driver(scheme: str, driver: str) -> None:
    pytest.importorskip(_mysql_drivers.DRIVERS[driver].module_name)
    spec = parse_url(f"{scheme}://u:secret@db/x")
    participant = MySQLParticipant("r", spec)
    assert participant.driver.name == driver
    assert "secret" not in spec.redacted()
    if driver != "mysqlconnector":
        assert spec.redacted().startswith(f"mysql+{driver}://")


def test_a_missing_driver_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = _mysql_drivers.PyMySQL()
    missing.module_name = "xatm_no_such_driver_module"
    monkeypatch.setitem(_mysql_drivers.DRIVERS, "pymysql", missing)
    with pytest.raises(ConfigurationError, match=r"pip install 'xatm\[pymysql\]'") as info:
        TransactionManager({"w": "mysql+pymysql://u:hunter2@db/w"}, log=tmp_path, node_id="n")
    assert "hunter2" not in str(info.value)


def test_psycopg2_is_refused_early_with_what_to_use_instead(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="psycopg 3") as info:
        TransactionManager({"l": "postgresql+psycopg2://u:hunter2@db/l"}, log=tmp_path, node_id="n")
    assert "postgresql://" in str(info.value) and "hunter2" not in str(info.value)
    pytest.importorskip("psycopg2")
    from sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg2://u:hunter2@127.0.0.1:1/l")
    with pytest.raises(ConfigurationError, match="postgresql\\+psycopg"):
        TransactionManager({"l": engine}, log=tmp_path, node_id="n")


def test_errors_are_classified_by_errno(bank: Bank, make_tm: MakeTM) -> None:
    """Duplicate key, missing table, XAER_NOTA and a lost connection, on real errors."""
    tm = make_tm()
    participant = participant_of(tm, "maria")
    conn = participant.connect()
    try:
        with pytest.raises(mysql_errors()) as dup:
            participant.execute(conn, f"INSERT INTO {bank.table} VALUES (1, 1)")
        assert participant.is_duplicate_key(dup.value)
        assert not participant.is_missing_table(dup.value)
        assert not participant.is_connection_error(dup.value)
        with pytest.raises(mysql_errors()) as missing:
            participant.execute(conn, "SELECT * FROM xatm_no_such_table")
        assert participant.is_missing_table(missing.value)
        assert not participant.is_duplicate_key(missing.value)
        assert not participant.is_connection_error(missing.value)
        xid = branch_xid(new_gtrid("errno"), "maria")
        assert participant.commit_prepared(conn, xid) is PhaseTwo.NOT_FOUND
        assert participant.ping(conn)
        (cid,) = run(conn, "SELECT CONNECTION_ID()")[0]
        run(bank.conns["maria"], f"KILL {int(cid)}")
        with pytest.raises(mysql_errors()) as lost:
            participant.execute(conn, "SELECT 1").fetchall()
        assert participant.is_connection_error(lost.value)
        assert not participant.ping(conn)
    finally:
        participant.close(conn)


# -- issue 8 item 4: the marker probe on MariaDB -------------------------------------------------


def _db_url(url: str, database: str) -> str:
    head, sep, query = url.partition("?")
    return f"{head.rpartition('/')[0]}/{database}{sep}{query}"


def test_marker_probe_on_mariadb_knows_duplicate_key_and_missing_table(
    bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    """Before: the probe compared mysql-connector's SQLSTATE "23000" with {"23505", 1062},
    so a committed decision row (or an earlier fence) and a missing table raised."""
    tm = make_tm(commit_markers=["maria"], sweeper=False)
    participant = participant_of(tm, "maria")
    probes: list[str] = []
    at_step["after_decision"] = lambda: probes.append(
        _marker_recovery.probe_row(participant, tx.gtrid)
    )
    with tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 1 WHERE id = 1")
        tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 1 WHERE id = 1")
    assert probes == ["row"]  # the decision row is committed: the fence's insert collides
    # a fence, then a second probe: the abort row is found, not an error
    gtrid = new_gtrid(tm.node_id, marker=True)
    assert _marker_recovery.probe_row(participant, gtrid) == "no-row"
    assert _marker_recovery.probe_row(participant, gtrid) == "no-row"
    # a database without the marker table
    run(bank.conns["maria"], "CREATE DATABASE IF NOT EXISTS xatm_nomarker")
    bare = MySQLParticipant("bare", parse_url(_db_url(bank.urls["maria"], "xatm_nomarker")))
    assert _marker_recovery.probe_row(bare, gtrid) == "no-table"


def test_recovery_with_the_marker_on_mariadb_after_an_earlier_fence(
    bank: Bank, make_tm: MakeTM, tmp_path: Path
) -> None:
    """A coordinator with commit_markers=["maria"] dies after prepare; an earlier recovery
    pass fenced the gtrid but could not finish. The next pass must still roll back."""
    from tests.support.crash import run_worker

    cfg = {
        "urls": bank.urls,
        "log": str(tmp_path / "log"),
        "node_id": "mkmaria",
        "table": bank.table,
        "journal": bank.journal,
        "resources": ["pg1", "maria"],
        "tid": "mk-maria-1",
        "commit_markers": ["maria"],
    }
    proc = run_worker("transfer", cfg, tmp_path, "after_prepare")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    prepared = bank.xatm_prepared()
    assert len(prepared["pg1"]) == 1 and prepared["maria"] == []  # maria is the marker
    gtrid = prepared["pg1"][0].gtrid
    bank.wait_for_dead_sessions()
    tm = make_tm(node_id="mkmaria", log=tmp_path / "log", commit_markers=["maria"])
    assert _marker_recovery.probe_row(participant_of(tm, "maria"), gtrid) == "no-row"  # fence
    report = tm.recover()
    assert (report.rolled_back, report.in_doubt, report.unreachable) == (1, 0, ())
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    assert bank.journal_ids() == {"pg1": set(), "pg2": set(), "maria": set()}
    assert bank.total() == bank.initial_total


# -- issue 8 item 5: no pooled connection inside an ACTIVE XA ------------------------------------


def test_a_failed_marker_statement_leaves_no_pooled_connection_inside_xa(
    bank: Bank, make_tm: MakeTM, at_step: dict[str, Callable[[], None]]
) -> None:
    """Before: only XA ROLLBACK was sent (XAER_RMFAIL in the ACTIVE state) and the connection
    went back to the pool holding its row locks; the next XA START failed with 1399."""
    tm = make_tm(commit_markers=["maria"], sweeper=False)
    participant = participant_of(tm, "maria")
    t = bank.table
    # recovery's fence lands first: the late decision row fails on the duplicate key

    def fence() -> None:
        assert _marker_recovery.probe_row(participant, tx.gtrid) == "no-row"

    at_step["after_prepare"] = fence
    with pytest.raises(TransactionRolledBack, match="maria"), tm.transaction() as tx:
        tx.execute("pg1", f"UPDATE {t} SET bal = bal - 5 WHERE id = 2")
        tx.execute("maria", f"UPDATE {t} SET bal = bal + 5 WHERE id = 2")
    # the row lock on maria is free: another session updates the row at once
    other = connect(bank.urls["maria"])
    try:
        run(other, "SET SESSION innodb_lock_wait_timeout = 1")
        run(other, f"UPDATE {t} SET bal = bal WHERE id = 2")
    finally:
        other.close()
    # and the next transactions get clean connections
    for i in range(3):
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 3")
            tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 3")
            tx.execute("maria", f"INSERT INTO {bank.journal} VALUES (%s)", (f"after-{i}",))
    assert bank.balance("maria", 2) == 1000 and bank.balance("pg1", 2) == 1000
    assert bank.total() == bank.initial_total
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


def test_a_connection_whose_xa_state_is_unknown_is_not_pooled(bank: Bank, make_tm: MakeTM) -> None:
    tm = make_tm()
    participant = participant_of(tm, "maria")
    conn = participant.connect()
    try:
        xid = branch_xid(new_gtrid(tm.node_id), "maria")
        participant.begin(conn, xid)
        assert not participant.is_idle(conn)  # inside XA: never pooled
        participant.rollback_active(conn, xid)
        assert participant.is_idle(conn)
    finally:
        participant.close(conn)


# -- issue 8 item 11: a branch the server already rolled back --------------------------------


def test_rolling_back_a_read_only_branch_the_server_rolled_back_is_done(
    bank: Bank, make_tm: MakeTM
) -> None:
    """MariaDB answers 1402 XA_RBROLLBACK when another session rolls back a read-only
    prepared branch: it is rolled back, as asked (before: an error, and one in-doubt)."""
    tm = make_tm(node_id="rodead", sweeper=False)
    participant = participant_of(tm, "maria")
    xid = branch_xid(new_gtrid("rodead"), "maria")
    conn = participant.connect()
    participant.begin(conn, xid)
    participant.execute(conn, f"SELECT bal FROM {bank.table} WHERE id = 1").fetchall()
    participant.prepare(conn, xid)
    participant.close(conn)
    bank.wait_for_dead_sessions()
    deadline = time.monotonic() + 10
    while xid not in bank.xatm_prepared_on("maria"):  # pragma: no cover - defensive
        assert time.monotonic() < deadline
        time.sleep(0.05)
    report = tm.recover()
    assert (report.rolled_back, report.in_doubt) == (1, 0)
    assert bank.xatm_prepared_on("maria") == []


def test_an_engine_resource_runs_on_the_engines_own_driver(bank: Bank, make_tm: MakeTM) -> None:
    """A SQLAlchemy Engine of this run's MySQL dialect as a resource: its connections (of its
    driver) carry the branches; commit and rollback."""
    from sqlalchemy import create_engine

    from tests.support.sa_models import sa_url

    engine = create_engine(sa_url(bank.urls["maria"]), pool_size=2)
    try:
        tm = make_tm(resources={"pg1": bank.urls["pg1"], "maria": engine})
        t = bank.table
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal - 7 WHERE id = 1")
            tx.execute("maria", f"UPDATE {t} SET bal = bal + 7 WHERE id = 1")
            conn = tx.connection("maria")
        assert (
            type(conn).__module__.split(".")[0]
            == {
                "mysqlconnector": "mysql",
                "pymysql": "pymysql",
                "mysqldb": "MySQLdb",
            }[engine.url.get_driver_name()]
        )
        with pytest.raises(RuntimeError), tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {t} SET bal = bal - 1 WHERE id = 2")
            tx.execute("maria", f"UPDATE {t} SET bal = bal + 1 WHERE id = 2")
            raise RuntimeError("the application changed its mind")
        assert bank.balance("maria", 1) == 1007 and bank.balance("pg1", 1) == 993
        assert bank.balance("maria", 2) == 1000 and bank.balance("pg1", 2) == 1000
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "row",
    [
        (2019652717, 5, 2, b"gtridbq"),  # mysql-connector pure, PyMySQL, mysqlclient
        (2019652717, 5, 2, bytearray(b"gtridbq")),  # older mysql-connector
        ("2019652717", "5", "2", "gtridbq"),  # a driver decoding every column to text
        (b"2019652717", b"5", b"2", b"gtridbq"),  # raw (C extension with raw=True)
    ],
)
def test_xa_recover_rows_of_any_type_are_read_alike(row: tuple[Any, ...]) -> None:
    from xatm.participants.mysql.participant import _integer, _raw_bytes

    assert tuple(_integer(v) for v in row[:3]) == (2019652717, 5, 2)
    assert _raw_bytes(row[3]) == b"gtridbq"
    assert _raw_bytes("\xff\x00") == b"\xff\x00"  # latin-1 text back to the server's bytes


def test_an_engine_without_multi_statements_sends_the_xa_statements_one_by_one(
    bank: Bank, make_tm: MakeTM
) -> None:
    """SQLAlchemy's PyMySQL connections lack the MULTI_STATEMENTS flag; a mysqlclient Engine
    may switch it off: ``XA END`` and ``XA PREPARE`` then go as two queries."""
    from sqlalchemy import create_engine

    from tests.support.sa_models import sa_url

    url = sa_url(bank.urls["maria"])
    if url.startswith("mysql+pymysql"):
        engine = create_engine(url)
    elif url.startswith("mysql+mysqldb"):
        engine = create_engine(url, connect_args={"multi_statements": False})
    else:
        pytest.skip("mysql-connector's connections always allow several statements")
    try:
        tm = make_tm(resources={"pg1": bank.urls["pg1"], "maria": engine})
        with tm.transaction() as tx:
            tx.execute("pg1", f"UPDATE {bank.table} SET bal = bal - 3 WHERE id = 4")
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal + 3 WHERE id = 4")
            flags = tx.connection("maria").client_flag
        assert not flags & _mysql_drivers.MULTI_STATEMENTS
        with tm.transaction() as tx:  # one branch: XA END; XA COMMIT ... ONE PHASE
            tx.execute("maria", f"UPDATE {bank.table} SET bal = bal - 3 WHERE id = 4")
        assert bank.balance("maria", 4) == 1000 and bank.balance("pg1", 4) == 997
        assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}
    finally:
        engine.dispose()


# -- issue 17, review item c: an answer to XA COMMIT ... ONE PHASE that is not a certain "no" -----


def no_open_xa(bank: Bank) -> bool:
    return (
        int(run(bank.conns["maria"], "SELECT COUNT(*) FROM information_schema.innodb_trx")[0][0])
        == 0
    )


@pytest.mark.parametrize("markers", [[], ["maria"]], ids=["only-branch", "marker-branch"])
def test_an_interrupted_one_phase_commit_is_in_doubt(
    markers: list[str], bank: Bank, make_tm: MakeTM
) -> None:
    """``XA COMMIT ... ONE PHASE`` answered 1317 (query interrupted): the commit may have
    happened (here MariaDB rolled it back, but an answer after the commit looks the same),
    so the outcome is unknown: TransactionInDoubt, never a "no" that would roll the other
    branches back (a split, had the marker branch committed its decision row). Recovery then
    settles the others by the decision row. Before: read as a certain no
    (TransactionRolledBack)."""
    tm = make_tm("onephase", sweeper=False, commit_markers=markers)
    with tm.transaction() as tx:  # the marker table exists, the resources are checked
        tx.execute("maria", "SELECT 1")
    names = ["pg1", "maria"] if markers else ["maria"]
    cid: list[int] = []
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            with tm.transaction() as tx:
                for name in names:
                    tx.execute(name, f"UPDATE {bank.table} SET bal = bal - 7 WHERE id = 1")
                cid.append(mysql_connection_id(tx.connection("maria")))
        except BaseException as e:
            outcome.append(e)

    blocked = CommitsBlocked(bank.urls["maria"])
    try:
        worker = threading.Thread(target=work)
        worker.start()
        blocked.interrupt(lambda: cid[0] if cid else None)
        worker.join(30)
    finally:
        blocked.close()
    assert len(outcome) == 1 and isinstance(outcome[0], TransactionInDoubt), outcome
    assert mysql_errno(outcome[0].__cause__) == 1317  # type: ignore[arg-type]
    wait_for(lambda: no_open_xa(bank), timeout=30, what="the closed session to end")
    if markers:
        # pg1 stays prepared; the decision row is not there: recovery rolls it back
        wait_for(lambda: tm.recover().in_doubt == 0 and not bank.xatm_prepared()["pg1"])
    balances = bank.balances()
    assert {balances[n][1] for n in names} == {1000}  # the same outcome everywhere
    assert bank.xatm_prepared() == {"pg1": [], "pg2": [], "maria": []}


@pytest.mark.parametrize("errno", [1317, 1401, 1180])
def test_ambiguous_answers_to_a_one_phase_commit_are_unknown_for_every_driver(
    errno: int,
) -> None:
    """How each MySQL driver installed here raises the server's answer ``errno`` to
    ``XA COMMIT ... ONE PHASE`` (as its own error classes would for that server error
    packet: mysql-connector pure and C extension build theirs with ``get_mysql_exception``,
    PyMySQL parses the packet, mysqlclient raises ``OperationalError(errno, message)``),
    and that xatm reads every one as "outcome unknown": not a connection error (which says
    the same, but for another reason), and not a certain "no"."""
    from xatm.participants.mysql.statements import one_phase_refused

    raised: dict[str, BaseException] = {}
    from mysql.connector.errors import get_mysql_exception

    raised["mysqlconnector"] = get_mysql_exception(errno, "the server's message", "XAE03")
    try:
        import pymysql.err

        packet = b"\xff" + errno.to_bytes(2, "little") + b"#XAE03the server's message"
        try:
            pymysql.err.raise_mysql_exception(packet)
        except pymysql.err.MySQLError as e:
            raised["pymysql"] = e
    except ImportError:
        pass
    try:
        import MySQLdb

        raised["mysqldb"] = MySQLdb.OperationalError(errno, "the server's message")
    except ImportError:
        pass
    for name, error in raised.items():
        driver = _mysql_drivers.DRIVERS[name]
        assert isinstance(error, driver.errors()), name
        assert driver.errno(error) == errno, name
        assert not driver.is_connection_error(error), name
        assert not one_phase_refused(driver.errno(error)), name
    for refused in (1397, 1399, 1402, 1613, 1614, 1205, 1213):
        assert one_phase_refused(refused)
