"""The scp_gateway stage: a pynetdicom SCP whose C-STORE handler publishes to INGEST.

pynetdicom runs each association in a thread of its own; NATS lives on the asyncio
loop of the main thread. On stop, the listening socket closes first, associations in
progress get up to ``drain_seconds`` to finish, and only then is NATS drained, so no
instance is answered Success without having been published.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt

from dicomflow.scp_gateway.contexts import TRANSFER_SYNTAXES, VERIFICATION, storage_sop_classes
from dicomflow.scp_gateway.receiver import Receiver
from dicomflow.shared import natsconn, topology
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import ScpGatewaySettings, ScpSettings
from dicomflow.shared.telemetry import Telemetry
from dicomflow.shared.transport import Transport

log = logging.getLogger(__name__)

STAGE = "scp-gateway"
DRAIN_SECONDS = 30.0


def receive_to_files(spool_dir: Path | None) -> None:
    """Have pynetdicom write each received dataset to a Part-10 file as it arrives,
    instead of assembling it in memory (process-wide settings of pynetdicom and tempfile).
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    if spool_dir is not None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(spool_dir)
        # A dedicated spool folder holds only our files; before any association exists,
        # whatever is there was left by an association aborted mid-transfer (pynetdicom
        # does not delete those) or by a crash. None of it was ever answered Success.
        for leftover in spool_dir.glob("tmp*.dcm"):
            leftover.unlink(missing_ok=True)


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


async def serve(settings: ScpGatewaySettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    ae = build_ae(settings.scp)
    receive_to_files(settings.spool_dir)
    nc = await natsconn.connect(settings.nats, STAGE, stop)
    telemetry.readiness.add_nats(nc)
    try:
        js = nc.jetstream()
        await topology.ensure(js, settings.nats)
        transport = Transport(
            nc, js, publish_timeout=settings.nats.publish_timeout, spool_dir=settings.spool_dir
        )
        scp = settings.scp
        receiver = Receiver(
            transport,
            asyncio.get_running_loop(),
            settings.nats.publish_timeout,
            telemetry,
            None if scp.accept_any_calling_ae else frozenset(scp.allowed_calling_aes),
        )
        server = ae.start_server(
            (settings.scp.host, settings.scp.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_ECHO, receiver.on_echo),
                (evt.EVT_C_STORE, receiver.on_store),
                (evt.EVT_ACCEPTED, receiver.on_accepted),
                (evt.EVT_REJECTED, receiver.on_rejected),
                (evt.EVT_ABORTED, receiver.on_aborted),
            ],
        )
        if server is None:  # only a blocking server returns None
            raise RuntimeError("pynetdicom did not return the association server")
        telemetry.metrics.scp_associations_active.set_function(
            lambda: len(server.active_associations)
        )
        telemetry.readiness.started()
        host, port = server.server_address[:2]
        log.info(
            "scp-gateway ready: listening on %s:%d as AE %s; calling AEs accepted: %s",
            host,
            port,
            settings.scp.ae_title,
            "any"
            if settings.scp.accept_any_calling_ae
            else ", ".join(settings.scp.allowed_calling_aes),
        )
        try:
            await stop.wait()
        finally:
            await asyncio.to_thread(_shutdown, server)
            log.info("scp-gateway closed; draining NATS")
    finally:
        await nc.drain()


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
