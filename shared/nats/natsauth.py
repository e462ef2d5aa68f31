"""The NATS users of dicomflow, what each may do, and the nats-server config granting it.

One user per service, identified by an NKey (the server config holds only public keys;
each service holds its own seed). Permissions are allow-lists of exact subjects:

- ``scp-gateway`` publishes INGEST messages and puts plaintext blobs; it reads
  nothing from any stream and cannot purge the blob bucket (a failed put's chunks are
  left to the encryptor's orphan sweep).
- ``encryptor`` drains INGEST through its durable, reads and deletes plaintext blobs,
  publishes SEALED and puts sealed blobs; it sweeps orphaned blobs of both buckets,
  for which it reads message headers of INGEST, SEALED and the DLQ.
- ``store-writer`` drains SEALED through its durable, reads and deletes sealed blobs,
  writes the index and publishes ``dicom.stored`` events. It has no right on INGEST,
  the plaintext blob bucket or the DLQ (which holds dead-lettered plaintext).
- ``scu-gateway`` drains EVENTS (its router durable) and DELIVERY (one durable per
  destination), reads SEALED through its relay durable (sealed bytes only) and may
  delete that durable, publishes delivery requests.
- ``admin`` (the operator's commands and topology setup) may do everything.

Each stage publishes dead letters on its own subject(s) only. ``STREAM.INFO`` (which,
with a subject filter, lists a stream's subjects: for the index, every SOP Instance
UID) is granted per stream, to the users that bind or consume it; the topology check at
start needs only ``STREAM.NAMES``. The users holding master keys (encryptor,
scu-gateway) read and record key check values (``shared.keycheck``).

Nobody but ``admin`` may create, update or delete a stream. Each user receives replies
(API answers and fetched messages alike) on its own inbox ``_INBOX.<public key>.>``, so
a user cannot subscribe to another's replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats.natsconn import inbox_prefix

API = "$JS.API"
SERVICE_USERS = ("scp-gateway", "encryptor", "store-writer", "scu-gateway")
ADMIN = "admin"
USERS = (*SERVICE_USERS, ADMIN)


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = field(default=())


def permissions(user: str, public_key: str) -> Permissions:
    """What ``user`` (with NKey ``public_key``) may publish and subscribe to."""
    if user == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    if user not in SERVICE_USERS:
        raise ValueError(f"unknown NATS user {user!r}; known: {', '.join(USERS)}")
    inbox = (f"{inbox_prefix(public_key)}.>",)
    common = (  # topology.verify: which streams exist (names only), and that SEALED has
        # its store writer's durable (an interest stream keeps nothing without it)
        f"{API}.STREAM.NAMES",
        f"{API}.CONSUMER.INFO.{subjects.SEALED_STREAM}.{subjects.STORE_WRITER_DURABLE}",
    )
    ingest_blobs = subjects.INGEST_BLOB_BUCKET
    sealed_blobs = subjects.SEALED_BLOB_BUCKET
    if user == "scp-gateway":
        publish = (
            f"{subjects.INGEST_PREFIX}.>",
            *_blob_putter(ingest_blobs),
            _info(subjects.blob_stream(ingest_blobs)),  # binding the bucket
        )
        return Permissions(publish=(*common, *publish), subscribe=inbox)
    if user == "encryptor":
        publish = (
            *_drain_work_queue(subjects.INGEST_STREAM, subjects.ENCRYPTOR_DURABLE),
            f"{subjects.SEALED_PREFIX}.>",
            subjects.dlq_subject("encryptor"),
            *_blob_reader(ingest_blobs),
            *_blob_deleter(ingest_blobs),  # consumed blobs, and the orphan sweep
            *_blob_putter(sealed_blobs),
            *_blob_deleter(sealed_blobs),  # a failed seal, and the orphan sweep
            *_blob_lister(ingest_blobs),  # the orphan sweep
            *_blob_lister(sealed_blobs),
            f"{API}.STREAM.MSG.GET.{subjects.blob_stream(sealed_blobs)}",  # sweep: blob ages
            *(  # the sweep's references (message headers), and its stream positions
                f"{API}.STREAM.MSG.GET.{s}"
                for s in (subjects.INGEST_STREAM, subjects.SEALED_STREAM, subjects.DLQ_STREAM)
            ),
            *map(
                _info,
                (
                    subjects.INGEST_STREAM,
                    subjects.SEALED_STREAM,
                    subjects.DLQ_STREAM,
                    subjects.blob_stream(ingest_blobs),
                    subjects.blob_stream(sealed_blobs),
                ),
            ),
            *_key_checker(),
        )
        return Permissions(publish=(*common, *publish), subscribe=inbox)
    if user == "store-writer":
        index = f"KV_{subjects.INDEX_BUCKET}"
        publish = (
            *_consume(subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE),
            f"{subjects.STORED_PREFIX}.>",
            subjects.dlq_subject("store-writer"),
            *_blob_reader(sealed_blobs),
            *_blob_deleter(sealed_blobs),  # consumed blobs
            f"$KV.{subjects.INDEX_BUCKET}.>",
            f"{API}.STREAM.MSG.GET.{index}",
            f"{API}.DIRECT.GET.{index}",
            f"{API}.DIRECT.GET.{index}.>",
            # INFO of the index lists every key (every SOP Instance UID) with a subject
            # filter: the store writer owns the index; no other service user gets it.
            *map(_info, (subjects.SEALED_STREAM, index, subjects.blob_stream(sealed_blobs))),
        )
        return Permissions(publish=(*common, *publish), subscribe=inbox)
    # scu-gateway: its delivery durables are named after configured destinations.
    publish = (
        *_consume(subjects.EVENTS_STREAM, subjects.ROUTER_DURABLE),
        # relay rules: read SEALED before storage; remove the relay consumer once no
        # rule relays (its interest would otherwise hold SEALED's messages)
        *_consume(subjects.SEALED_STREAM, subjects.RELAY_DURABLE),
        f"{API}.CONSUMER.DELETE.{subjects.SEALED_STREAM}.{subjects.RELAY_DURABLE}",
        *_drain_work_queue(subjects.DELIVERY_STREAM, "*"),
        f"{subjects.DELIVER_PREFIX}.>",
        # its own stages' dead letters only: the router, the relay, each destination
        subjects.dlq_subject(subjects.ROUTER_DURABLE),
        subjects.dlq_subject(subjects.RELAY_DURABLE),
        f"{subjects.DLQ_DELIVER_PREFIX}.*",
        *map(_info, (subjects.EVENTS_STREAM, subjects.SEALED_STREAM, subjects.DELIVERY_STREAM)),
        *_key_checker(),
    )
    return Permissions(publish=(*common, *publish), subscribe=inbox)


def _info(stream: str) -> str:
    """A stream's config and state. Binding a bucket (``js.key_value``,
    ``js.object_store``) and a consumer's leftover check read it; with a subject filter
    it also lists the stream's subjects, so it is granted per stream, never ``*``."""
    return f"{API}.STREAM.INFO.{stream}"


def _consume(stream: str, durable: str) -> tuple[str, ...]:
    """Create/update, inspect, fetch from and acknowledge one durable pull consumer."""
    return (
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"{API}.CONSUMER.INFO.{stream}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    )


def _drain_work_queue(stream: str, durable: str) -> tuple[str, ...]:
    """``_consume``, plus purging what is below the ack floor of the consumer's own work
    queue (acked messages a crashed server brought back; see ``shared.consumer``). An ack
    removes a work-queue message anyway, so this grants no power to drop unacked work
    beyond what acking already gives."""
    return (*_consume(stream, durable), f"{API}.STREAM.PURGE.{stream}")


def _blob_putter(bucket: str) -> tuple[str, ...]:
    """Put objects: publish chunks, then the metadata. Nothing else: no read (MSG.GET,
    DIRECT.GET) and no purge (JetStream takes a purge's subject filter from the request
    body, so a purge right is a right to empty the whole bucket). The stream refuses
    ``Nats-Rollup`` headers (``topology``), so a metadata publish cannot wipe it either.
    A put that fails leaves its chunks to the encryptor's orphan sweep."""
    return (f"$O.{bucket}.C.>", f"$O.{bucket}.M.>")


def _blob_deleter(bucket: str) -> tuple[str, ...]:
    """Delete objects: purge the chunk and metadata subjects (any subject of the stream:
    see ``_blob_putter``)."""
    return (f"{API}.STREAM.PURGE.{subjects.blob_stream(bucket)}",)


def _blob_reader(bucket: str) -> tuple[str, ...]:
    """Read objects: metadata by message get, chunks by direct get."""
    stream = subjects.blob_stream(bucket)
    return (
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
    )


def _blob_lister(bucket: str) -> tuple[str, ...]:
    """List objects: an ephemeral ordered consumer of the metadata subjects."""
    stream = subjects.blob_stream(bucket)
    return (
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def _key_checker() -> tuple[str, ...]:
    """Read and record master-key check values (``shared.keycheck``): the users that
    hold master keys. The bucket keeps one value per key id and refuses a second."""
    stream = f"KV_{subjects.KEYS_BUCKET}"
    return (
        f"$KV.{subjects.KEYS_BUCKET}.*",
        _info(stream),
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
    )


def authorization_block(public_keys: dict[str, str]) -> str:
    """The nats-server ``authorization`` block for ``{user: public NKey}``."""
    entries = []
    for user in USERS:
        key = public_keys[user]
        perms = permissions(user, key)
        publish: dict[str, list[str]] = {"allow": _unique(perms.publish)}
        if perms.publish_deny:
            publish["deny"] = list(perms.publish_deny)
        rendered = {"publish": publish, "subscribe": {"allow": _unique(perms.subscribe)}}
        entries.append(
            f"    # {user}\n    {{nkey: {json.dumps(key)}, permissions: {json.dumps(rendered)}}}"
        )
    return "authorization {\n  users: [\n" + "\n".join(entries) + "\n  ]\n}\n"


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    ca_file: str
    verify_clients: bool


def server_config(
    public_keys: dict[str, str],
    *,
    max_payload: int | None = None,
    tls: ServerTls | None = None,
    sync_interval: str | None = None,
) -> str:
    """A nats-server config: JetStream, the users above, TLS (verified) when given.

    ``sync_interval`` (``"always"``: fsync before every acknowledgement) is JetStream's
    flush interval; without it the server's default (two minutes) applies. Listen
    address, port and store directory are left to the command line (embedded) or the
    Helm chart (Kubernetes).
    """
    parts = ["# Generated by `dicomflow nats-config`: users and permissions of dicomflow.\n"]
    if max_payload is not None:
        parts.append(f"max_payload: {max_payload}\n")
    if sync_interval is None:
        parts.append("jetstream: enabled\n")
    else:
        parts.append(f"jetstream {{\n  sync_interval: {sync_interval}\n}}\n")
    if tls is not None:
        parts.append(tls_block(tls))
    parts.append(authorization_block(public_keys))
    return "".join(parts)


def tls_block(tls: ServerTls) -> str:
    lines = [
        "tls {",
        f"  cert_file: {json.dumps(tls.cert_file)}",
        f"  key_file: {json.dumps(tls.key_file)}",
        f"  ca_file: {json.dumps(tls.ca_file)}",
        f"  verify: {'true' if tls.verify_clients else 'false'}",
        "  handshake_first: true",
        "  timeout: 5",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _unique(items: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(items))
