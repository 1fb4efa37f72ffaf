"""Every wait has a bound (issue 17): a server that stops answering holds no caller past its
transaction's timeout plus the connect timeout, and recovery settles what it left once it
answers again.

A server is frozen (SIGSTOP: a MariaDB server, or every process of a PostgreSQL cluster)
while 8 threads (threaded API) and 8 tasks (asyncio API) move money between two of pg1, pg2
and maria at a time, with ``timeout=3``. Before the client-side deadline (``xatm._deadline``)
every call in flight on the frozen server waited for the whole freeze. Checked: no transfer
(the caller's whole ``with`` block) took longer than timeout + connect timeout + slack;
transfers that do not touch the frozen server went on meanwhile; once it is thawed,
recovery settles every branch left in doubt within seconds; the books balance (nothing
split, no acknowledged transfer lost, nothing left prepared); no connection is leaked.

``XATM_FREEZE_SECONDS`` / ``XATM_FREEZE_TIMEOUT`` (defaults 25 and 3) shorten the run for
the MySQL driver legs (tests/driver_legs.sh), which freeze MariaDB only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.omission_support import Load, frozen, settle
from tests.support import Bank, Servers
from xatm._deadline import GRACE

FREEZE = float(os.environ.get("XATM_FREEZE_SECONDS", "25"))
TIMEOUT = float(os.environ.get("XATM_FREEZE_TIMEOUT", "3"))
#: beyond timeout + connect timeout: the watchdog's scan, and a loaded 2-core machine
SLACK = 5.0
BOUND = TIMEOUT + GRACE + SLACK  # 13 s with the defaults
#: a liveness bound on settling after the thaw, not a measurement
SETTLE_BOUND = 60.0
RESOURCES = ("pg1", "pg2", "maria")
NODES = {"silent-t", "silent-a"}


def _left_from_before(bank: Bank, wall: float) -> list[str]:
    """Prepared branches of this test's nodes whose transaction began before ``wall``."""
    return [
        f"{name}:{x.gtrid}"
        for name, xids in bank.xatm_prepared().items()
        for x in xids
        if x.node_id in NODES and x.created_at < wall
    ]


@pytest.mark.parametrize("silent", ["maria", "pg1"])
def test_a_frozen_server_holds_no_caller_past_the_bound(
    silent: str, servers: Servers, bank: Bank, tmp_path: Path
) -> None:
    if servers.set is None:
        pytest.skip("external servers are not frozen")
    assert FREEZE > BOUND, "the freeze must outlast the bound, or it proves nothing"
    bank.create(accounts=16, balance=1000)
    load = Load(bank, RESOURCES, tmp_path / "log", TIMEOUT)
    stop = threading.Event()

    def sweep() -> None:  # each manager's recovery, every second (a sweeper, no backoff)
        while not stop.wait(1.0):
            for tm in load.managers():
                with contextlib.suppress(Exception):  # a frozen server: the next one retries
                    tm.recover()

    sweeper = threading.Thread(target=sweep, daemon=True)
    server = getattr(servers.set, silent)
    try:
        load.start()
        sweeper.start()
        time.sleep(3.0)
        frozen_at = time.monotonic()
        with frozen(server, FREEZE + 30):
            time.sleep(FREEZE)
        thawed_at, thawed_wall = time.monotonic(), time.time()
        # recovery settles what the freeze left, while the transfers go on
        while _left_from_before(bank, thawed_wall):
            assert time.monotonic() - thawed_at < SETTLE_BOUND, _left_from_before(bank, thawed_wall)
            time.sleep(0.1)
        settled_after = time.monotonic() - thawed_at
        time.sleep(max(0.0, 5.0 - settled_after))
        load.stop()
        stop.set()
        sweeper.join()
        settle(load.managers(), bank, NODES, SETTLE_BOUND)
        books = load.books()
        left = bank.xatm_prepared()
    finally:
        stop.set()
        load.close()

    summary: dict[str, object] = {
        "frozen": silent,
        "freeze_s": FREEZE,
        "timeout_s": TIMEOUT,
        "bound_s": BOUND,
        "settled_after_thaw_s": round(settled_after, 2),
        "violations": {
            "split": len(books["split"]),
            "lost_acks": len(books["lost"]),
            "balance_delta": books["balance_delta"],
            "xatm_prepared_left": {n: len(x) for n, x in left.items() if x},
        },
    }
    for api in ("threads", "aio"):
        mine = [t for t in load.done if t.api == api]
        touched = [t for t in mine if silent in t.resources]
        in_freeze = [t for t in mine if frozen_at <= t.started < thawed_at]
        summary[api] = {
            "transfers": len(mine),
            "committed": sum(t.outcome.startswith("committed") for t in mine),
            "left_pending": sum(t.outcome == "committed (pending)" for t in mine),
            "longest_s": round(max(t.seconds for t in mine), 2),
            "longest_touching_frozen_s": round(max((t.seconds for t in touched), default=0), 2),
            "others_committed_during_freeze": sum(
                t.outcome.startswith("committed") and silent not in t.resources for t in in_freeze
            ),
            "outcomes": dict(Counter(t.outcome for t in mine)),
        }
    print("\nsilent-server summary: " + json.dumps(summary), file=sys.stderr)
    out = os.environ.get("XATM_CHAOS_REPORT")
    if out:
        Path(f"{out}.frozen-{silent}.json").write_text(json.dumps(summary, indent=2) + "\n")

    assert books["split"] == [], books["split"][:5]
    assert books["lost"] == [], books["lost"][:5]
    assert books["balance_delta"] == 0
    assert not any(left.values()), left
    assert load.aio_in_use and not any(load.aio_in_use.values()), load.aio_in_use
    for api in ("threads", "aio"):
        stats = summary[api]
        assert isinstance(stats, dict)
        assert stats["longest_s"] <= BOUND, (api, stats)
        assert stats["others_committed_during_freeze"] > 0, (api, stats)
        assert stats["committed"] > 0
