"""Transaction identifiers: how xatm names a global transaction and each of its branches.

An XID is the triple (format_id, gtrid, bqual) of the X/Open XA standard:

* ``format_id`` is :data:`FORMAT_ID`, the same for every xatm branch;
* ``gtrid`` (global transaction id) is ``xatm.<node_id>.<txid>``, where ``txid`` is the
  creation time in milliseconds (11 hex digits), a flags digit and 60 random bits (15 hex
  digits). The flags are :data:`FLAG_MARKER` (the decision may be a commit-marker row) and
  :data:`FLAG_LONG` (the transaction's timeout is longer than its coordinator's default, so
  only that coordinator, or its death, ends it). So a gtrid says whose it is, how old it is
  (even where the server keeps no timestamp), where its decision may be and who may judge
  its age;
* ``bqual`` (branch qualifier) is the resource's name, unique within one transaction.

Both parts are ASCII and at most 64 bytes, the MySQL limit. On PostgreSQL the gid is the
psycopg / PgJDBC encoding ``<format_id>_<base64(gtrid)>_<base64(bqual)>``, which
``psycopg.Connection.tpc_recover()`` parses back into an ``Xid``; on MySQL the XID is sent as
hex literals, so no byte of it is ever interpreted as SQL.

The decoders (:meth:`Xid.from_pg_gid`, :meth:`Xid.from_mysql`, :func:`parse_gtrid`, ...)
read what the servers list, which includes other applications' prepared transactions: any
input, however odd, gives "not xatm's" (None, False or ValueError), never another error.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import random
import re
import secrets
import time
from dataclasses import dataclass

from xatm.errors import ConfigurationError

#: The formatID of every xatm branch: "xatm" in ASCII, a positive 32-bit integer.
FORMAT_ID = 0x7861746D
NAMESPACE = "xatm"
MAX_PART = 64
#: node_id: at most this many characters of ``[A-Za-z0-9_-]``.
MAX_NODE_ID = 30
#: resource names: at most this many characters of ``[A-Za-z0-9_-]``.
MAX_RESOURCE_NAME = 64

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
#: the format_id part of a PostgreSQL gid: ASCII digits only (re's \d would take "٢")
_PG_FORMAT_ID_RE = re.compile(r"-?[0-9]{1,10}")
_GTRID_RE = re.compile(r"xatm\.([A-Za-z0-9_-]{1,30})\.([0-9a-f]{11})([0-9a-f]{16})")


def validate_node_id(node_id: object) -> str:
    """Return ``node_id`` if it can name a coordinator, else raise ConfigurationError."""
    if not isinstance(node_id, str) or not _NAME_RE.fullmatch(node_id):
        raise ConfigurationError(
            f"node_id must be 1 to {MAX_NODE_ID} characters of letters, digits, '_' and '-';"
            f" got {_show(node_id)}"
        )
    if len(node_id) > MAX_NODE_ID:
        raise ConfigurationError(
            f"node_id must be at most {MAX_NODE_ID} characters (it is carried in every XID);"
            f" got {len(node_id)}"
        )
    return node_id


def validate_resource_name(name: object) -> str:
    """Return ``name`` if it can name a resource (it becomes a branch qualifier)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > MAX_RESOURCE_NAME:
        raise ConfigurationError(
            f"a resource name must be 1 to {MAX_RESOURCE_NAME} characters of letters, digits,"
            f" '_' and '-'; got {_show(name)}"
        )
    return name


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class Xid:
    """One branch's XA identifier."""

    format_id: int
    gtrid: str
    bqual: str

    @property
    def is_xatm(self) -> bool:
        """True when this XID was made by xatm (any node)."""
        return self.format_id == FORMAT_ID and _GTRID_RE.fullmatch(self.gtrid) is not None

    @property
    def node_id(self) -> str:
        """The node_id of the coordinator that created this XID."""
        return parse_gtrid(self.gtrid)[0]

    @property
    def created_at(self) -> float:
        """Creation time (seconds since the epoch) carried in the gtrid."""
        return parse_gtrid(self.gtrid)[1]

    # -- PostgreSQL ------------------------------------------------------------------------
    def to_pg_gid(self) -> str:
        """The gid for ``PREPARE TRANSACTION``: the psycopg / PgJDBC encoding."""
        g = base64.b64encode(self.gtrid.encode("ascii")).decode("ascii")
        b = base64.b64encode(self.bqual.encode("ascii")).decode("ascii")
        return f"{self.format_id}_{g}_{b}"

    @classmethod
    def from_pg_gid(cls, gid: str) -> Xid | None:
        """Parse a gid of the psycopg / PgJDBC shape, or return None for any other gid.

        Never raises: a foreign gid, however odd, is simply not an Xid."""
        parts = gid.split("_")
        if len(parts) != 3 or _PG_FORMAT_ID_RE.fullmatch(parts[0]) is None:
            return None  # str.isdigit() would accept "²", which int() refuses
        format_id = int(parts[0])
        if not -(2**31) <= format_id < 2**31:
            return None
        try:
            gtrid = base64.b64decode(parts[1], validate=True).decode("ascii")
            bqual = base64.b64decode(parts[2], validate=True).decode("ascii")
        except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        xid = cls(format_id, gtrid, bqual)
        # Only the canonical spelling names this XID: "01_…", "+1_…" or base64 with stray
        # padding bits decode to the same triple, but COMMIT PREPARED of xid.to_pg_gid()
        # would then name another transaction.
        return xid if xid.to_pg_gid() == gid else None

    # -- MySQL / MariaDB -------------------------------------------------------------------
    def to_mysql(self) -> str:
        """The XID as SQL text for ``XA ...`` statements: hex literals and an integer."""
        g = self.gtrid.encode("ascii").hex()
        b = self.bqual.encode("ascii").hex()
        return f"X'{g}',X'{b}',{int(self.format_id)}"

    @classmethod
    def from_mysql(
        cls, format_id: int, gtrid_length: int, bqual_length: int, data: bytes
    ) -> Xid | None:
        """Build an Xid from one row of ``XA RECOVER``, or None if the row is not one that
        xatm could have made (lengths that do not fit the data, non-ASCII bytes)."""
        if not (
            0 <= gtrid_length <= MAX_PART
            and 0 <= bqual_length <= MAX_PART
            and gtrid_length + bqual_length <= len(data)
            and -(2**31) <= format_id < 2**31
        ):
            return None
        try:
            gtrid = data[:gtrid_length].decode("ascii")
            bqual = data[gtrid_length : gtrid_length + bqual_length].decode("ascii")
        except UnicodeDecodeError:
            return None
        return cls(int(format_id), gtrid, bqual)


#: flag bit in the gtrid's 12th hex digit: the transaction may keep its decision in a
#: commit-marker row (its coordinator has commit_markers), not only in the coordinator log
FLAG_MARKER = 0x1
#: flag bit: the transaction has a timeout longer than its coordinator's default, so only
#: that coordinator (or its death) may end it: other hosts' sweepers do not judge its age
FLAG_LONG = 0x2
#: flag bit: the last 15 hex digits are the creating process's incarnation (10 hex digits,
#: random per manager) and a sequence number (5 hex digits), not 60 random bits; a gtrid
#: without it was made by xatm 0.2 (see :func:`incarnation_of`)
FLAG_INCARNATION = 0x4
#: hex digits of an incarnation in a gtrid
INCARNATION_DIGITS = 10


#: the random bits of gtrids: a generator seeded from the OS once per process (and again in
#: a forked child, which would otherwise repeat its parent's sequence), so that a new gtrid
#: costs no system call (``secrets`` would read the OS's randomness, and release the GIL, for
#: every transaction). The bits need to be unique, not secret: a gtrid also carries the node
#: (one live process per node_id) and the millisecond.
_random = random.Random(secrets.randbits(128))


def _reseed() -> None:
    _random.seed(secrets.randbits(128))


os.register_at_fork(after_in_child=_reseed)


#: the sequence part of gtrids with an incarnation (wraps at 2**20; with the millisecond and
#: the incarnation it keeps every gtrid of a process unique)
_sequence = itertools.count()


def new_incarnation() -> str:
    """A fresh incarnation: 40 random bits, naming one manager (one process's tenure of its
    node_id) in every gtrid it makes."""
    return f"{secrets.randbits(4 * INCARNATION_DIGITS):0{INCARNATION_DIGITS}x}"


def new_gtrid(
    node_id: str, *, marker: bool = False, long: bool = False, incarnation: str | None = None
) -> str:
    """A fresh global transaction id for ``node_id`` (already validated).

    ``txid`` is 11 hex digits of milliseconds, 1 hex digit of flags (:data:`FLAG_MARKER`,
    :data:`FLAG_LONG`, :data:`FLAG_INCARNATION`) and 15 hex digits: the ``incarnation`` (10)
    and a sequence number (5) when one is given (every manager gives its own), else 60
    random bits (the 0.2 layout, kept for tools and tests)."""
    ms = int(time.time() * 1000)
    flags = (FLAG_MARKER if marker else 0) | (FLAG_LONG if long else 0)
    if incarnation is None:
        return f"{NAMESPACE}.{node_id}.{ms:011x}{flags:x}{_random.getrandbits(60):015x}"
    seq = next(_sequence) & 0xFFFFF
    return f"{NAMESPACE}.{node_id}.{ms:011x}{flags | FLAG_INCARNATION:x}{incarnation}{seq:05x}"


def incarnation_of(gtrid: str) -> str | None:
    """The incarnation of the manager that made ``gtrid`` (None for a gtrid without one, or
    not an xatm gtrid)."""
    m = _GTRID_RE.fullmatch(gtrid)
    if m is None or not int(m.group(3)[0], 16) & FLAG_INCARNATION:
        return None
    return m.group(3)[1 : 1 + INCARNATION_DIGITS]


def has_long_timeout(gtrid: str) -> bool:
    """True if the transaction outlives its coordinator's default timeout (see FLAG_LONG)."""
    m = _GTRID_RE.fullmatch(gtrid)
    return m is not None and bool(int(m.group(3)[0], 16) & FLAG_LONG)


def may_use_marker(gtrid: str) -> bool:
    """True if the transaction's decision may be a commit-marker row (see FLAG_MARKER)."""
    m = _GTRID_RE.fullmatch(gtrid)
    return m is not None and bool(int(m.group(3)[0], 16) & FLAG_MARKER)


def parse_gtrid(gtrid: str) -> tuple[str, float]:
    """Return (node_id, created_at) of an xatm gtrid; raise ValueError for any other."""
    m = _GTRID_RE.fullmatch(gtrid)
    if m is None:
        raise ValueError(f"not an xatm gtrid: {_show(gtrid)}")
    return m.group(1), int(m.group(2), 16) / 1000.0


def is_xatm_gtrid(gtrid: str) -> bool:
    """True when ``gtrid`` has the shape of an xatm global transaction id."""
    return _GTRID_RE.fullmatch(gtrid) is not None


def branch_xid(gtrid: str, resource: str) -> Xid:
    """The XID of the branch of ``gtrid`` on ``resource``."""
    return Xid(FORMAT_ID, gtrid, resource)
