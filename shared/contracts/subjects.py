"""Every stream, subject, consumer and bucket name of dicomflow, in one place.

AE titles become subject tokens. They may hold spaces, dots, ``*`` and ``>``, which
NATS subjects cannot carry, so each byte outside ``[A-Za-z0-9_-]`` is written as
``%XX`` (upper-case hex). The mapping is reversible and injective.
"""

from __future__ import annotations

import re

INGEST_STREAM = "DICOMFLOW_INGEST"
SEALED_STREAM = "DICOMFLOW_SEALED"
EVENTS_STREAM = "DICOMFLOW_EVENTS"
DLQ_STREAM = "DICOMFLOW_DLQ"
DELIVERY_STREAM = "DICOMFLOW_DELIVERY"

INGEST_PREFIX = "dicomflow.ingest"
SEALED_PREFIX = "dicomflow.sealed"
STORED_PREFIX = "dicom.stored"
DLQ_PREFIX = "dicomflow.dlq"
DELIVER_PREFIX = "dicomflow.deliver"
DLQ_DELIVER_PREFIX = f"{DLQ_PREFIX}.deliver"
DELIVER_STAGE_PREFIX = "deliver-"

ENCRYPTOR_DURABLE = "encryptor"
STORE_WRITER_DURABLE = "store-writer"
ROUTER_DURABLE = "scu-router"
RELAY_DURABLE = "scu-relay"  # on SEALED, only while relay rules are configured

INDEX_BUCKET = "dicomflow-index"
# Key check values of the master keys, by key id: written once, never replaced.
KEYS_BUCKET = "dicomflow-keys"
# Plaintext and sealed bodies live in separate object-store buckets: chunk subjects
# ($O.<bucket>.C.<nuid>) do not carry the object's name, so only a bucket boundary lets
# NATS permissions keep the store writer away from plaintext.
INGEST_BLOB_BUCKET = "dicomflow-ingest-blobs"
SEALED_BLOB_BUCKET = "dicomflow-sealed-blobs"
BLOB_BUCKETS = (INGEST_BLOB_BUCKET, SEALED_BLOB_BUCKET)
_BLOB_PREFIXES = {"ingest": INGEST_BLOB_BUCKET, "sealed": SEALED_BLOB_BUCKET}

_SAFE = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def encode_token(value: str) -> str:
    """Encode an AE title (or any text) as one subject token."""
    if not value:
        return "%"
    return "".join(
        ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value
    )


def decode_token(token: str) -> str:
    if token == "%":  # noqa: S105 (a subject token, not a password)
        return ""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), token).encode("latin-1").decode()


def ingest_subject(called_ae: str, calling_ae: str) -> str:
    return f"{INGEST_PREFIX}.{encode_token(called_ae)}.{encode_token(calling_ae)}"


def sealed_subject(called_ae: str, calling_ae: str) -> str:
    return f"{SEALED_PREFIX}.{encode_token(called_ae)}.{encode_token(calling_ae)}"


def stored_subject(called_ae: str, calling_ae: str) -> str:
    return f"{STORED_PREFIX}.{encode_token(called_ae)}.{encode_token(calling_ae)}"


def dlq_subject(stage: str) -> str:
    """Where ``stage`` dead-letters. A destination's delivery stage (``deliver-<dest>``)
    has a token level of its own, ``dicomflow.dlq.deliver.<dest>``: NATS wildcards match
    whole tokens only, so this is what lets a permission name every delivery stage's
    dead letters (``dicomflow.dlq.deliver.*``) and nothing else."""
    destination = stage.removeprefix(DELIVER_STAGE_PREFIX)
    if destination != stage:
        return f"{DLQ_DELIVER_PREFIX}.{destination}"
    return f"{DLQ_PREFIX}.{stage}"


def deliver_subject(destination: str, site: str | None = None) -> str:
    """Where delivery requests for one scu_gateway destination wait. A destination at a
    site of the hybrid edge (``site``) has a token level of its own,
    ``dicomflow.deliver.<site>.<destination>``: the cloud's ``downlink-<site>`` durable
    filters ``dicomflow.deliver.<site>.>``, which matches no destination of the cloud
    (one token fewer) nor of another site."""
    if site is None:
        return f"{DELIVER_PREFIX}.{encode_token(destination)}"
    return f"{DELIVER_PREFIX}.{site}.{encode_token(destination)}"


def deliver_durable(destination: str) -> str:
    """The durable consumer that delivers to one destination (names are token-safe)."""
    return f"{DELIVER_STAGE_PREFIX}{encode_token(destination)}"


def blob_bucket(blob_name: str) -> str:
    """The bucket of a blob, from its name's prefix (``ingest.`` or ``sealed.``)."""
    bucket = _BLOB_PREFIXES.get(blob_name.split(".", 1)[0])
    if bucket is None:
        raise ValueError(f"blob name {blob_name!r} has neither the ingest. nor the sealed. prefix")
    return bucket


def blob_stream(bucket: str) -> str:
    """The JetStream stream behind an object-store bucket."""
    return f"OBJ_{bucket}"


def blob_chunks(bucket: str) -> str:
    """The subjects of a bucket's chunks."""
    return f"$O.{bucket}.C.>"
