"""pynetdicom's two polling loops per association, woken by what they wait for.

Every pynetdicom association runs two threads that poll: the DUL reactor (its network
loop: reads PDUs from the socket, writes the PDUs the association queued) and the
association reactor (takes each decoded DIMSE message off a queue and serves it). Both
sleep a fixed time on every idle turn, 1 ms by default, so every message waited out the
rest of a sleep at each hop: a request's last PDU before the DUL read it, the decoded
request before the reactor served it, the response before the DUL wrote it, and on the
sending side the reactor's pause before each request could be written.

``install(delay)`` gives both modules a ``time`` whose loop sleep ends as soon as there is
work: the DUL thread waits in ``select`` on its socket and on a wake-up socket that every
primitive queued for sending pokes; the association reactor waits on a condition that
each message put on its DIMSE queue notifies. ``delay`` is only the longest an idle turn
lasts, so idle associations cost what they did while busy ones answer at once. A sender
that needs the reactor out of the way while it takes its own response (``paused``) holds
it in that sleep, usually without waiting at all, instead of handing a pause over to the
reactor thread. Everything else either module asks of ``time`` goes to ``time``
unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from dicomflow.shared import patches
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module

FENCE = patches.REACTORS  # the version gate of this module's patch
REACTOR_SLEEP = 0.001  # pynetdicom 3.0's Association._run_reactor, fixed
IDLE_TURN = 0.01  # dicomflow's idle turn for both loops (scp.reactor_delay's default)


def _messages(assoc: Any) -> queue.Queue[Any] | None:
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    return q if isinstance(q, queue.Queue) else None


def _after_put(q: queue.Queue[Any], hook: Callable[[], None]) -> None:
    """Make every ``put`` on this one queue (not the class) call ``hook`` afterwards."""
    put: Callable[..., None] = q.put

    def put_then_hook(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        hook()

    setattr(q, "put", put_then_hook)  # noqa: B010


class _Gate:
    """Where an association's reactor sleeps between turns, and can be held.

    ``woken`` ends the current (or next) sleep: every message put on the DIMSE queue sets
    it. (Not the queue's own ``not_empty`` condition: ``Queue.put`` notifies one waiter,
    and the reactor would take that notification from a sender blocked in ``get_msg``
    for its response.) While ``held``, the reactor stays in its sleep whatever arrives,
    so a sender can write a request and take the response itself.
    """

    def __init__(self, messages: queue.Queue[Any]) -> None:
        self.messages = messages
        self.cond = threading.Condition()
        self.woken = False
        self.held = 0
        self.sleeping = False
        _after_put(messages, self.wake)

    def wake(self) -> None:
        with self.cond:
            self.woken = True
            self.cond.notify_all()


_gates: weakref.WeakKeyDictionary[Any, _Gate] = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def _gate(assoc: Any) -> _Gate | None:
    gate = _gates.get(assoc)  # every reactor turn: no lock once the gate exists
    if gate is not None:
        return gate
    messages = _messages(assoc)
    if messages is None:
        return None
    with _gates_lock:  # the reactor and a sender may both be first
        gate = _gates.get(assoc)
        if gate is None:
            gate = _gates[assoc] = _Gate(messages)
    return gate


class AssociationClock:
    """``time`` for pynetdicom's association module: the reactor's 1 ms sleep becomes a
    wait of at most ``delay`` for the next decoded DIMSE message, and no end while a
    sender holds the reactor (``paused``)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def sleep(self, seconds: float) -> None:
        assoc = threading.current_thread()
        gate = _gate(assoc) if seconds == REACTOR_SLEEP else None
        if gate is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + self.delay
        with gate.cond:
            gate.sleeping = True
            gate.cond.notify_all()  # a sender may be waiting for the reactor to be here
            try:
                while gate.held or not (gate.woken or gate.messages.queue):
                    left = None if gate.held else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    gate.cond.wait(left)
                gate.woken = False  # a message arriving during the next turn ends the next sleep
            finally:
                gate.sleeping = False

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def paused(assoc: Any, timeout: float) -> Iterator[None]:
    """The association reactor does not run inside this block, so the caller can send a
    request and take its response off the DIMSE queue itself.

    With ``install``: the reactor is held in its sleep, at once when it is there (a
    sender sending one instance after another finds it there), otherwise as soon as it
    ends its turn. Without: pynetdicom's own checkpoint, as its ``send_*`` methods do.
    Raises RuntimeError if the reactor does not get there within ``timeout`` (the
    association ended, or its reactor is stuck).
    """
    clock = getattr(association_module, "time", None)
    gate = _gate(assoc) if isinstance(clock, AssociationClock) else None
    deadline = time.monotonic() + timeout
    if gate is None:
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:
                _check(assoc, deadline)
                time.sleep(0.0001)
            yield
        finally:
            assoc._reactor_checkpoint.set()
        return
    with gate.cond:
        gate.held += 1
    try:
        with gate.cond:
            while not gate.sleeping:  # mid-turn, or paused by pynetdicom's own send_*
                _check(assoc, deadline)
                gate.cond.wait(0.001)
        yield
    finally:
        with gate.cond:
            gate.held -= 1
            gate.cond.notify_all()


def _check(assoc: Any, deadline: float) -> None:
    if not assoc.is_established or time.monotonic() > deadline:
        raise RuntimeError("the association's reactor did not pause for the request")


class _Waker:
    """A socket pair that a DUL's outgoing queue pokes on every put.

    Only its DUL thread holds it (thread-local): when that thread ends, the pair is
    closed at once, however long the association object itself lives on.
    """

    def __init__(self, outgoing: queue.Queue[Any]) -> None:
        self.read, self._write = socket.socketpair()
        self.read.setblocking(False)
        self._write.setblocking(False)
        weakref.finalize(self, _close, self.read, self._write)
        me = weakref.ref(self)  # the queue must not keep the pair open past its thread

        def poke() -> None:
            waker = me()
            if waker is not None:
                with contextlib.suppress(OSError):  # already full of pokes, or closed
                    waker._write.send(b"\0")

        _after_put(outgoing, poke)

    def drain(self) -> None:
        # More pokes than this are left for the next select, which then returns at once.
        with contextlib.suppress(OSError):  # none there (BlockingIOError)
            self.read.recv(4096)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()


class DulClock:
    """``time`` for pynetdicom's DUL module: the network loop's idle sleep becomes a
    ``select`` on the association's socket and its wake-up socket, at most as long."""

    def __init__(self) -> None:
        self._local = threading.local()

    def sleep(self, seconds: float) -> None:
        dul = threading.current_thread()
        if not isinstance(dul, dul_module.DULServiceProvider):
            time.sleep(seconds)  # another thread waiting for a DUL to stop
            return
        waker: _Waker | None = getattr(self._local, "waker", None)
        if waker is None:
            waker = self._local.waker = _Waker(dul.to_provider_queue)
        watched: list[Any] = [waker.read]
        sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select would not see them
            watched.append(sock)
        try:
            ready, _, _ = select.select(watched, [], [], seconds)
        except (OSError, ValueError):  # the socket closed under us: the loop will see it
            time.sleep(seconds)
            return
        if waker.read in ready:
            waker.drain()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def relax(assoc: Any, delay: float = IDLE_TURN) -> None:
    """Let ``assoc``'s network loop idle ``delay`` per turn instead of pynetdicom's 1 ms,
    if its wake-ups are installed (without them it would answer that much later)."""
    if isinstance(getattr(dul_module, "time", None), DulClock):
        assoc.dul._run_loop_delay = delay


def install(delay: float = IDLE_TURN) -> bool:
    """Wake both loops of every association in this process; ``delay`` bounds the
    association reactor's idle turn (the DUL's is its own ``_run_loop_delay``). On a
    pynetdicom the wake-ups were not verified on (``FENCE``) the loops stay as shipped:
    False, with a warning."""

    def apply() -> None:
        setattr(association_module, "time", AssociationClock(delay))  # noqa: B010 (untyped)
        if not isinstance(getattr(dul_module, "time", None), DulClock):
            setattr(dul_module, "time", DulClock())  # noqa: B010

    return FENCE.install(apply)
