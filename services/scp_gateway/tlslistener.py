"""The gateway's DICOM TLS listener: handshakes that say why they fail, and calling AEs
bound to client certificates.

pynetdicom's ``AssociationServer.get_request`` performs the TLS handshake inside the
accepting thread: a failed handshake raises an ``OSError`` that ``socketserver`` drops
without a word, and a peer that connects and sends nothing stalls every other accept.
``TlsAssociationServer`` only accepts there; each connection's own thread does the
handshake, bounded by ``handshake_timeout``, and a refused one is logged (one WARNING:
the peer address and why) and counted by kind. No patient data exists at that point.
A connection closed before its first byte (a TCP port probe) is counted, not logged.

``CertificateAeMap`` enforces ``scp.tls.client_aes`` when an A-ASSOCIATE-RQ arrives
(``EVT_REQUESTED``, the hook pynetdicom provides for refusing a request): a calling AE
not listed for an identity of the presented certificate gets an A-ASSOCIATE-RJ
(rejected-permanent, service user, calling AE title not recognised), the same answer
as an AE outside the allow-list, and a WARNING line.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, cast

from dicomflow.shared.dicom.dicomtls import certificate_identities, refusal
from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03


class TlsAssociationServer(ThreadedAssociationServer):
    """A threaded association server that does the TLS handshake per connection thread.

    Made through ``AE.make_server(..., server_class=TlsAssociationServer,
    handshake_timeout=..., on_handshake=...)``; ``on_handshake`` receives "ok" or the
    refusal kind of each handshake.
    """

    def __init__(
        self,
        *args: Any,
        handshake_timeout: float,
        on_handshake: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self._on_handshake = on_handshake
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        # Accept only: the handshake happens in the connection's own thread.
        listener = cast(socket.socket, self.socket)  # bound in __init__
        request, address = listener.accept()
        return request, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        tls = self._handshake(cast(socket.socket, request), client_address)  # TCP: a socket
        if tls is not None:
            super().process_request_thread(tls, client_address)

    def _handshake(self, request: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        context = cast(ssl.SSLContext, self.ssl_context)  # the server is made with one
        try:
            request.settimeout(self.handshake_timeout)
            if not request.recv(1, socket.MSG_PEEK):
                # Closed before sending a byte: a port probe, not a refused handshake.
                log.debug("connection from %s closed before any TLS", _peer(client_address))
                self._on_handshake("closed")
                self.shutdown_request(request)
                return None
            tls = context.wrap_socket(request, server_side=True)
            tls.settimeout(None)  # blocking, as pynetdicom's plain sockets are
        except (OSError, ValueError) as exc:
            kind, why = refusal(exc, self.handshake_timeout)
            log.warning("DICOM TLS handshake from %s refused: %s", _peer(client_address), why)
            self._on_handshake(kind)
            self.shutdown_request(request)
            return None
        self._on_handshake("ok")
        log.debug("DICOM TLS from %s: %s, %s", _peer(client_address), tls.version(), tls.cipher())
        return tls


class CertificateAeMap:
    """Which calling AE titles each client-certificate identity may use."""

    def __init__(self, client_aes: Mapping[str, list[str]]) -> None:
        self._map = {name.lower(): frozenset(aes) for name, aes in client_aes.items()}

    def allowed(self, identities: set[str]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for name in identities:
            out |= self._map.get(name, frozenset())
        return out

    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: reject the request unless the certificate may use its calling AE."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        identities = certificate_identities(cert)
        if calling in self.allowed(identities):
            return
        log.warning(
            "association from %s rejected: calling AE %s is not allowed for client "
            "certificate %s (scp.tls.client_aes)",
            _peer(assoc.requestor.address_info.as_tuple),
            calling,
            ", ".join(sorted(identities)) or "(none)",
        )
        # What pynetdicom's own acceptor does for a calling AE it does not recognise.
        assoc.requestor.ae_title = calling
        assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
