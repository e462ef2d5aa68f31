"""pynetdicom's polling loops are woken by their work (shared/patches/reactors.py), and nothing
else that either module asks of ``time`` changes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from dicomflow.shared.patches import reactors
from pynetdicom import AE, evt
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from support.servers import free_port


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever install() does to pynetdicom's modules is undone after the test."""
    monkeypatch.setattr(association_module, "time", time)
    monkeypatch.setattr(dul_module, "time", time)
    yield


def test_other_sleeps_and_names_go_to_time(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = reactors.AssociationClock(0.0002)
    clock.sleep(0.1)  # anything else pynetdicom waits for
    clock.sleep(0.0001)
    clock.sleep(0.001)  # the reactor's turn, but not on an association's thread
    assert slept == [0.1, 0.0001, 0.001]
    assert clock.monotonic is time.monotonic
    assert reactors.DulClock().perf_counter is time.perf_counter


class _Reactor(threading.Thread):
    """A thread shaped like an association: a DIMSE message queue, reactor sleeps."""

    def __init__(self, clock: reactors.AssociationClock, turns: int = 1) -> None:
        super().__init__(daemon=True)
        self.dimse = SimpleNamespace(msg_queue=queue.Queue())
        self.is_established = True
        self.clock = clock
        self.turns = turns
        self.slept = 0.0

    def run(self) -> None:
        started = time.monotonic()
        for _ in range(self.turns):
            self.clock.sleep(reactors.REACTOR_SLEEP)
        self.slept = time.monotonic() - started


def test_the_reactor_sleep_ends_on_a_message() -> None:
    reactor = _Reactor(reactors.AssociationClock(30.0))  # a turn of 30 s unless woken
    reactor.start()
    time.sleep(0.2)
    assert reactor.is_alive()  # it waits while there is nothing to do
    reactor.dimse.msg_queue.put((1, "a decoded DIMSE message"))
    reactor.join(10)
    assert not reactor.is_alive()
    assert reactor.slept < 10


def test_the_reactor_does_not_wait_with_a_message_queued() -> None:
    reactor = _Reactor(reactors.AssociationClock(30.0))
    reactor.dimse.msg_queue.put((1, "already there"))
    reactor.start()
    reactor.join(10)
    assert not reactor.is_alive()


def test_a_paused_reactor_stays_in_its_sleep_until_released(restored: None) -> None:
    reactors.install(0.01)  # idle turns of 10 ms: it would go round 100 times a second
    reactor = _Reactor(association_module.time, turns=3)
    reactor.start()
    with reactors.paused(reactor, timeout=5):
        reactor.dimse.msg_queue.put((1, "the response the sender will take"))
        time.sleep(0.5)
        assert reactor.is_alive()  # neither the message nor its turns woke it
        reactor.dimse.msg_queue.get_nowait()
    reactor.join(10)
    assert not reactor.is_alive()  # released: its remaining turns ran


def test_pausing_a_reactor_that_never_sleeps_fails_in_bounded_time(restored: None) -> None:
    reactors.install()
    reactor = _Reactor(association_module.time, turns=0)  # never reaches its sleep
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not pause"), reactors.paused(reactor, 0.3):
        pytest.fail("the block ran although the reactor never paused")
    assert time.monotonic() - started < 5


def test_echoes_do_not_wait_out_long_polling_turns(restored: None) -> None:
    """With both loops of both ends set to sleep 0.5 s per idle turn, each C-ECHO would
    wait out several of them (the sender's pause, then on each side the DUL's read, the
    reactor's turn, the DUL's write); woken by their work they answer at once."""
    turn = 0.5
    reactors.install(turn)

    def slow(event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = turn

    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, slow)]
    )
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assoc.dul._run_loop_delay = turn
        started = time.monotonic()
        statuses = [_echo(assoc) for _ in range(10)]
        took = time.monotonic() - started
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0] * 10
    assert took < 2 * turn  # unwoken: several idle turns per echo, over 10 s in all


def _echo(assoc: Any) -> int:
    """A C-ECHO with the reactor held the way the scu-gateway's pdata holds it."""
    with reactors.paused(assoc, timeout=5):
        assoc._reactor_checkpoint.clear()  # send_c_echo then finds it already "paused"
        assoc._is_paused = True
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc._reactor_checkpoint.set()


def test_idle_loops_still_sleep(restored: None) -> None:
    """Woken loops must not spin: an idle association's DUL thread sleeps its turns."""
    reactors.install(0.05)
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assoc.dul._run_loop_delay = 0.05
        turns = 0
        clock = dul_module.time
        real = clock.sleep

        def counted(seconds: float) -> None:
            nonlocal turns
            if threading.current_thread() is assoc.dul:
                turns += 1
            real(seconds)

        clock.sleep = counted
        time.sleep(1.0)
        del clock.sleep
        assoc.release()
    finally:
        server.shutdown()
    assert 5 <= turns <= 40  # about 20 turns of 50 ms in a second, not thousands


def test_relax_only_with_the_wake_ups_installed(restored: None) -> None:
    assoc = SimpleNamespace(dul=SimpleNamespace(_run_loop_delay=0.001))
    reactors.relax(assoc)
    assert assoc.dul._run_loop_delay == 0.001  # plain sleeps: 10 ms would delay answers
    reactors.install()
    reactors.relax(assoc)
    assert assoc.dul._run_loop_delay == reactors.IDLE_TURN
