"""The client-side deadline (``xatm.core.deadline``) on its own, on a socket pair: a call that
gets no answer is cut at its deadline and only then; an idle connection is not cut until a
call starts on it; an inner deadline governs while its block runs; long waits are reported.
(The drivers and the servers are in tests/field/test_silent_servers.py.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from xatm.core import deadline as _deadline


class _Owner:
    """A participant as the deadline sees it."""

    name = "pair"

    def socket_of(self, conn: socket.socket) -> int | None:
        return conn.fileno()


OWNER = _Owner()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _recv_seconds(sock: socket.socket) -> tuple[bytes, float]:
    t0 = time.monotonic()
    data = sock.recv(10)
    return data, time.monotonic() - t0


def test_a_call_with_no_answer_is_cut_at_its_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    with _deadline.bounded(OWNER, a, 0.3, "a test call") as watch:
        data, seconds = _recv_seconds(a)  # the peer never answers
    assert data == b""  # the end of the stream: a driver fails the call as a lost connection
    assert watch.fired
    assert 0.3 <= seconds < 3.0


def test_an_answered_call_is_not_cut(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"ok")
    with _deadline.bounded(OWNER, a, 0.3, "a test call") as watch:
        data, _ = _recv_seconds(a)
    time.sleep(0.5)
    assert data == b"ok" and not watch.fired
    b.sendall(b"again")
    assert a.recv(10) == b"again"  # the connection is intact


def test_an_idle_connection_is_cut_only_once_a_call_starts(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    watch = _deadline.arm(OWNER, a, time.monotonic() + 0.2, "a branch", busy=0)
    try:
        time.sleep(0.6)  # past its deadline, but no call in flight: left alone
        assert not watch.fired
        b.sendall(b"x")
        assert a.recv(1) == b"x"
        with _deadline.calling(watch):
            data, seconds = _recv_seconds(a)
        assert data == b"" and watch.fired and seconds < 3.0
    finally:
        _deadline.disarm(watch)


def test_an_inner_deadline_governs_while_its_block_runs(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    outer = _deadline.arm(OWNER, a, time.monotonic() + 0.2, "an outer call")
    try:
        with _deadline.bounded(OWNER, a, 5.0, "an inner call") as inner:
            time.sleep(0.6)  # past the outer deadline: the inner one is in force
            assert not outer.fired and not inner.fired
        data, seconds = _recv_seconds(a)  # the outer one again, long past
        assert data == b"" and outer.fired and not inner.fired and seconds < 3.0
    finally:
        _deadline.disarm(outer)
    assert b.recv(10) == b""  # shut down both ways


def test_a_long_wait_is_reported_once() -> None:
    seen: list[_deadline.Wait] = []
    done = threading.Event()

    def notice(wait: _deadline.Wait) -> None:
        seen.append(wait)
        done.set()

    _deadline.report_waits(notice, after=0.2)
    try:
        with _deadline.waiting(OWNER, "a connect"):
            assert done.wait(5.0)
            time.sleep(0.4)
    finally:
        _deadline.report_waits(None)
    assert [(w.resource, w.what, w.limit) for w in seen] == [("pair", "a connect", None)]
    assert seen[0].waited >= 0.2
