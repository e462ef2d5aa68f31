"""pynetdicom's two polling loops per association, woken by what they wait for.

Every pynetdicom association runs two threads that poll: the DUL reactor (its network
loop: reads PDUs from the socket, writes the PDUs the association queued) and the
association reactor (takes each decoded DIMSE message off a queue and serves it). Both
sleep a fixed time on every idle turn, 1 ms by default, so every message waited out the
rest of a sleep at each hop: a request's last PDU before the DUL read it, the decoded
request before the reactor served it, the response before the DUL wrote it, and on the
sending side the reactor's pause before a request could be written.

``install(delay)`` gives both modules a ``time`` whose loop sleep ends as soon as there is
work: the DUL thread waits in ``select`` on its socket and on a wake-up socket that every
primitive queued for sending pokes; the association reactor waits on an event that each
message put on its DIMSE queue sets (and ``wake_reactor``, for a sender that wants the
reactor paused). ``delay`` is only the longest an idle
turn lasts, so idle associations cost what they did while busy ones answer at once.
Everything else either module asks of ``time`` goes to ``time`` unchanged.
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
from collections.abc import Callable
from typing import Any

from pynetdicom import association as association_module
from pynetdicom import dul as dul_module

REACTOR_SLEEP = 0.001  # pynetdicom 3.0's Association._run_reactor, fixed


def _messages(assoc: Any) -> queue.Queue[Any] | None:
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    return q if isinstance(q, queue.Queue) else None


_wake_events: weakref.WeakKeyDictionary[Any, threading.Event] = weakref.WeakKeyDictionary()
_wake_events_lock = threading.Lock()


def _wake_event(assoc: Any) -> threading.Event | None:
    """The event that ends ``assoc``'s reactor sleep: set by every put on its DIMSE
    message queue and by ``wake_reactor``. (Not the queue's own ``not_empty`` condition:
    ``Queue.put`` notifies one waiter, and the reactor would take that notification from
    a sender blocked in ``get_msg`` for its response.)"""
    messages = _messages(assoc)
    if messages is None:
        return None
    with _wake_events_lock:
        event = _wake_events.get(assoc)
        if event is None:
            event = _wake_events[assoc] = threading.Event()
            put: Callable[..., None] = messages.put
            wake = event

            def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
                put(item, block, timeout)
                wake.set()

            setattr(messages, "put", put_and_wake)  # noqa: B010 (this queue, not the class)
    return event


class AssociationClock:
    """``time`` for pynetdicom's association module: the reactor's 1 ms sleep becomes a
    wait of at most ``delay`` for the next decoded DIMSE message or ``wake_reactor``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def sleep(self, seconds: float) -> None:
        assoc = threading.current_thread()
        event = _wake_event(assoc) if seconds == REACTOR_SLEEP else None
        if event is None:
            time.sleep(seconds)
            return
        messages = _messages(assoc)
        if messages is not None and not messages.queue:
            event.wait(self.delay)
        event.clear()  # a wake during the turn that follows ends the next sleep at once

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def wake_reactor(assoc: Any) -> None:
    """End the association reactor's current sleep (it then reaches its pause point)."""
    event = _wake_event(assoc)
    if event is not None:
        event.set()


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
        put: Callable[..., None] = outgoing.put
        me = weakref.ref(self)

        def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            waker = me()
            if waker is not None:
                waker.poke()

        setattr(outgoing, "put", put_and_wake)  # noqa: B010 (this queue, not the class)

    def poke(self) -> None:
        with contextlib.suppress(OSError):  # already full of pokes, or closed
            self._write.send(b"\0")

    def drain(self) -> None:
        try:
            while self.read.recv(4096):
                pass
        except OSError:  # nothing left (BlockingIOError)
            pass


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


def install(delay: float = REACTOR_SLEEP) -> None:
    """Wake both loops of every association in this process; ``delay`` bounds the
    association reactor's idle turn (the DUL's is its own ``_run_loop_delay``)."""
    setattr(association_module, "time", AssociationClock(delay))  # noqa: B010 (untyped)
    if not isinstance(getattr(dul_module, "time", None), DulClock):
        setattr(dul_module, "time", DulClock())  # noqa: B010
