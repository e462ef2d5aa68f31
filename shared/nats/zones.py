"""The parts of a dicomflow topology, and the names the hybrid edge adds.

``single`` is one JetStream holding every stream (``dicomflow up``, one cluster). In the
hybrid topology the streams are split between three NATS accounts:

- ``edge-local``: the hospital's plaintext side (LOCAL account of the edge's leaf
  nats-server): INGEST, the plaintext blob bucket and the DLQ. Never bound to the link.
- ``edge-sealed``: the hospital's sealed side (EDGE account, bound to the leafnode link):
  SEALED and the sealed blob bucket, each with the uplink durable ``uplink-<site>``
  through which the cloud sources them; DELIVERY, which sources the site's delivery
  requests from the cloud's DELIVERY through the cloud's durable ``downlink-<site>``.
- ``cloud``: the hub (HOSP account of the cloud's nats-server): SEALED and the sealed blob
  bucket (sourced from every site), EVENTS, DELIVERY, the store-writer's DLQ and the
  index. No plaintext stream or bucket exists there.

A site is named by its JetStream domain; the cloud's domain is ``cloud``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum

from dicomflow.shared.contracts import subjects
from dicomflow.shared.errors import ConfigError

CLOUD_DOMAIN = "cloud"
UPLINK_PREFIX = "dicomflow-uplink"  # deliver subjects of the uplink durables: <prefix>.<site>.*
DOWNLINK_PREFIX = "dicomflow-downlink"  # the downlink durable's: <prefix>.<site>.delivery
# Both uplinked streams, and the token of each in its deliver subject.
UPLINKED = {
    subjects.SEALED_STREAM: "sealed",
    subjects.blob_stream(subjects.SEALED_BLOB_BUCKET): "blobs",
}
_SITE = re.compile(r"[a-z][a-z0-9-]{0,30}[a-z0-9]")
_RESERVED = {CLOUD_DOMAIN, "hub", "local", "edge", "sys"}


class Zone(StrEnum):
    SINGLE = "single"
    EDGE_LOCAL = "edge-local"
    EDGE_SEALED = "edge-sealed"
    CLOUD = "cloud"


def check_site(name: str) -> str:
    """A site name: its JetStream domain and a token of subjects and consumer names."""
    if not _SITE.fullmatch(name) or name in _RESERVED:
        raise ConfigError(
            f"site name {name!r}: 2 to 32 characters of a-z 0-9 and '-', starting with a "
            f"letter, not ending with '-', and none of {', '.join(sorted(_RESERVED))}"
        )
    return name


def uplink_durable(site: str) -> str:
    """The durable on each uplinked stream of ``site`` through which the cloud sources it."""
    return f"uplink-{site}"


def uplink_deliver_subject(site: str, stream: str) -> str:
    return f"{UPLINK_PREFIX}.{site}.{UPLINKED[stream]}"


def downlink_durable(site: str) -> str:
    """The durable on the cloud's DELIVERY through which ``site``'s DELIVERY sources the
    requests addressed to it (``dicomflow.deliver.<site>.>``)."""
    return f"downlink-{site}"


def downlink_deliver_subject(site: str) -> str:
    return f"{DOWNLINK_PREFIX}.{site}.delivery"


def downlink_filter(site: str) -> str:
    """Every delivery request addressed to a destination at ``site``."""
    return f"{subjects.DELIVER_PREFIX}.{site}.>"


def site_api(site: str) -> str:
    """The JetStream API prefix of ``site``'s domain, as seen from the cloud."""
    return f"$JS.{site}.API"


def streams(zone: Zone) -> Sequence[str]:
    """The streams (buckets' streams included) that exist in ``zone``'s account."""
    ingest_blobs = subjects.blob_stream(subjects.INGEST_BLOB_BUCKET)
    sealed_blobs = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)
    index = f"KV_{subjects.INDEX_BUCKET}"
    keys = f"KV_{subjects.KEYS_BUCKET}"  # key check values: where the master keys are
    if zone is Zone.EDGE_LOCAL:
        return (subjects.INGEST_STREAM, subjects.DLQ_STREAM, ingest_blobs, keys)
    if zone is Zone.EDGE_SEALED:
        return (subjects.SEALED_STREAM, sealed_blobs, subjects.DELIVERY_STREAM)
    if zone is Zone.CLOUD:
        return (
            subjects.SEALED_STREAM,
            subjects.EVENTS_STREAM,
            subjects.DELIVERY_STREAM,
            subjects.DLQ_STREAM,
            index,
            sealed_blobs,
        )
    return (
        subjects.INGEST_STREAM,
        subjects.SEALED_STREAM,
        subjects.EVENTS_STREAM,
        subjects.DELIVERY_STREAM,
        subjects.DLQ_STREAM,
        index,
        keys,
        ingest_blobs,
        sealed_blobs,
    )
