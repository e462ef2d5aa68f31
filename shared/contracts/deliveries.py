"""The contract of DELIVERY: a delivery request, one instance for one destination.

It carries the instance contract of ``shared.messages`` (sealed: key id and sealed size
included) and the destination's name, and either the object's storage key with no body
(the delivering side reads the object from storage), or, for an instance relayed before
storage (``Dicomflow-Relay: sealed``), the sealed bytes themselves as its body. Its
``Nats-Msg-Id`` is ``<destination>:<sop>:<sha256>``, so a request published twice
within the stream's duplicate window (a redelivered event, a repeated `dicomflow send`,
an instance both relayed and routed once stored) is queued once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import H_OBJECT_KEY, BodyKind, Instance
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats.errormap import nats_errors
from dicomflow.shared.storage.index import Record
from nats.js import JetStreamContext

H_DESTINATION = "Dicomflow-Destination"
H_RELAY = "Dicomflow-Relay"
RELAY_SEALED = "sealed"  # the body is the sealed object (A1 envelope)

DESTINATION_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    instance: Instance
    object_key: str  # empty when ``relayed``
    destination: str
    relayed: bool = False

    @property
    def msg_id(self) -> str:
        return f"{self.destination}:{self.instance.sop_instance_uid}:{self.instance.sha256}"

    def headers(self) -> dict[str, str]:
        out = self.instance.with_body(BodyKind.INLINE).headers()
        if self.relayed:
            out[H_RELAY] = RELAY_SEALED
        else:
            out[H_OBJECT_KEY] = self.object_key
        out[H_DESTINATION] = self.destination
        out[messages.H_MSG_ID] = self.msg_id
        return out

    def to(self, destination: str) -> DeliveryRequest:
        return DeliveryRequest(self.instance, self.object_key, destination, self.relayed)


def object_key_of(headers: dict[str, str] | None) -> str:
    value = (headers or {}).get(H_OBJECT_KEY, "")
    if not 0 < len(value) <= 1024 or not value.isprintable() or ".." in value.split("/"):
        raise ContractViolation(f"{H_OBJECT_KEY} is missing or malformed")
    return value


def parse(headers: dict[str, str] | None, *, destination: str | None = None) -> DeliveryRequest:
    """A delivery request from headers; ``destination`` overrides the header's (replay)."""
    instance = messages.parse(headers, sealed=True)
    h = headers or {}
    name = destination or h.get(H_DESTINATION, "")
    if not DESTINATION_NAME.fullmatch(name):
        raise ContractViolation(f"{H_DESTINATION} is missing or malformed")
    relay = h.get(H_RELAY)
    if relay is None:
        return DeliveryRequest(instance, object_key_of(headers), name)
    if relay != RELAY_SEALED:
        raise ContractViolation(f"{H_RELAY} must be {RELAY_SEALED!r}")
    if H_OBJECT_KEY in h:
        raise ContractViolation(f"a relayed request carries its body, not {H_OBJECT_KEY}")
    return DeliveryRequest(instance, "", name, relayed=True)


def check_body(req: DeliveryRequest, data: bytes) -> None:
    """A relayed request's body is the sealed object its headers describe; any other
    request has none. Raises ContractViolation."""
    if not req.relayed:
        if data:
            raise ContractViolation("a delivery request that names a stored object has no body")
        return
    if len(data) != req.instance.sealed_size:
        raise ContractViolation(
            f"the relayed body is {len(data)} bytes, but the request says "
            f"{req.instance.sealed_size}"
        )
    messages.check_envelope(req.instance, data)


def from_record(record: Record, destination: str) -> DeliveryRequest:
    """The request `dicomflow send` publishes for one indexed instance."""
    instance = Instance(
        sop_class_uid=record.sop_class_uid,
        sop_instance_uid=record.sop_instance_uid,
        study_uid=record.study_uid,
        series_uid=record.series_uid,
        calling_ae=record.calling_ae,
        called_ae=record.called_ae,
        transfer_syntax=record.transfer_syntax,
        size=record.size,
        sha256=record.sha256,
        modality=record.modality,
        key_id=record.key_id,
        sealed_size=record.sealed_size,
    )
    return DeliveryRequest(instance, record.object_key, destination)


async def publish(
    js: JetStreamContext,
    req: DeliveryRequest,
    publish_timeout: float,
    body: bytes = b"",
    *,
    site: str | None = None,
) -> None:
    """Queue ``req`` (with ``body``, the sealed object, if relayed) on its destination's
    subject (at ``site`` of the hybrid edge, if given); BrokerUnavailable unless
    acknowledged."""
    with nats_errors("could not queue a delivery request"):
        await js.publish(
            subjects.deliver_subject(req.destination, site),
            body,
            headers=req.headers(),
            timeout=publish_timeout,
        )
