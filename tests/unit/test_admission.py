"""The admission of transactions to their block (``xatm.core.admission``): at most ``limit``
at once, the others served first come first served, none waiting past its bound."""

from __future__ import annotations

import threading
import time

from xatm.core.admission import Admission


def test_unlimited_admits_everyone_and_counts_nothing() -> None:
    gate = Admission()
    assert all(gate.enter(0) for _ in range(1000))
    gate.leave()
    assert (gate.active, gate.waiting) == (0, 0)


def test_past_the_limit_a_caller_waits_no_longer_than_its_bound() -> None:
    gate = Admission(2)
    assert gate.enter(0) and gate.enter(0)
    assert gate.active == 2
    assert not gate.enter(0)
    assert not gate.enter(0.05)
    assert gate.waiting == 0  # a caller that gave up is no longer in the queue
    gate.leave()
    assert gate.enter(0)  # the slot given back is free again
    assert gate.active == 2


def test_slots_are_handed_over_in_arrival_order() -> None:
    gate = Admission(1)
    assert gate.enter(0)
    order: list[int] = []
    lock = threading.Lock()

    def waiter(i: int) -> None:
        assert gate.enter(30)
        with lock:
            order.append(i)
        gate.leave()

    threads = []
    for i in range(5):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while gate.waiting < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert gate.waiting == 5
    assert not gate.enter(0)  # a newcomer never takes a slot before those waiting
    gate.leave()
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3, 4]
    assert (gate.active, gate.waiting) == (0, 0)


def test_a_slot_handed_over_as_its_waiter_gives_up_is_kept_not_lost() -> None:
    """The hand-over and the timeout race: whichever wins, no slot is lost or doubled."""
    gate = Admission(1)
    for _ in range(200):
        assert gate.enter(0)
        got: list[bool] = []
        t = threading.Thread(target=lambda got=got: got.append(gate.enter(0.002)))
        t.start()
        time.sleep(0.002)
        gate.leave()
        t.join(10)
        if got[0]:
            assert gate.active == 1
            gate.leave()
        assert (gate.active, gate.waiting) == (0, 0)


def test_many_threads_never_exceed_the_limit() -> None:
    gate = Admission(3)
    inside = peak = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal inside, peak
        for _ in range(200):
            assert gate.enter(30)
            with lock:
                inside += 1
                peak = max(peak, inside)
            with lock:
                inside -= 1
            gate.leave()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak <= 3
    assert (gate.active, gate.waiting) == (0, 0)
