"""Connecting to NATS: retried at start-up, reconnecting for ever afterwards.

Security comes from ``NatsSettings``: TLS (TLS 1.2+, the server's chain and host name
always verified, a client certificate for mutual TLS) and an NKey identity, whose
public key also names this client's private reply inbox, so that one service user can
never subscribe to replies (fetched messages included) meant for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import nkeys
from dicomflow.shared.crypto.keyfiles import read_key_file
from dicomflow.shared.crypto.tlsfiles import load_ca, load_chain
from dicomflow.shared.errors import BrokerUnavailable, ConfigError
from dicomflow.shared.nats.errormap import nats_errors
from dicomflow.shared.patches import natsio
from dicomflow.shared.settings import NatsSettings
from nats.aio.client import Client

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 1.0
_MAKE_SEED = "make one per service with `dicomflow nats-config --out DIR`"


async def connect(settings: NatsSettings, name: str, stop: asyncio.Event | None = None) -> Client:
    """Connect, waiting for NATS to come up (until ``stop`` is set, if given)."""
    security = security_options(settings)
    delay = 0.5
    client: list[Client] = []

    async def on_disconnect() -> None:
        if client and (client[0].is_draining or client[0].is_closed):
            return  # our own drain or close, not an outage
        log.warning("disconnected from NATS; reconnecting")

    while True:
        try:
            with nats_errors("could not connect to NATS"):
                nc = await _connect(
                    servers=settings.servers,
                    name=f"dicomflow-{name}",
                    connect_timeout=settings.connect_timeout,
                    **security,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1.0,
                    error_cb=_on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=_on_reconnect,
                )
        except BrokerUnavailable as exc:
            if stop is not None and stop.is_set():
                raise
            log.warning("NATS not reachable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        else:
            client.append(nc)
            return nc


async def connect_once(settings: NatsSettings, name: str) -> Client:
    """Connect for a command-line tool: fail at once with an actionable message."""
    security = security_options(settings)
    with nats_errors(
        f"cannot connect to NATS at {', '.join(settings.servers)}",
        "is dicomflow (or `dicomflow up`) running, and do nats.tls and nats.nkey_seed_file "
        "match the server?",
    ):
        return await _connect(
            servers=settings.servers,
            name=f"dicomflow-{name}",
            connect_timeout=settings.connect_timeout,
            **security,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )


async def _connect(**options: Any) -> Client:
    """``nats.connect``, closing the half-open client when it fails (nats-py leaves the
    socket of a refused TLS handshake or authentication open otherwise)."""
    natsio.install()
    nc = Client()
    try:
        await nc.connect(**options)
    except BaseException:
        # Bounded: after a failed TLS handshake the close is done but its wait never ends.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
        raise
    return nc


def security_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments of ``Client.connect`` for TLS and the NKey identity.

    Raises ConfigError naming the setting when a certificate, key or seed is unusable.
    """
    options: dict[str, Any] = {}
    tls = settings.tls
    if tls.enabled or any(url.startswith("tls://") for url in settings.servers):
        options["tls"] = tls_context(settings)
        options["tls_handshake_first"] = tls.handshake_first
        if tls.server_name:
            options["tls_hostname"] = tls.server_name
    if settings.nkey_seed_file is not None:
        seed = _read_secret(settings.nkey_seed_file, "nats.nkey_seed_file")
        options["nkeys_seed_str"] = seed
        options["inbox_prefix"] = inbox_prefix(public_key(seed))
    return options


def tls_context(settings: NatsSettings) -> ssl.SSLContext:
    """A client context: TLS 1.2 or later, certificate chain and host name verified."""
    tls = settings.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        load_ca(context, "nats.tls.ca_file", tls.ca_file)
    if tls.cert_file is not None and tls.key_file is not None:
        load_chain(context, "nats.tls", tls.cert_file, tls.key_file)
    return context


def public_key(seed: str) -> str:
    """The public NKey (``U...``) of a user seed (``SU...``)."""
    try:
        pair = nkeys.from_seed(bytearray(seed.strip().encode()))
    except (nkeys.NkeysError, ValueError) as exc:
        raise ConfigError(f"nats.nkey_seed_file does not hold a valid NKey seed ({exc!r})") from exc
    public = str(pair.public_key.decode())
    pair.wipe()
    if not public.startswith("U"):
        raise ConfigError("nats.nkey_seed_file holds a seed that is not a user NKey (SU...)")
    return public


def inbox_prefix(public: str) -> str:
    """The private reply inbox of the user with public NKey ``public``."""
    return f"_INBOX.{public}"


def _read_secret(path: Path, setting: str) -> str:
    data = read_key_file(path, setting, _MAKE_SEED)  # refused when other users may read it
    try:
        text = data.decode().strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{setting} {path} is not text: an NKey seed (SU...) expected") from exc
    if not text:
        raise ConfigError(f"{setting} {path} is empty")
    return text


async def _on_error(exc: Exception) -> None:
    log.warning("NATS connection error: %r", exc)


async def _on_reconnect() -> None:
    log.info("reconnected to NATS")
