"""Hostile and random input to every decoder of foreign data: gids, XA RECOVER rows, gtrids,
log records and frames. A decoder answers "not ours" (None, False, ValueError), never
crashes: a foreign prepared transaction, however odd its id, must never stop recovery.

The property tests are bounded (``max_examples``) so they run in seconds; one test runs a
real foreign prepared transaction with such a gid on PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import Bank, MakeTM, connect, run
from xatm import ConfigurationError
from xatm.admin import Xid, gtrid_of, validate_gtrid
from xatm.core.records import HEADER, LogRecord, frame_at, next_good_frame, read_frames
from xatm.core.xid import (
    FORMAT_ID,
    has_long_timeout,
    is_xatm_gtrid,
    may_use_marker,
    new_gtrid,
    parse_gtrid,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: digits that str.isdigit() accepts but int() does not, or that int() reads as ASCII digits
ODD_DIGITS = "²³¹⁰₂٢۳߂०൦๓０"
B64 = string.ascii_letters + string.digits + "+/="


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


odd_number = st.text(alphabet=ODD_DIGITS + string.digits + "-+ _", max_size=12)
b64ish = st.one_of(st.text(alphabet=B64, max_size=40), st.text(max_size=12).map(_b64))
gid_like = st.builds(lambda a, b, c: f"{a}_{b}_{c}", odd_number, b64ish, b64ish)
any_gid = st.one_of(gid_like, st.text(max_size=80), st.just("1" * 5000 + "_YQ==_Yg=="))


@FUZZ
@given(any_gid)
@example("²_YQ==_Yg==")
@example("٢_YQ==_Yg==")
@example("-_YQ==_Yg==")
@example("1_YQ==_Yg==_")
@example("1" * 5000 + "_YQ==_Yg==")
@example("99999999999_YQ==_Yg==")
@example("1_" + _b64("é") + "_Yg==")
def test_from_pg_gid_never_raises(gid: str) -> None:
    xid = Xid.from_pg_gid(gid)
    if xid is not None:
        assert xid.to_pg_gid() == gid  # only the canonical spelling names an Xid
        assert -(2**31) <= xid.format_id < 2**31
        assert xid.gtrid.isascii() and xid.bqual.isascii()


ascii_part = st.text(alphabet=string.printable, max_size=64)


@FUZZ
@given(st.integers(-(2**31), 2**31 - 1), ascii_part, ascii_part)
def test_pg_gid_round_trip(format_id: int, gtrid: str, bqual: str) -> None:
    xid = Xid(format_id, gtrid, bqual)
    assert Xid.from_pg_gid(xid.to_pg_gid()) == xid


@FUZZ
@given(
    st.one_of(st.integers(), st.integers(-(2**31), 2**31 - 1)),
    st.integers(-200, 200),
    st.integers(-200, 200),
    st.binary(max_size=160),
)
def test_from_mysql_never_raises(format_id: int, glen: int, blen: int, data: bytes) -> None:
    xid = Xid.from_mysql(format_id, glen, blen, data)
    if xid is not None:
        assert len(xid.gtrid) == glen and len(xid.bqual) == blen
        assert (xid.gtrid + xid.bqual).encode("ascii") == data[: glen + blen]


hostile_gtrid = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda node, rest: f"xatm.{node}.{rest}",
        st.text(max_size=35),
        st.text(alphabet="0123456789abcdefABCDEF²٢g", max_size=30),
    ),
    st.builds(lambda: new_gtrid("n1")),
)


@FUZZ
@given(hostile_gtrid)
@example("xatm.n.٢" + "0" * 26)
@example("xatm.n." + "²" * 27)
def test_gtrid_decoders_never_raise(gtrid: str) -> None:
    ok = is_xatm_gtrid(gtrid)
    assert isinstance(has_long_timeout(gtrid), bool)
    assert isinstance(may_use_marker(gtrid), bool)
    if ok:
        node, created = parse_gtrid(gtrid)
        assert gtrid.isascii() and gtrid.startswith(f"xatm.{node}.") and created >= 0
        assert validate_gtrid(gtrid) == gtrid
        assert Xid(FORMAT_ID, gtrid, "r").is_xatm
    else:
        with pytest.raises(ValueError):
            parse_gtrid(gtrid)
        with pytest.raises(ConfigurationError):
            validate_gtrid(gtrid)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.integers())))
def test_validate_gtrid_refuses_any_non_string(value: object) -> None:
    with pytest.raises(ConfigurationError):
        validate_gtrid(value)


def _sql_form(gtrid: str, bqual: str, format_id: int) -> str:
    return f"X'{gtrid.encode().hex()}',X'{bqual.encode().hex()}',{format_id}"


operator_text = st.one_of(
    any_gid,
    hostile_gtrid,
    st.builds(lambda g, b: g + b, hostile_gtrid, st.text(max_size=70)),
    st.builds(_sql_form, st.text(max_size=70), st.text(max_size=70), st.integers()),
    st.builds(lambda b: "0x" + b.hex(), st.binary(max_size=140)),
    st.text(alphabet="Xx'0123456789abcdefABCDEF,-_ ", max_size=120),
)


@FUZZ
@given(operator_text)
@example("X'zz',X'00',2019652717")
@example("0x")
@example("'" * 3)
@example(_sql_form("xatm.n." + "0" * 27, "r", 1))
def test_gtrid_of_maps_or_refuses_any_text(text: str) -> None:
    """What an operator pastes (``xatm show <...>``): an xatm gtrid, or ConfigurationError;
    never another error, never a gtrid that is not xatm's shape."""
    try:
        found = gtrid_of(text)
    except ConfigurationError:
        return
    assert is_xatm_gtrid(found) and validate_gtrid(found) == found


@FUZZ
@given(st.builds(lambda: new_gtrid("n1")), st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_gtrid_of_reads_every_form_of_a_real_branch(gtrid: str, resource: str) -> None:
    xid = Xid(FORMAT_ID, gtrid, resource)
    for form in (
        gtrid,
        xid.to_pg_gid(),
        gtrid + resource,
        _sql_form(gtrid, resource, FORMAT_ID),
        "0x" + (gtrid + resource).encode().hex(),
        f" '{xid.to_pg_gid()}' ",
    ):
        assert gtrid_of(form) == gtrid, form
    with pytest.raises(ConfigurationError):
        gtrid_of(_sql_form(gtrid, resource, FORMAT_ID + 1))
    with pytest.raises(ConfigurationError):
        gtrid_of(Xid(FORMAT_ID + 1, gtrid, resource).to_pg_gid())


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
record_like = st.fixed_dictionaries(
    {"k": st.sampled_from(["COMMIT", "END", "ABORT", 1])},
    optional={"g": json_values, "b": json_values, "t": json_values, "x": json_values},
)


def _payload(body: object) -> bytes:
    return json.dumps(body).encode()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        record_like.map(_payload),
        json_values.map(_payload),
        st.just(b"[" * 100_000 + b"]" * 100_000),
        st.just(b'{"k":"COMMIT","g":"x","t":1e999}'),
        st.just(b'{"k":"COMMIT","g":"x","x":{"a":1e999}}'),
        st.just(b'{"k":"COMMIT","g":"x","b":"abc"}'),
        st.just(b'{"k":"END","g":"x"}\xff'),
    )
)
def test_record_decode_raises_only_value_error(payload: bytes) -> None:
    try:
        record = LogRecord.decode(payload)
    except ValueError:
        return
    assert record.kind in ("COMMIT", "END") and isinstance(record.gtrid, str)
    assert all(isinstance(b, str) for b in record.branches)
    assert all(isinstance(v, int) for v in record.txids.values())
    # what decodes encodes again and reads back the same
    assert LogRecord.decode(record.encode()[HEADER.size :]) == record


def _framed(payload: bytes) -> bytes:
    import zlib

    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            record_like.map(_payload).map(_framed),
            st.builds(lambda g: LogRecord("END", g).encode(), st.text(max_size=20)),
        ),
        max_size=8,
    ),
    st.integers(0, 50),
)
def test_frame_readers_never_raise(chunks: list[bytes], start: int) -> None:
    data = b"".join(chunks)
    frames = list(read_frames(data, start))
    for end, _ in frames:
        assert end <= len(data)
    resumes = next_good_frame(data, start)
    if resumes is not None:
        assert resumes >= start and frame_at(data, resumes) is not None


# -- a real foreign prepared transaction with such a gid -----------------------------------


@pytest.mark.parametrize("gid", ["²_YQ==_Yg==", "٢_YQ==_Yg==", "1" * 120 + "_YQ==_Yg=="])
def test_odd_foreign_gid_on_postgres_is_left_alone(bank: Bank, make_tm: MakeTM, gid: str) -> None:
    url = bank.urls["pg1"]
    conn = connect(url)
    try:
        run(conn, "BEGIN")
        run(conn, "SELECT 1")
        run(conn, f"PREPARE TRANSACTION '{gid}'")
    finally:
        conn.close()
    try:
        tm = make_tm()
        report = tm.recover()
        assert report.foreign >= 1 and not report.problems, report
        indoubt = tm.inspector.indoubt()
        assert indoubt.foreign >= 1 and not indoubt.transactions and not indoubt.unreachable
        assert (gid,) in run(bank.conns["pg1"], "SELECT gid FROM pg_prepared_xacts")
    finally:
        conn = connect(url)
        try:
            run(conn, f"ROLLBACK PREPARED '{gid}'")
        finally:
            conn.close()


def test_odd_foreign_xid_on_mariadb_is_left_alone(bank: Bank, make_tm: MakeTM) -> None:
    """xatm's own formatID, but a gtrid of non-ASCII bytes that merely looks like xatm's."""
    gtrid = ("²xatm.n." + "0" * 27).encode().hex()
    xid = f"X'{gtrid}',X'ff00',{FORMAT_ID}"
    conn = connect(bank.urls["maria"])
    try:
        run(conn, "CREATE TABLE IF NOT EXISTS foreign_probe (id VARCHAR(64) PRIMARY KEY)")
        run(conn, f"XA START {xid}")
        run(conn, "INSERT INTO foreign_probe VALUES ('odd-xid')")
        run(conn, f"XA END {xid}")
        run(conn, f"XA PREPARE {xid}")
    finally:
        conn.close()
    try:
        tm = make_tm()
        report = tm.recover()
        assert report.foreign >= 1 and not report.problems, report
        assert not tm.inspector.indoubt().transactions
        rows = run(bank.conns["maria"], "XA RECOVER")
        assert any(bytes(r[3]).hex().startswith(gtrid) for r in rows)
    finally:
        conn = connect(bank.urls["maria"])
        try:
            run(conn, f"XA ROLLBACK {xid}")
        finally:
            conn.close()
