"""Least privilege of the generated NATS users, against a real nats-server running the
config `dicomflow nats-config` (and `up`) writes: what the permission table of
docs/security.md (NATS security) promises, each refusal of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import natsauth, topology
from dicomflow.shared.settings import NatsSettings
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError

from dicomflow.cli.natsconfig import Bundle
from dicomflow.embedded.natsserver import NatsServer
from support.natsusers import connected_as, put_object, secured_server, violation

pytestmark = pytest.mark.integration

REFUSAL_WAIT = 1.5
INDEX = f"KV_{subjects.INDEX_BUCKET}"
INGEST_BLOBS = subjects.blob_stream(subjects.INGEST_BLOB_BUCKET)
SEALED_BLOBS = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)
PLAIN = b"plaintext another modality sent, answered Success" * 1000

# The streams whose STREAM.INFO each service user gets (docs/security.md, NATS security).
STREAM_INFO = {
    "scp-gateway": {INGEST_BLOBS},
    "encryptor": {
        subjects.INGEST_STREAM,
        subjects.SEALED_STREAM,
        subjects.DLQ_STREAM,
        INGEST_BLOBS,
        SEALED_BLOBS,
        f"KV_{subjects.KEYS_BUCKET}",
    },
    "store-writer": {subjects.SEALED_STREAM, INDEX, SEALED_BLOBS},
    "scu-gateway": {
        subjects.EVENTS_STREAM,
        subjects.SEALED_STREAM,
        subjects.DELIVERY_STREAM,
        f"KV_{subjects.KEYS_BUCKET}",
    },
}
# The stages whose dead letters each service user may publish.
OWN_DEAD_LETTERS = {
    "scp-gateway": set(),
    "encryptor": {"encryptor"},
    "store-writer": {"store-writer"},
    "scu-gateway": {"scu-router", "scu-relay", subjects.deliver_durable("PACS")},
}
# A subject of each stream that must refuse `Nats-Rollup: all`, and the one service user
# allowed to publish there (the others are refused by their permissions already).
ROLLUP_TARGETS = {
    INDEX: (f"$KV.{subjects.INDEX_BUCKET}.1.2.3", "store-writer"),
    INGEST_BLOBS: (f"$O.{subjects.INGEST_BLOB_BUCKET}.M.bmFtZQ==", "scp-gateway"),
    SEALED_BLOBS: (f"$O.{subjects.SEALED_BLOB_BUCKET}.M.bmFtZQ==", "encryptor"),
}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, Bundle]]:
    with secured_server(tmp_path) as running:
        yield running


async def _refused(nc: Client, errors: list[str], subject: str, body: bytes = b"") -> None:
    """A request the server drops with a permissions violation (no answer comes)."""
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, body, timeout=REFUSAL_WAIT)
    await violation(errors, subject)


async def test_scp_gateway_puts_plaintext_blobs_but_cannot_read_or_purge_them(
    secured: tuple[NatsServer, Bundle],
) -> None:
    """Another instance's plaintext, answered Success, waits in the ingest bucket: the
    gateway may add blobs there, never read one back or empty the bucket."""
    server, bundle = secured
    bucket = subjects.INGEST_BLOB_BUCKET
    async with connected_as(server, bundle, "scp-gateway") as (nc, errors):
        await nc.jetstream().object_store(bucket)  # binding its bucket: allowed
        await put_object(nc, bucket, "ingest.1.2.3.other", PLAIN, "NUIDOTHER")
        chunks = f"$O.{bucket}.C.NUIDOTHER"
        for subject, body in (
            (f"$JS.API.STREAM.MSG.GET.{INGEST_BLOBS}", {"last_by_subj": chunks}),
            (f"$JS.API.DIRECT.GET.{INGEST_BLOBS}", {"next_by_subj": chunks, "seq": 1}),
            (f"$JS.API.DIRECT.GET.{INGEST_BLOBS}.{chunks}", {}),
            (f"$JS.API.STREAM.PURGE.{INGEST_BLOBS}", {}),
            (f"$JS.API.STREAM.PURGE.{INGEST_BLOBS}", {"filter": chunks}),
        ):
            await _refused(nc, errors, subject, json.dumps(body).encode())
        assert not any("permissions violation" in e.lower() and "$O." in e for e in errors)
    async with connected_as(server, bundle, "admin") as (nc, _):
        store = await nc.jetstream().object_store(bucket)
        assert (await store.get("ingest.1.2.3.other")).data == PLAIN


async def test_stream_info_only_of_the_streams_each_user_needs(
    secured: tuple[NatsServer, Bundle],
) -> None:
    """STREAM.INFO with a subject filter lists a stream's subjects, the index's being
    every SOP Instance UID: only the store writer (and admin) may ask it of the index.
    The topology check every stage runs at start needs none of it."""
    server, bundle = secured
    async with connected_as(server, bundle, "admin") as (nc, _):
        kv = await nc.jetstream().key_value(subjects.INDEX_BUCKET)
        await kv.create("1.2.840.99.1", b"{}")
    streams = topology.all_stream_names()
    for user in natsauth.SERVICE_USERS:
        async with connected_as(server, bundle, user) as (nc, errors):
            await topology.verify(nc.jetstream(timeout=REFUSAL_WAIT))
            assert errors == [], (user, errors)
            allowed = STREAM_INFO[user]
            body = json.dumps({"subjects_filter": ">"}).encode()
            for stream in allowed:
                answer = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", body)).data)
                assert answer["config"]["name"] == stream, (user, answer)
            await asyncio.gather(
                *(
                    _refused(nc, errors, f"$JS.API.STREAM.INFO.{stream}", body)
                    for stream in streams
                    if stream not in allowed
                )
            )
    assert all(stream in streams for allowed in STREAM_INFO.values() for stream in allowed)


async def test_each_stage_publishes_only_its_own_dead_letters(
    secured: tuple[NatsServer, Bundle],
) -> None:
    server, bundle = secured
    stages = {stage for own in OWN_DEAD_LETTERS.values() for stage in own}
    forged = [
        subjects.dlq_subject(s) for s in (*stages, "scp-gateway", "anything", "deliver-PACS.x")
    ]
    forged.append(f"{subjects.DLQ_PREFIX}.deliver-PACS")  # the old form of a delivery's
    for user in natsauth.SERVICE_USERS:
        async with connected_as(server, bundle, user) as (nc, errors):
            js = nc.jetstream()
            own = {subjects.dlq_subject(stage) for stage in OWN_DEAD_LETTERS[user]}
            for subject in own:
                ack = await js.publish(subject, b"letter", timeout=5)
                assert ack.stream == subjects.DLQ_STREAM
            for subject in sorted(set(forged) - own):
                await nc.publish(subject, b"forged")
                await violation(errors, f'Publish to "{subject}"')
    async with connected_as(server, bundle, "admin") as (nc, _):
        info = await nc.jetstream().stream_info(subjects.DLQ_STREAM, subjects_filter=">")
        wanted = {subjects.dlq_subject(s) for s in stages}
        assert set(info.state.subjects or {}) == wanted


async def test_no_service_user_can_roll_up_a_bucket(secured: tuple[NatsServer, Bundle]) -> None:
    """`Nats-Rollup: all` on any subject of a stream would erase all of it: refused by
    the stream itself to the one user allowed to publish there, by the permissions to
    every other."""
    server, bundle = secured
    async with connected_as(server, bundle, "admin") as (nc, _):
        js = nc.jetstream()
        await (await js.key_value(subjects.INDEX_BUCKET)).create("1.2.840.99.1", b"{}")
        for bucket in subjects.BLOB_BUCKETS:
            await put_object(nc, bucket, f"{bucket}.blob", PLAIN, "NUIDKEEP")
        before = {s: (await js.stream_info(s)).state.messages for s in ROLLUP_TARGETS}
    for user in natsauth.SERVICE_USERS:
        async with connected_as(server, bundle, user) as (nc, errors):
            js = nc.jetstream()
            for subject, writer in ROLLUP_TARGETS.values():
                if user == writer:
                    with pytest.raises(APIError, match="rollup"):
                        await js.publish(subject, b"", headers={"Nats-Rollup": "all"}, timeout=5)
                else:
                    await nc.publish(subject, b"", headers={"Nats-Rollup": "all"})
                    await violation(errors, f'Publish to "{subject}"')
    async with connected_as(server, bundle, "admin") as (nc, _):
        js = nc.jetstream()
        after = {s: (await js.stream_info(s)).state.messages for s in ROLLUP_TARGETS}
    assert after == before


async def test_topology_makes_buckets_of_an_earlier_version_refuse_rollups(
    nats_server: NatsServer,
) -> None:
    """Buckets made by an earlier `dicomflow topology` allowed rollups: the topology
    setup changes them in place, keeping what they hold, and the index still works."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=subjects.INDEX_BUCKET, history=5))
        revision = await kv.create("1.2.840.99.1", b"pending")
        for bucket in subjects.BLOB_BUCKETS:
            await js.create_object_store(bucket)
        await topology.ensure(js, NatsSettings(servers=[nats_server.url]), migrate=True)
        for stream in ROLLUP_TARGETS:
            assert not (await js.stream_info(stream)).config.allow_rollup_hdrs, stream
        kv = await js.key_value(subjects.INDEX_BUCKET)
        await kv.update("1.2.840.99.1", b"stored", last=revision)
        await kv.create("1.2.840.99.2", b"pending")
        await kv.delete("1.2.840.99.2")
        assert (await kv.get("1.2.840.99.1")).value == b"stored"
        with pytest.raises(APIError, match="rollup"):
            await js.publish(f"$KV.{subjects.INDEX_BUCKET}.x", b"", headers={"Nats-Rollup": "all"})
        assert (await kv.get("1.2.840.99.1")).value == b"stored"
    finally:
        await nc.close()
