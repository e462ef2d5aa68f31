"""The NATS users of dicomflow, what each may do, and the nats-server config granting it.

One user per service, identified by an NKey (the server config holds only public keys;
each service holds its own seed). Permissions are allow-lists of exact subjects:

- ``scp-gateway`` publishes INGEST messages and writes plaintext blobs; it reads
  nothing from any stream.
- ``encryptor`` drains INGEST through its durable, reads and deletes plaintext blobs,
  publishes SEALED and writes sealed blobs; it sweeps orphaned blobs of both buckets,
  for which it reads message headers of INGEST, SEALED and the DLQ.
- ``store-writer`` drains SEALED through its durable, reads and deletes sealed blobs,
  writes the index and publishes ``dicom.stored`` events. It has no right on INGEST,
  the plaintext blob bucket or the DLQ (which holds dead-lettered plaintext).
- ``scu-gateway`` drains EVENTS (its router durable) and DELIVERY (one durable per
  destination), reads SEALED through its relay durable (sealed bytes only) and may
  delete that durable, publishes delivery requests.
- ``admin`` (the operator's commands and topology setup) may do everything.

Nobody but ``admin`` may create, update or delete a stream. Each user receives replies
(API answers and fetched messages alike) on its own inbox ``_INBOX.<public key>.>``, so
a user cannot subscribe to another's replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dicomflow.shared import subjects
from dicomflow.shared.natsconn import inbox_prefix

API = "$JS.API"
SERVICE_USERS = ("scp-gateway", "encryptor", "store-writer", "scu-gateway")
ADMIN = "admin"
USERS = (*SERVICE_USERS, ADMIN)
STAGES_WITH_DLQ = ("scp-gateway", "encryptor", "store-writer")


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
    common = (  # topology checks: stream configs and counts, and that SEALED has its
        # store writer's durable (an interest stream keeps nothing without it)
        f"{API}.STREAM.INFO.*",
        f"{API}.CONSUMER.INFO.{subjects.SEALED_STREAM}.{subjects.STORE_WRITER_DURABLE}",
    )
    if user == "scp-gateway":
        publish = (
            f"{subjects.INGEST_PREFIX}.>",
            *_blob_writer(subjects.INGEST_BLOB_BUCKET),
        )
        return Permissions(publish=(*common, *publish), subscribe=inbox)
    if user == "encryptor":
        publish = (
            *_drain_work_queue(subjects.INGEST_STREAM, subjects.ENCRYPTOR_DURABLE),
            f"{subjects.SEALED_PREFIX}.>",
            subjects.dlq_subject("encryptor"),
            *_blob_reader(subjects.INGEST_BLOB_BUCKET),
            *_blob_writer(subjects.INGEST_BLOB_BUCKET),  # deletes consumed blobs
            *_blob_writer(subjects.SEALED_BLOB_BUCKET),
            *_blob_lister(subjects.INGEST_BLOB_BUCKET),  # the orphan sweep
            *_blob_lister(subjects.SEALED_BLOB_BUCKET),
            *(
                f"{API}.STREAM.MSG.GET.{s}"
                for s in (subjects.INGEST_STREAM, subjects.SEALED_STREAM, subjects.DLQ_STREAM)
            ),
        )
        return Permissions(publish=(*common, *publish), subscribe=inbox)
    if user == "store-writer":
        index = f"KV_{subjects.INDEX_BUCKET}"
        publish = (
            *_consume(subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE),
            f"{subjects.STORED_PREFIX}.>",
            subjects.dlq_subject("store-writer"),
            *_blob_reader(subjects.SEALED_BLOB_BUCKET),
            *_blob_writer(subjects.SEALED_BLOB_BUCKET),  # deletes consumed blobs
            f"$KV.{subjects.INDEX_BUCKET}.>",
            f"{API}.STREAM.MSG.GET.{index}",
            f"{API}.DIRECT.GET.{index}",
            f"{API}.DIRECT.GET.{index}.>",
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
        f"{subjects.DLQ_PREFIX}.*",  # scu-router and deliver-<destination>
    )
    deny = tuple(subjects.dlq_subject(stage) for stage in STAGES_WITH_DLQ)
    return Permissions(publish=(*common, *publish), subscribe=inbox, publish_deny=deny)


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


def _blob_writer(bucket: str) -> tuple[str, ...]:
    """Put and delete objects (a put reads the object's metadata first)."""
    stream = subjects.blob_stream(bucket)
    return (
        f"$O.{bucket}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.STREAM.PURGE.{stream}",
    )


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
