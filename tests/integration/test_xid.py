"""Unit tests of transaction identifiers (``xatm.core.xid``), and their compatibility with psycopg
and with the servers' own views of prepared transactions."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
import pytest

from tests.support import MakeTM, Servers, connect, run
from xatm import ConfigurationError
from xatm.admin import FORMAT_ID, Xid
from xatm.core.participant import PhaseTwo, Vote
from xatm.core.xid import (
    MAX_NODE_ID,
    MAX_PART,
    MAX_RESOURCE_NAME,
    branch_xid,
    is_xatm_gtrid,
    new_gtrid,
    parse_gtrid,
    validate_node_id,
    validate_resource_name,
)

LONG_NODE = "n" * MAX_NODE_ID
HOSTILE = [
    "'); DROP TABLE x; --",
    "a'b",
    'a"b',
    "a\\b",
    "a\\'",
    "x' OR '1'='1",
    "a b",
    "a.b",
    "a/b",
    "a\nb",
    "a\x00b",
    "é",
    "\uff41",  # fullwidth a
    "a;b",
    "",
]


# -- gtrids --------------------------------------------------------------------------------
def test_new_gtrid_shape() -> None:
    g = new_gtrid("api-1")
    assert re.fullmatch(r"xatm\.api-1\.[0-9a-f]{27}", g), g
    assert is_xatm_gtrid(g)
    assert g.isascii()


def test_new_gtrid_is_unique() -> None:
    gtrids = {new_gtrid("api-1") for _ in range(10_000)}
    assert len(gtrids) == 10_000


def test_gtrid_fits_in_an_xid_part() -> None:
    g = new_gtrid(LONG_NODE)
    assert len(g.encode("ascii")) <= MAX_PART
    x = branch_xid(g, "r" * MAX_RESOURCE_NAME)
    assert len(x.gtrid.encode()) <= MAX_PART and len(x.bqual.encode()) <= MAX_PART


def test_parse_gtrid_and_created_at() -> None:
    before = time.time()
    g = new_gtrid(LONG_NODE)
    after = time.time()
    node, created = parse_gtrid(g)
    assert node == LONG_NODE
    assert before - 0.002 <= created <= after + 0.002
    x = branch_xid(g, "pg1")
    assert (x.format_id, x.gtrid, x.bqual) == (FORMAT_ID, g, "pg1")
    assert x.is_xatm and x.node_id == LONG_NODE and x.created_at == created


@pytest.mark.parametrize(
    "gtrid",
    [
        "foo",
        "xatm.node",
        "xatm.node.123",
        "xatm..0000000000000000000000000000",
        "xatm.a b.00000000000000000000000000a",
        "other.node.0000000000000000000000000aa",
        "xatm.node.0000000000000000000000000AA",  # upper case hex is not ours
        "xatm.node.0000000000000000000000000aa\n",
        "xatm." + "n" * (MAX_NODE_ID + 1) + ".0000000000000000000000000aa",
    ],
)
def test_foreign_gtrids_are_not_xatm(gtrid: str) -> None:
    assert not is_xatm_gtrid(gtrid)
    assert not Xid(FORMAT_ID, gtrid, "pg1").is_xatm
    with pytest.raises(ValueError, match="not an xatm gtrid"):
        parse_gtrid(gtrid)


def test_other_format_id_is_not_xatm() -> None:
    assert not Xid(1, new_gtrid("api-1"), "pg1").is_xatm


# -- PostgreSQL gids -----------------------------------------------------------------------
def test_pg_gid_round_trip() -> None:
    x = branch_xid(new_gtrid(LONG_NODE), "r" * MAX_RESOURCE_NAME)
    gid = x.to_pg_gid()
    assert gid.startswith(f"{FORMAT_ID}_")
    assert len(gid.encode()) < 200  # PostgreSQL's limit is 199 bytes
    assert Xid.from_pg_gid(gid) == x


@pytest.mark.parametrize(
    "gid",
    [
        "foo",
        "1_x_y",  # not base64
        "abc_def_ghi",  # no format id
        "foreign-gid",
        "1_eGF0bQ==",  # two parts
        "1_eGF0bQ==_cGcx_cGcx",  # four parts
        "1_eGF0bQ_cGcx",  # missing padding
        "1_/w==_cGcx",  # not ASCII once decoded
        "01_eGF0bQ==_cGcx",  # not the canonical spelling of format id 1
        "\u0661_eGF0bQ==_cGcx",  # an Arabic-Indic digit one
        "1_eGF0bR==_cGcx",  # stray padding bits: "xatm" spelled another way
        "",
    ],
)
def test_from_pg_gid_rejects_foreign_gids(gid: str) -> None:
    assert Xid.from_pg_gid(gid) is None


def test_psycopg_parses_xatm_gids() -> None:
    x = branch_xid(new_gtrid("api-1"), "ledger")
    px = psycopg.Xid.from_string(x.to_pg_gid())
    assert (px.format_id, px.gtrid, px.bqual) == (x.format_id, x.gtrid, x.bqual)
    # ... and xatm reads psycopg's own encoding
    mine = psycopg.Xid(FORMAT_ID, x.gtrid, x.bqual)
    assert Xid.from_pg_gid(str(mine)) == x


@pytest.fixture
def probe_tables(servers: Servers) -> None:
    """A table ``xid_probe`` on every server, for a branch that writes (and so prepares)."""
    for url in servers.urls.values():
        conn = connect(url)
        try:
            run(conn, "CREATE TABLE IF NOT EXISTS xid_probe (id VARCHAR(64) PRIMARY KEY)")
        finally:
            conn.close()


def _vote(prepared: object) -> Vote:
    """The vote of a prepare() result (a Vote, or an object with a ``vote``)."""
    vote = getattr(prepared, "vote", prepared)
    assert isinstance(vote, Vote)
    return vote


@pytest.mark.usefixtures("probe_tables")
def test_prepared_branch_is_read_by_psycopg_tpc_recover(servers: Servers, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="xid-pg")
    participant, _ = tm._ctx.resources.get("pg1")
    xid = branch_xid(new_gtrid(tm.node_id), "pg1")
    conn = participant.connect()
    try:
        participant.begin(conn, xid)
        participant.execute(conn, "INSERT INTO xid_probe VALUES (%s)", (xid.gtrid,))
        assert _vote(participant.prepare(conn, xid)) is Vote.PREPARED
        with psycopg.connect(**_pg_kwargs(servers.urls["pg1"]), autocommit=True) as other:
            found = [x for x in other.tpc_recover() if x.gtrid == xid.gtrid]
            assert len(found) == 1
            assert found[0].format_id == FORMAT_ID
            assert found[0].bqual == "pg1"
            other.tpc_rollback(found[0])  # psycopg finds the branch by its own encoding
        assert participant.rollback_prepared(conn, xid) is PhaseTwo.NOT_FOUND
    finally:
        participant.close(conn)


@pytest.mark.usefixtures("probe_tables")
def test_prepared_branch_is_read_back_from_xa_recover(servers: Servers, make_tm: MakeTM) -> None:
    tm = make_tm(node_id="xid-maria")
    participant, _ = tm._ctx.resources.get("maria")
    xid = branch_xid(new_gtrid(tm.node_id), "maria")
    conn = participant.connect()
    try:
        participant.begin(conn, xid)
        participant.execute(conn, "INSERT INTO xid_probe VALUES (%s)", (xid.gtrid,))
        assert _vote(participant.prepare(conn, xid)) is Vote.PREPARED
        check = connect(servers.urls["maria"])
        try:
            rows = run(check, "XA RECOVER")
        finally:
            check.close()
        ours = [Xid.from_mysql(int(f), int(gl), int(bl), bytes(data)) for f, gl, bl, data in rows]
        assert xid in ours
        assert participant.rollback_prepared(conn, xid) is PhaseTwo.DONE
    finally:
        participant.close(conn)


def _pg_kwargs(url: str) -> dict[str, Any]:
    from xatm.admin import parse_url

    spec = parse_url(url)
    return {
        "host": spec.host,
        "port": spec.port,
        "user": spec.user,
        "password": spec.password,
        "dbname": spec.database,
    }


# -- MySQL XIDs ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", [h for h in HOSTILE if h.isascii()])
def test_to_mysql_is_only_hex_literals(text: str) -> None:
    x = Xid(FORMAT_ID, text, text)
    sql = x.to_mysql()
    assert re.fullmatch(r"X'[0-9a-f]*',X'[0-9a-f]*',\d+", sql), sql
    g, b, f = sql.split(",")
    assert bytes.fromhex(g[2:-1]).decode() == text
    assert bytes.fromhex(b[2:-1]).decode() == text
    assert int(f) == FORMAT_ID


def test_to_mysql_of_a_real_xid() -> None:
    x = branch_xid(new_gtrid("api-1"), "wallet")
    assert x.to_mysql() == (f"X'{x.gtrid.encode().hex()}',X'{b'wallet'.hex()}',{FORMAT_ID}")


def test_from_mysql_splits_data_by_lengths() -> None:
    g = new_gtrid("api-1")
    data = g.encode() + b"wallet"
    assert Xid.from_mysql(FORMAT_ID, len(g), 6, data) == Xid(FORMAT_ID, g, "wallet")
    # another split of the same bytes is another XID
    assert Xid.from_mysql(FORMAT_ID, len(g) + 2, 4, data) == Xid(FORMAT_ID, g + "wa", "llet")
    assert Xid.from_mysql(7, 3, 0, b"abc") == Xid(7, "abc", "")
    assert Xid.from_mysql(FORMAT_ID, 2, 2, b"\xff\xfeab") is None  # not ASCII: not ours


# -- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [*HOSTILE, "n" * (MAX_NODE_ID + 1), None, 42, b"node"])
def test_validate_node_id_rejects(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="node_id") as excinfo:
        validate_node_id(bad)
    assert "\n" not in str(excinfo.value)  # one line, even for a hostile value


@pytest.mark.parametrize("good", ["a", "api-1", "API_2", LONG_NODE])
def test_validate_node_id_accepts(good: str) -> None:
    assert validate_node_id(good) == good


@pytest.mark.parametrize("bad", [*HOSTILE, "r" * (MAX_RESOURCE_NAME + 1), None, 3, "x" * 10_000])
def test_validate_resource_name_rejects(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="resource name") as excinfo:
        validate_resource_name(bad)
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("good", ["pg1", "ledger-db", "r" * MAX_RESOURCE_NAME])
def test_validate_resource_name_accepts(good: str) -> None:
    assert validate_resource_name(good) == good


def test_gtrid_carries_the_marker_flag() -> None:
    from xatm.core.xid import may_use_marker

    plain, marked = new_gtrid("api-1"), new_gtrid("api-1", marker=True)
    assert not may_use_marker(plain) and may_use_marker(marked)
    assert re.fullmatch(r"xatm\.api-1\.[0-9a-f]{27}", marked)
    assert parse_gtrid(marked)[0] == "api-1"
