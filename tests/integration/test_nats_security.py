"""NATS security against a real nats-server started with the generated configuration:
each service user is refused outside its permissions, and TLS verifies both ends."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.nats import natsconn, topology
from dicomflow.shared.settings import ConsumerSettings, NatsSettings
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.object_store import ObjectStore

from dicomflow.cli.natsconfig import Bundle, write_bundle
from dicomflow.cli.up import stage_credentials
from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.supervisor import StageProcess, stage_env
from support.dicomfiles import ct_series
from support.natsusers import connected_as, put_object, secured_server, settings_for, violation
from support.pipeline import Pipeline
from support.servers import free_port, wait_for, wait_for_port

STORESCP = "/usr/bin/storescp"  # DCMTK's

pytestmark = pytest.mark.integration

PLAIN = b"plaintext DICOM that only the gateway and the encryptor may see" * 20_000


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, Bundle]]:
    """A nats-server running the generated config, topology set up by the admin user."""
    with secured_server(tmp_path) as running:
        yield running


async def _put_plaintext(server: NatsServer, bundle: Bundle) -> str:
    """The gateway publishes a large body the way it does in service: blob + message."""
    async with connected_as(server, bundle, "scp-gateway") as (nc, errors):
        js = nc.jetstream()
        await put_object(nc, subjects.INGEST_BLOB_BUCKET, "ingest.1.2.3.abcd", PLAIN, "N1")
        ack = await js.publish(
            subjects.ingest_subject("DICOMFLOW", "CT01"), b"inline plaintext", timeout=5
        )
        assert ack.stream == subjects.INGEST_STREAM
        assert errors == []
    return "ingest.1.2.3.abcd"


async def test_store_writer_cannot_read_plaintext(secured: tuple[NatsServer, Bundle]) -> None:
    server, bundle = secured
    blob = await _put_plaintext(server, bundle)
    async with connected_as(server, bundle, "encryptor") as (nc, _):
        await topology.ensure_consumer(
            nc.jetstream(),
            subjects.INGEST_STREAM,
            subjects.ENCRYPTOR_DURABLE,
            _consumer_settings(),
        )
    async with connected_as(server, bundle, "store-writer") as (nc, errors):
        js = nc.jetstream()
        # Fetch from the encryptor's INGEST consumer.
        sub = await js.pull_subscribe_bind(subjects.ENCRYPTOR_DURABLE, subjects.INGEST_STREAM)
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await sub.fetch(1, timeout=1.5)
        await violation(errors, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.INGEST_STREAM}.encryptor")
        # Create its own consumer on INGEST.
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.add_consumer(
                subjects.INGEST_STREAM, ConsumerConfig(durable_name="peek"), timeout=1.5
            )
        await violation(errors, f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.INGEST_STREAM}.peek")
        # Read a message of INGEST directly, or the plaintext blob.
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.get_msg(subjects.INGEST_STREAM, 1)
        await violation(errors, f"$JS.API.STREAM.MSG.GET.{subjects.INGEST_STREAM}")
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.object_store(subjects.INGEST_BLOB_BUCKET)
        await violation(errors, f"$JS.API.STREAM.INFO.OBJ_{subjects.INGEST_BLOB_BUCKET}")
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await ObjectStore(
                name=subjects.INGEST_BLOB_BUCKET,
                stream=f"OBJ_{subjects.INGEST_BLOB_BUCKET}",
                js=js,
            ).get(blob)
        await violation(errors, f"$JS.API.STREAM.MSG.GET.OBJ_{subjects.INGEST_BLOB_BUCKET}")
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.get_msg(
                f"OBJ_{subjects.INGEST_BLOB_BUCKET}",
                1,
                subject=f"$O.{subjects.INGEST_BLOB_BUCKET}.C.>",
                next=True,
                direct=True,
            )
        await violation(errors, f"$JS.API.DIRECT.GET.OBJ_{subjects.INGEST_BLOB_BUCKET}")
        # Listen to ingest subjects, or to the encryptor's replies (its fetched messages).
        await nc.subscribe(f"{subjects.INGEST_PREFIX}.>")
        await violation(errors, f'Subscription to "{subjects.INGEST_PREFIX}.>"')
        await nc.subscribe("_INBOX.>")
        await violation(errors, 'Subscription to "_INBOX.>"')
        # What it needs still works: its own consumer on SEALED.
        await topology.ensure_consumer(
            js, subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE, _consumer_settings()
        )
    async with connected_as(server, bundle, "admin") as (nc, _):
        info = await nc.jetstream().stream_info(subjects.INGEST_STREAM)
        assert info.state.messages == 1  # untouched


async def test_gateway_cannot_read_sealed_or_manage_streams(
    secured: tuple[NatsServer, Bundle],
) -> None:
    server, bundle = secured
    async with connected_as(server, bundle, "scp-gateway") as (nc, errors):
        js = nc.jetstream()
        await nc.subscribe(f"{subjects.SEALED_PREFIX}.>")
        await violation(errors, f'Subscription to "{subjects.SEALED_PREFIX}.>"')
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.add_consumer(
                subjects.SEALED_STREAM, ConsumerConfig(durable_name="peek"), timeout=1.5
            )
        await violation(errors, f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.SEALED_STREAM}")
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.add_stream(StreamConfig(name="ROGUE", subjects=["rogue.>"]))
        await violation(errors, "$JS.API.STREAM.CREATE.ROGUE")
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.delete_stream(subjects.INGEST_STREAM)
        await violation(errors, f"$JS.API.STREAM.DELETE.{subjects.INGEST_STREAM}")
        # Publishing outside its ingest subjects is refused too.
        await nc.publish(subjects.sealed_subject("DICOMFLOW", "CT01"), b"forged")
        await violation(errors, f'Publish to "{subjects.SEALED_PREFIX}.')
    async with connected_as(server, bundle, "admin") as (nc, _):
        js = nc.jetstream()
        names = {s.config.name for s in await js.streams_info()}
        assert "ROGUE" not in names
        assert subjects.INGEST_STREAM in names
        assert (await js.stream_info(subjects.SEALED_STREAM)).state.messages == 0


async def test_service_users_only_verify_the_topology(tmp_path: Path) -> None:
    """Before the admin set it up, a service user is told to run `dicomflow topology`."""
    bundle = Bundle(tmp_path / "nats-config")
    write_bundle(bundle)
    with NatsServer(tmp_path / "js", config_file=bundle.server_config) as server:
        nc = await natsconn.connect_once(settings_for(server, bundle, "encryptor"), "test")
        try:
            with pytest.raises(topology.TopologyMissing, match="dicomflow topology"):
                await topology.ensure(nc.jetstream(), settings_for(server, bundle, "encryptor"))
        finally:
            await nc.close()


async def test_unauthenticated_client_is_refused(secured: tuple[NatsServer, Bundle]) -> None:
    server, _ = secured
    with pytest.raises(BrokerUnavailable):
        await natsconn.connect_once(NatsSettings(servers=[server.url], connect_timeout=3), "x")


@pytest.fixture
def tls_servers(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer, Bundle, Bundle]]:
    """One server with TLS (server verified), one with mutual TLS."""
    one_way, mutual = Bundle(tmp_path / "tls"), Bundle(tmp_path / "mtls")
    write_bundle(one_way, tls=True, hosts=["localhost", "127.0.0.1"])
    write_bundle(mutual, mtls=True, hosts=["localhost", "127.0.0.1"])
    with (
        NatsServer(tmp_path / "js1", config_file=one_way.server_config) as a,
        NatsServer(tmp_path / "js2", config_file=mutual.server_config) as b,
    ):
        yield a, b, one_way, mutual


async def _connects(settings: NatsSettings) -> None:
    nc = await natsconn.connect_once(settings, "tls-test")
    try:
        await nc.flush(timeout=3)
        assert nc.is_connected
    finally:
        await nc.close()


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


async def test_tls_verifies_the_server(
    tls_servers: tuple[NatsServer, NatsServer, Bundle, Bundle],
) -> None:
    server, _, bundle, _ = tls_servers
    # Without our CA (the system's trust store only): verification fails.
    with pytest.raises(BrokerUnavailable) as refused:
        await _connects(settings_for(server, bundle, "admin", enabled=True))
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _cause_chain(refused.value))
    # A name the certificate does not carry: refused too.
    with pytest.raises(BrokerUnavailable) as misnamed:
        await _connects(
            settings_for(
                server, bundle, "admin", enabled=True, ca_file=bundle.ca, server_name="nats.other"
            )
        )
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _cause_chain(misnamed.value))
    # With it: connected (and a plaintext client is refused by handshake-first TLS).
    await _connects(settings_for(server, bundle, "admin", enabled=True, ca_file=bundle.ca))
    with pytest.raises(BrokerUnavailable):
        await _connects(settings_for(server, bundle, "admin"))


async def test_mutual_tls_requires_a_client_certificate(
    tls_servers: tuple[NatsServer, NatsServer, Bundle, Bundle],
) -> None:
    _, server, _, bundle = tls_servers
    with pytest.raises(BrokerUnavailable):
        await _connects(settings_for(server, bundle, "encryptor", enabled=True, ca_file=bundle.ca))
    await _connects(
        settings_for(
            server,
            bundle,
            "encryptor",
            enabled=True,
            ca_file=bundle.ca,
            cert_file=bundle.cert("encryptor"),
            key_file=bundle.key("encryptor"),
        )
    )


def _consumer_settings() -> ConsumerSettings:
    return ConsumerSettings()


def test_every_stage_runs_as_its_own_user_from_modality_to_peer(
    tmp_path: Path, secured: tuple[NatsServer, Bundle]
) -> None:
    """The whole chain, scu-gateway included, on the generated permissions: storescu →
    gateway → encryptor → store-writer → router → delivery → a DCMTK storescp.
    A permission missing from any stage's allow-list stops the instance on its way."""
    server, bundle = secured
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    peer_port = free_port()
    peer = subprocess.Popen(
        [STORESCP, "-aet", "PEER", "-od", str(peer_dir), str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    pipeline = Pipeline(
        tmp_path / "p",
        server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        scu={
            "ae_title": "DICOMFLOW",
            "destinations": {"peer": {"ae_title": "PEER", "host": "127.0.0.1", "port": peer_port}},
            "rules": [{"destinations": ["peer"]}],
        },
        # The config's identity is the admin's (for `dicomflow ls`); each stage gets its own.
        extra={"nats": {"nkey_seed_file": str(bundle.seed("admin"))}},
    )
    base = stage_env(pipeline.config)
    for name in pipeline.names:
        pipeline.stages[name] = StageProcess(
            name,
            pipeline.config,
            pipeline.root / "logs",
            {**base, **stage_credentials(bundle, name, tls=False)},
        )
    files = ct_series(tmp_path / "in", 3)
    try:
        wait_for_port(peer_port)
        pipeline.start()
        result = pipeline.send(files)
        assert result.statuses() == ["Success"] * len(files), result.output
        stored = pipeline.wait_stored(len(files))
        assert set(stored) == {f.sop_instance_uid for f in files}
        arrived = wait_for(
            "the peer to receive every instance",
            lambda: len([p for p in peer_dir.iterdir() if p.is_file()]) >= len(files) or None,
            timeout=60,
        )
        assert arrived
        for name in pipeline.names:
            assert "Permissions Violation" not in pipeline.logs(name), pipeline.logs(name)[-2000:]
    finally:
        pipeline.stop()
        peer.terminate()
        peer.wait(timeout=10)
