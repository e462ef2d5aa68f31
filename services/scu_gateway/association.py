"""Associations to one destination, kept open and reused across consecutive instances.

pynetdicom is blocking, so every method here runs in a worker thread
(``asyncio.to_thread``). Each sender holds at most one association at a time and the
delivery consumer runs ``max_associations`` senders, so the pool never has more than
that many open: a sender that needs an association while the pool is full closes an
idle one first.

An association is negotiated for the (SOP class, transfer syntax) pairs recently seen,
one presentation context per pair, so a series in one syntax travels over one
association. Instances are sent exactly as stored (the file's encoded dataset, written
to the socket by ``pdata`` on plain TCP, by pynetdicom over TLS), never transcoded: a
pair the peer does not accept is a permanent refusal. Nagle is off on every
association's socket. A reused association the peer closed while idle is replaced once,
at once, before the failure counts as a transient one.

A rejection is a rejection even when pynetdicom aborted before reading it
(``rejection_of``): a permanent one refuses the delivery, a transient one defers it.

Association attempts are counted per destination (opened, rejected, failed) and the
open ones exported as a gauge, when the pool is given the service's metrics.

A destination with a ``tls`` table is reached over DICOM TLS (``shared.dicomtls``): the
peer's certificate chain is always verified and, unless ``check_hostname`` is false, its
name against ``server_name`` or the host. A failed handshake is a failed association
(deferred and retried, like an unreachable peer); pynetdicom logs the TLS error.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomflow.scu_gateway import metrics as scu_metrics
from dicomflow.scu_gateway import pdata, response
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import (
    DeliveryRefused,
    DestinationUnreachable,
)
from dicomflow.shared.dicom import dicomtls
from dicomflow.shared.patches import reactors
from dicomflow.shared.telemetry.metrics import Metrics
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)

MAX_CONTEXTS = 64  # of the 128 DICOM allows: room for a peer that splits contexts
REJECTED_PERMANENT = 0x01
REJECTED = (REJECTED_PERMANENT, 0x02)  # A-ASSOCIATE-RJ results: permanent, transient


@dataclass
class Link:
    assoc: Any  # pynetdicom.Association (untyped)
    accepted: set[Pair]
    proposed: set[Pair]
    last_used: float = field(default_factory=time.monotonic)
    sent: int = 0


class AssociationPool:
    def __init__(
        self,
        name: str,
        destination: DestinationSettings,
        calling_ae: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self._dest = destination
        self._ae = AE(ae_title=calling_ae)
        self._ae.connection_timeout = destination.connect_timeout
        self._ae.acse_timeout = destination.acse_timeout
        self._ae.dimse_timeout = destination.dimse_timeout
        self._ae.network_timeout = destination.network_timeout
        self._lock = threading.Lock()
        self._idle: list[Link] = []
        self._open = 0
        self._wanted: dict[Pair, None] = {}
        self._metrics = metrics
        self._tls_args: tuple[ssl.SSLContext, str] | None = None
        if destination.tls is not None:
            tls = destination.tls
            context = dicomtls.client_context(tls, f"scu.destinations.{name}.tls")
            self._tls_args = (context, dicomtls.server_hostname(tls, destination.host))
            if not tls.check_hostname:
                log.warning(
                    "%s: scu.destinations.%s.tls.check_hostname = false: any certificate "
                    "signed by the trusted CAs is accepted, whatever name it carries",
                    self.where,
                    name,
                )
        if metrics is not None:
            scu_metrics.of(metrics).destination_at_zero(name, lambda: self.open_count)

    @property
    def open_count(self) -> int:
        """Associations open for sending now (the C-ECHO health check's not included)."""
        return self._open

    @property
    def where(self) -> str:
        tls = ", TLS" if self._tls_args is not None else ""
        return f"{self.name} ({self._dest.ae_title}@{self._dest.host}:{self._dest.port}{tls})"

    def store(self, path: Path, pair: Pair, written: Callable[[], None] | None = None) -> int:
        """C-STORE the Part-10 file at ``path``; the peer's status, or a typed error.

        ``written`` (which must not raise, and may be called more than once) is called
        once the request is on the wire, or before an association is opened for it."""
        link = self._take(pair)
        if link is not None:
            try:
                return self._send(link, path, written)
            except DestinationUnreachable as exc:
                log.info("%s: reused association failed (%s); opening a new one", self.name, exc)
        if written is not None:
            written()
        return self._send(self._connect(pair), path, written)

    def echo(self) -> int:
        """C-ECHO on an association of its own; the status, or a typed error."""
        assoc = self._associate([build_context(Verification)])
        try:
            status = assoc.send_c_echo()
            if "Status" not in status:
                raise DestinationUnreachable(f"{self.where} did not answer the C-ECHO")
            return int(status.Status)
        finally:
            assoc.release()

    def reap(self, idle_for: float | None = None) -> None:
        """Release associations unused for ``idle_for`` seconds (default: idle_timeout)."""
        limit = self._dest.idle_timeout if idle_for is None else idle_for
        now = time.monotonic()
        with self._lock:
            old = [link for link in self._idle if now - link.last_used >= limit]
            self._idle = [link for link in self._idle if link not in old]
        for link in old:
            self._close(link)

    def close(self) -> None:
        self.reap(idle_for=0.0)

    # -- internals ------------------------------------------------------------------------
    def _take(self, pair: Pair) -> Link | None:
        with self._lock:
            self._wanted.pop(pair, None)
            self._wanted[pair] = None
            while len(self._wanted) > MAX_CONTEXTS:
                self._wanted.pop(next(iter(self._wanted)))
            for i, link in enumerate(self._idle):
                if pair in link.accepted:
                    return self._idle.pop(i)
            if any(pair in link.proposed for link in self._idle):
                raise self._no_context(pair)
            victim = self._idle.pop(0) if self._idle and self._open >= self._limit else None
        if victim is not None:
            self._close(victim)
        return None

    @property
    def _limit(self) -> int:
        return self._dest.max_associations

    def _connect(self, pair: Pair) -> Link:
        with self._lock:
            pairs = [pair, *(p for p in reversed(self._wanted) if p != pair)][:MAX_CONTEXTS]
        assoc = self._associate([build_context(sop, [ts]) for sop, ts in pairs])
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        link = Link(assoc, accepted, set(pairs))
        with self._lock:
            self._open += 1
        if pair not in accepted:
            self._close(link)
            raise self._no_context(pair)
        log.info(
            "%s: association open, %d of %d contexts accepted",
            self.where,
            len(accepted),
            len(pairs),
        )
        return link

    def _associate(self, contexts: list[Any]) -> Any:
        dest = self._dest
        assoc = self._ae.associate(
            dest.host,
            dest.port,
            contexts=contexts,
            ae_title=dest.ae_title,
            max_pdu=dest.maximum_pdu_size,
            tls_args=self._tls_args,
        )
        rejection = rejection_of(assoc)
        self._count(
            "opened" if assoc.is_established else "rejected" if rejection is not None else "failed"
        )
        if assoc.is_established:
            # pynetdicom leaves Nagle on: with delayed ACKs at the peer, the last
            # segment of every C-STORE would wait tens of milliseconds.
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reactors.relax(assoc)  # woken by its work, it need not poll every 1 ms
            response.install(assoc)  # C-STORE responses decoded without pydicom
            return assoc
        if rejection is not None:
            reason = (
                f"{self.where} rejected the association: {rejection.result_str}, "
                f"{rejection.source_str}, {rejection.reason_str}"
            )
            if rejection.result == REJECTED_PERMANENT:
                raise DeliveryRefused(reason)
            raise DestinationUnreachable(reason)
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            raise DeliveryRefused(
                f"{self.where} accepted none of the proposed presentation contexts"
            )
        raise DestinationUnreachable(
            f"cannot associate with {self.where}: connection refused, timed out or aborted"
        )

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            scu_metrics.of(self._metrics).scu_associations.labels(self.name, result).inc()

    def _send(self, link: Link, path: Path, written: Callable[[], None] | None) -> int:
        try:
            if self._tls_args is None and pdata.usable(link.assoc):
                rsp = pdata.store(link.assoc, path, self._dest.network_timeout, written)
            else:
                if written is not None:
                    written()  # pynetdicom writes and waits in one call
                rsp = link.assoc.send_c_store(path)
        except (RuntimeError, OSError) as exc:  # not established any more, socket gone
            self._close(link)
            raise DestinationUnreachable(f"association with {self.where} lost: {exc}") from exc
        if "Status" not in rsp:
            self._close(link)
            raise DestinationUnreachable(
                f"no C-STORE response from {self.where} (association aborted or DIMSE timeout)"
            )
        link.sent += 1
        link.last_used = time.monotonic()
        if link.assoc.is_established:
            with self._lock:
                self._idle.append(link)
        else:
            self._close(link)
        return int(rsp.Status)

    def _close(self, link: Link) -> None:
        with self._lock:
            self._open -= 1
        if link.assoc.is_established:
            link.assoc.release()
        log.info("%s: association closed after %d instance(s)", self.where, link.sent)

    def _no_context(self, pair: Pair) -> DeliveryRefused:
        return DeliveryRefused(
            f"{self.where} accepts no presentation context for SOP class {pair[0]} in "
            f"transfer syntax {pair[1]} (dicomflow sends instances as stored, never transcoded)"
        )


def rejection_of(assoc: Any) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ, whether pynetdicom read it or aborted before it did.

    pynetdicom 3.0's requestor sends its request, waits for the transport to be up, then
    gives up with an abort if the socket is already closed, without looking at what the
    DUL thread read. A peer that rejects at once and closes (Orthanc for a called AE it
    does not know) wins that race 4 to 7 times in 100 on loopback: the rejection
    waits unread on the DUL's queue for the association's user, and the association
    reports an abort, a transient failure, instead of a permanent refusal.
    """
    if assoc.is_rejected:
        primitive: A_ASSOCIATE | None = assoc.acceptor.primitive
        return primitive
    if assoc.is_established:
        return None
    queued = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if not isinstance(queued, queue.Queue):
        return None
    for primitive in list(queued.queue):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in REJECTED:
            return primitive
    return None
