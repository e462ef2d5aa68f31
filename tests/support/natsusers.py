"""A nats-server running the generated security config, and clients connected as its
users: what the NATS permission tests drive."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import nats
from dicomflow.shared.nats import natsconn
from dicomflow.shared.settings import NatsSettings, NatsTlsSettings
from nats.aio.client import Client

from dicomflow.cli import topology as topology_cmd
from dicomflow.cli.natsconfig import Bundle, write_bundle
from dicomflow.embedded.natsserver import NatsServer

VIOLATION_WAIT = 5.0
CHUNK = 256 * 1024


@contextmanager
def secured_server(root: Path) -> Iterator[tuple[NatsServer, Bundle]]:
    """A nats-server running the config `dicomflow nats-config` writes, topology set up
    by the admin user as `dicomflow topology` does."""
    bundle = Bundle(root / "nats-config")
    write_bundle(bundle, max_payload=1024 * 1024)
    with NatsServer(root / "js", config_file=bundle.server_config) as server:
        asyncio.run(topology_cmd.setup(settings_for(server, bundle, "admin")))
        yield server, bundle


def settings_for(server: NatsServer, bundle: Bundle, user: str, **tls: Any) -> NatsSettings:
    return NatsSettings(
        servers=[server.url],
        nkey_seed_file=bundle.seed(user),
        manage_topology=False,
        connect_timeout=3,
        tls=NatsTlsSettings(**tls),
    )


@asynccontextmanager
async def connected_as(
    server: NatsServer, bundle: Bundle, user: str
) -> AsyncIterator[tuple[Client, list[str]]]:
    """Connected as ``user`` through natsconn's options; yields the async errors seen."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        servers=[server.url],
        allow_reconnect=False,
        error_cb=on_error,
        **natsconn.security_options(settings_for(server, bundle, user)),
    )
    try:
        yield nc, errors
    finally:
        await nc.close()


async def violation(errors: list[str], subject: str) -> str:
    """Wait for the server's permissions violation naming ``subject`` (nats-py reports
    errors lower-cased)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + VIOLATION_WAIT
    while loop.time() < deadline:
        for error in errors:
            if "permissions violation" in error.lower() and subject.lower() in error.lower():
                return error
        await asyncio.sleep(0.05)
    raise AssertionError(f"no permissions violation for {subject}; errors seen: {errors}")


async def put_object(nc: Client, bucket: str, name: str, data: bytes, nuid: str) -> None:
    """Write an object the way a putter without read or purge rights does: its chunk,
    then its metadata, without a rollup header (the blob streams refuse those)."""
    js = nc.jetstream()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    for chunk in chunks:
        await js.publish(f"$O.{bucket}.C.{nuid}", chunk, timeout=5)
    meta = {
        "name": name,
        "bucket": bucket,
        "nuid": nuid,
        "size": len(data),
        "chunks": len(chunks),
        "digest": f"SHA-256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()}",
        "options": {"max_chunk_size": CHUNK},
    }
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    await js.publish(f"$O.{bucket}.M.{encoded}", json.dumps(meta).encode(), timeout=5)
