"""The scp_gateway stage: a pynetdicom SCP whose C-STORE handler publishes to INGEST.

pynetdicom runs each association in a thread of its own; NATS lives on the asyncio
loop of the main thread. On stop, the listening socket closes first, associations in
progress get up to ``drain_seconds`` to finish, and only then is NATS drained, so no
instance is answered Success without having been published.

With ``scp.tls.enabled`` a DICOM TLS listener (``scp.tls.port``, 2762 by default) runs
beside the plain one, or alone when ``scp.tls.plain_listener`` is false; both serve the
same AE with the same handlers (see ``tlslistener`` for what TLS adds).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any

from dicomflow.scp_gateway import metrics as scp_metrics
from dicomflow.scp_gateway import pdata
from dicomflow.scp_gateway.contexts import TRANSFER_SYNTAXES, VERIFICATION, storage_sop_classes
from dicomflow.scp_gateway.receiver import Receiver
from dicomflow.scp_gateway.settings import ScpGatewaySettings, ScpSettings
from dicomflow.scp_gateway.spool import Spool
from dicomflow.scp_gateway.tlslistener import CertificateAeMap, TlsAssociationServer
from dicomflow.shared.dicom import dicomtls
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import natsconn, topology
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.patches import (
    REACTORS,
    SCP_PDATA,
    SCP_PDU_LIMIT,
    SCP_REUSE_PORT,
    SCP_TLS_SERVER,
    reactors,
)
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.metrics import Metrics
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

STAGE = "scp-gateway"
DRAIN_SECONDS = 30.0
ASSOCIATION_ENDS = (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)


def receive_to_files(settings: ScpGatewaySettings) -> Spool:
    """Have pynetdicom write each received dataset to a Part-10 file in the gateway's
    private spool as it arrives, instead of assembling it in memory (process-wide
    settings of pynetdicom and tempfile). Whatever a stopped gateway left in the spool
    was never answered Success, and is removed."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    scp = settings.scp
    spool = Spool.open(scp.spool_dir, settings.spool_dir, scp.max_dataset_bytes)
    spool.install()
    log.info("received datasets are spooled in %s", spool.path)
    return spool


def build_ae(scp: ScpSettings) -> AE:
    if not scp.allowed_calling_aes and not scp.accept_any_calling_ae:
        raise ConfigError(
            "scp.allowed_calling_aes is empty: list the calling AE titles allowed to send "
            "(e.g. DICOMFLOW_SCP__ALLOWED_CALLING_AES='[\"CT01\"]'), or set "
            "scp.accept_any_calling_ae = true to accept any sender"
        )
    ae = AE(ae_title=scp.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = [] if scp.accept_any_calling_ae else list(scp.allowed_calling_aes)
    ae.maximum_associations = scp.max_associations
    ae.acse_timeout = scp.acse_timeout
    ae.dimse_timeout = scp.dimse_timeout
    ae.network_timeout = scp.network_timeout
    ae.maximum_pdu_size = scp.maximum_pdu_size
    ae.add_supported_context(VERIFICATION)
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def build_tls(scp: ScpSettings) -> ssl.SSLContext | None:
    """The TLS listener's context, or None without one; bad TLS settings fail here, at start."""
    if not scp.tls.enabled:
        return None
    check_client_aes(scp)
    return dicomtls.server_context(scp.tls)


def check_client_aes(scp: ScpSettings) -> None:
    """A calling AE a certificate is mapped to must pass the allow-list too."""
    if scp.accept_any_calling_ae:
        return
    for identity, aes in scp.tls.client_aes.items():
        unknown = sorted(set(aes) - set(scp.allowed_calling_aes))
        if unknown:
            raise ConfigError(
                f"scp.tls.client_aes.{identity}: {', '.join(unknown)} not in "
                "scp.allowed_calling_aes, so the association would be rejected anyway"
            )


def _reuse_port(server: Any) -> None:
    """SO_REUSEPORT before the bind: several gateway processes listen on one port and the
    kernel spreads the connections among them (pynetdicom's ``server_bind`` sets
    SO_REUSEADDR only, and ignores socketserver's ``allow_reuse_port``)."""
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server, bound with SO_REUSEPORT (``scp.reuse_port``)."""

    def server_bind(self) -> None:
        _reuse_port(self)
        super().server_bind()


class ReusePortTlsServer(TlsAssociationServer):
    """The TLS listener, bound with SO_REUSEPORT."""

    def server_bind(self) -> None:
        _reuse_port(self)
        super().server_bind()


def start_servers(
    ae: AE,
    scp: ScpSettings,
    context: ssl.SSLContext | None,
    handlers: list[Any],
    metrics: Metrics,
) -> list[Any]:
    """The plain and/or the TLS association server, listening, in their own threads."""
    servers: list[Any] = []
    reuse_port = scp.reuse_port and SCP_REUSE_PORT.install()
    if context is None or scp.tls.plain_listener:
        if reuse_port:
            server = ae.make_server(
                (scp.host, scp.port), evt_handlers=handlers, server_class=ReusePortServer
            )
            servers.append(_listen(ae, server, "AcceptorServer"))
        else:
            servers.append(
                ae.start_server((scp.host, scp.port), block=False, evt_handlers=handlers)
            )
    if context is not None:
        scp_metrics.of(metrics).tls_at_zero(dicomtls.REFUSAL_KINDS)
        handshakes = scp_metrics.of(metrics).scp_tls_handshakes
        tls_handlers = list(handlers)
        if scp.tls.client_aes:
            tls_handlers.append(
                (evt.EVT_REQUESTED, CertificateAeMap(scp.tls.client_aes).on_requested)
            )
        if not SCP_TLS_SERVER.install():  # our server lives in pynetdicom's AE._servers
            servers.append(
                ae.start_server(
                    (scp.host, scp.tls.port),
                    block=False,
                    ssl_context=context,
                    evt_handlers=tls_handlers,
                )
            )
            return servers
        server = ae.make_server(
            (scp.host, scp.tls.port),
            ssl_context=context,
            evt_handlers=tls_handlers,
            server_class=ReusePortTlsServer if reuse_port else TlsAssociationServer,
            handshake_timeout=scp.tls.handshake_timeout,
            on_handshake=lambda outcome: handshakes.labels(outcome).inc(),
        )
        servers.append(_listen(ae, server, "DicomTlsAcceptor"))
    return servers


def _listen(ae: AE, server: Any, thread: str) -> Any:
    """What AE.start_server(block=False) does with a server of our own class: serve in a
    daemon thread, registered in AE._servers (where AssociationServer.shutdown removes
    it); only on the pynetdicom the fences named at the call verified."""
    threading.Thread(target=server.serve_forever, name=thread, daemon=True).start()
    ae._servers.append(server)
    return server


async def serve(settings: ScpGatewaySettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    ae = build_ae(settings.scp)
    tls_context = build_tls(settings.scp)
    spool = receive_to_files(settings)
    try:
        await _serve(settings, stop, telemetry, ae, tls_context, spool)
    finally:
        spool.close()


async def _serve(
    settings: ScpGatewaySettings,
    stop: asyncio.Event,
    telemetry: Telemetry,
    ae: AE,
    tls_context: ssl.SSLContext | None,
    spool: Spool,
) -> None:
    reactors.install(settings.scp.reactor_delay)
    SCP_PDU_LIMIT.install()  # applied to each connection by ConnectionLimits
    SCP_PDATA.install()  # applied to each plain connection by ConnectionLimits (pdata)
    nc = await natsconn.connect(settings.nats, STAGE, stop)
    telemetry.readiness.add_nats(nc)
    try:
        js = nc.jetstream()
        await topology.ensure(js, settings.nats)
        transport = Transport(
            nc,
            js,
            publish_timeout=settings.nats.publish_timeout,
            spool_dir=settings.spool_dir,
            purge_failed_puts=False,  # the gateway may not purge: the sweeper removes them
        )
        scp = settings.scp
        spool.keep_in_memory(transport.inline_limit)  # published from memory anyway
        receiver = Receiver(
            transport,
            asyncio.get_running_loop(),
            settings.nats.publish_timeout,
            telemetry,
            None if scp.accept_any_calling_ae else frozenset(scp.allowed_calling_aes),
            max_dataset_bytes=scp.max_dataset_bytes,
            received_of=spool.received,
        )
        handlers: list[Any] = [
            (
                evt.EVT_CONN_OPEN,
                ConnectionLimits(
                    scp.network_timeout, scp.maximum_pdu_size, scp.reactor_delay
                ).on_open,
            ),
            (evt.EVT_C_ECHO, receiver.on_echo),
            (evt.EVT_C_STORE, receiver.on_store),
            (evt.EVT_ACCEPTED, receiver.on_accepted),
            (evt.EVT_REJECTED, receiver.on_rejected),
            (evt.EVT_ABORTED, receiver.on_aborted),
            *((event, spool.on_association_end) for event in ASSOCIATION_ENDS),
        ]
        servers = start_servers(ae, scp, tls_context, handlers, telemetry.metrics)
        scp_metrics.of(telemetry.metrics).scp_associations_active.set_function(
            lambda: sum(len(server.active_associations) for server in servers)
        )
        telemetry.readiness.started()
        if scp.tls.enabled and scp.tls.plain_listener and scp.tls.client_aes:
            log.warning(
                "scp.tls.client_aes binds calling AEs to certificates on the TLS port only; "
                "the plain listener on port %d accepts the allowed AEs without one "
                "(set scp.tls.plain_listener = false to close it)",
                scp.port,
            )
        log.info(
            "scp-gateway ready: listening on %s as AE %s; calling AEs accepted: %s",
            " and ".join(_describe(server) for server in servers),
            settings.scp.ae_title,
            "any"
            if settings.scp.accept_any_calling_ae
            else ", ".join(settings.scp.allowed_calling_aes),
        )
        try:
            await stop.wait()
        finally:
            await asyncio.gather(*(asyncio.to_thread(_shutdown, server) for server in servers))
            log.info("scp-gateway closed; draining NATS")
    finally:
        await nc.drain()


PDU_MARGIN = 64 * 1024  # room for a PDU's own header fields around the advertised length
UNLIMITED_PDU_CAP = 64 * 1024**2


class ConnectionLimits:
    """Bounds every read of an accepted connection, in time and in size.

    pynetdicom reads the rest of a PDU with blocking ``recv`` calls and no timeout, and
    trusts the length in the PDU's header: a peer that stops inside a PDU (half a
    header, an HTTP request, an A-ASSOCIATE-RQ announcing 4 GiB) would hold its thread
    and a ``max_associations`` slot for good, past ARTIM and pynetdicom's own network
    timeout, and one that sends a huge PDU would have it gathered in memory. Here a read
    fails after ``scp.network_timeout`` without data, and a PDU longer than
    ``scp.maximum_pdu_size`` (plus a small margin) is refused before it is read; either
    way pynetdicom closes the connection. The size bound wraps pynetdicom's
    ``AssociationSocket.recv`` and the idle turn is its DUL's ``_run_loop_delay``: each
    only on the pynetdicom it was verified on (``SCP_PDU_LIMIT``, ``REACTORS``). A plain
    connection's C-STORE data phase is then taken by ``pdata`` (``SCP_PDATA``), within
    the same bounds.
    """

    def __init__(
        self, seconds: float, maximum_pdu_size: int, reactor_delay: float | None = None
    ) -> None:
        self._seconds = seconds
        self._reactor_delay = reactor_delay
        self._max_read = maximum_pdu_size + PDU_MARGIN if maximum_pdu_size else UNLIMITED_PDU_CAP

    def on_open(self, event: Any) -> None:
        if self._reactor_delay is not None and REACTORS.active:
            event.assoc.dul._run_loop_delay = self._reactor_delay
        assoc_socket = event.assoc.dul.socket
        sock = getattr(assoc_socket, "socket", None)
        if sock is None:
            return
        sock.settimeout(self._seconds)
        if not SCP_PDU_LIMIT.active:
            pdata.install(event.assoc, self._max_read)
            return
        read = assoc_socket.recv
        limit = self._max_read
        peer = event.address[0] if getattr(event, "address", None) else "?"

        def bounded(nr_bytes: int) -> bytearray:
            if nr_bytes > limit:
                log.warning(
                    "connection from %s closed: it announced a PDU of %d bytes, over the "
                    "%d accepted (scp.maximum_pdu_size)",
                    peer,
                    nr_bytes,
                    limit,
                )
                raise OSError("PDU longer than scp.maximum_pdu_size")
            data: bytearray = read(nr_bytes)
            return data

        assoc_socket.recv = bounded
        pdata.install(event.assoc, limit)  # reads below the bound above


def _describe(server: Any) -> str:
    host, port = server.server_address[:2]
    return f"{host}:{port}" + (" (DICOM TLS)" if server.ssl_context is not None else "")


def _shutdown(server: Any) -> None:
    """Stop listening, let established associations finish, abort what is left.

    A connection that never sent an A-ASSOCIATE-RQ (a port probe, a stalled peer) would
    otherwise hold the drain until its ARTIM timeout; an association aborted here has
    had no Success for anything unpublished, so the sender still holds those images.
    """
    server.shutdown()
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and any(
        assoc.is_established for assoc in server.active_associations
    ):
        time.sleep(0.1)
    for assoc in server.active_associations:
        assoc.abort()
