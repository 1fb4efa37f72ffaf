"""What an operator pastes: every form a database shows an xatm branch's id in, to its gtrid.

:func:`gtrid_of` accepts

* the gtrid itself, ``xatm.<node_id>.<27 hex digits>``;
* a PostgreSQL gid, as ``pg_prepared_xacts`` lists it: ``2019652717_<base64>_<base64>``
  (decoded by ``Xid.from_pg_gid``);
* the ``data`` column of MySQL/MariaDB's ``XA RECOVER``: the gtrid followed by the branch
  qualifier (the resource name), ``xatm.<node_id>.<27 hex digits><resource>``;
* MariaDB's ``XA RECOVER FORMAT='SQL'``: ``X'<hex gtrid>',X'<hex bqual>',2019652717``;
* MySQL's ``XA RECOVER CONVERT XID``: ``0x<hex of gtrid and bqual>``;

each with surrounding blanks or quotes, and returns the gtrid. Anything else, or an id of
another application's transaction (another format id), is a ConfigurationError saying what
is accepted; no input makes it raise anything else.
"""

from __future__ import annotations

import binascii
import re

from xatm.core.xid import FORMAT_ID, MAX_PART, Xid, is_xatm_gtrid
from xatm.errors import ConfigurationError

#: longer input is no form of an xatm id
_MAX_INPUT = 400
_GTRID = r"xatm\.[A-Za-z0-9_-]{1,30}\.[0-9a-f]{27}"
_DATA_RE = re.compile(rf"({_GTRID})([A-Za-z0-9_-]{{1,64}})")
_SQL_RE = re.compile(r"[Xx]'([0-9A-Fa-f]*)',\s*[Xx]'([0-9A-Fa-f]*)',\s*(-?[0-9]{1,10})")
_HEX_RE = re.compile(r"0[xX]([0-9A-Fa-f]{2,256})")

ACCEPTED = (
    "xatm.<node_id>.<27 hex digits>, a PostgreSQL gid 2019652717_<base64>_<base64>, or an"
    " XA RECOVER data column (raw, FORMAT='SQL' or CONVERT XID)"
)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _ascii(hex_text: str) -> str | None:
    try:
        return binascii.unhexlify(hex_text).decode("ascii")
    except (binascii.Error, ValueError):
        return None


def _from_data(data: str) -> str | None:
    """The gtrid of an XA RECOVER data column (gtrid and bqual run together)."""
    if is_xatm_gtrid(data):
        return data
    m = _DATA_RE.fullmatch(data)
    return m.group(1) if m else None


def _decode(text: str) -> str | None:
    """The xatm gtrid ``text`` names, or None."""
    if is_xatm_gtrid(text):
        return text
    if text.split("_", 1)[0] == str(FORMAT_ID):
        xid = Xid.from_pg_gid(text)
        return xid.gtrid if xid is not None and xid.is_xatm else None
    m = _SQL_RE.fullmatch(text)
    if m is not None:
        gtrid, bqual = _ascii(m.group(1)), _ascii(m.group(2))
        if int(m.group(3)) != FORMAT_ID or gtrid is None or bqual is None:
            return None
        if len(gtrid) > MAX_PART or len(bqual) > MAX_PART:
            return None
        return gtrid if is_xatm_gtrid(gtrid) else None
    m = _HEX_RE.fullmatch(text)
    if m is not None:
        data = _ascii(m.group(1))
        return None if data is None else _from_data(data)
    return _from_data(text)


def gtrid_of(value: object) -> str:
    """The xatm gtrid that ``value`` (any form a database shows, see the module docstring)
    names; ConfigurationError for anything else."""
    if isinstance(value, str) and len(value) <= _MAX_INPUT:
        text = value.strip().strip("'\"`").strip()
        found = _decode(text)
        if found is not None:
            return found
        if _foreign_pg(text):
            raise ConfigurationError(
                f"{_show(value)} is the gid of another application's prepared transaction"
                " (not xatm's format id 2019652717): xatm leaves it alone"
            )
    raise ConfigurationError(f"not an xatm gtrid: {_show(value)} (expected {ACCEPTED})")


def _foreign_pg(text: str) -> bool:
    """A well-formed PostgreSQL gid of another format id."""
    xid = Xid.from_pg_gid(text)
    return xid is not None and xid.format_id != FORMAT_ID
