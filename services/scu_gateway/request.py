"""A delivery request: one stored instance for one destination, as message headers.

It carries the instance contract of ``shared.messages`` (sealed: key id and sealed size
included), the object's storage key and the destination's name, and no body: the
delivering side reads the object from storage. Its ``Nats-Msg-Id`` is
``<destination>:<sop>:<sha256>``, so a request published twice within the stream's
duplicate window (a redelivered event, a repeated `dicomflow send`) is queued once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from dicomflow.shared import messages, subjects
from dicomflow.shared.errors import BrokerUnavailable, ContractViolation
from dicomflow.shared.index import Record
from dicomflow.shared.messages import H_OBJECT_KEY, BodyKind, Instance

H_DESTINATION = "Dicomflow-Destination"

DESTINATION_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    instance: Instance
    object_key: str
    destination: str

    @property
    def msg_id(self) -> str:
        return f"{self.destination}:{self.instance.sop_instance_uid}:{self.instance.sha256}"

    def headers(self) -> dict[str, str]:
        out = self.instance.with_body(BodyKind.INLINE).headers()
        out[H_OBJECT_KEY] = self.object_key
        out[H_DESTINATION] = self.destination
        out[messages.H_MSG_ID] = self.msg_id
        return out

    def to(self, destination: str) -> DeliveryRequest:
        return DeliveryRequest(self.instance, self.object_key, destination)


def object_key_of(headers: dict[str, str] | None) -> str:
    value = (headers or {}).get(H_OBJECT_KEY, "")
    if not 0 < len(value) <= 1024 or not value.isprintable() or ".." in value.split("/"):
        raise ContractViolation(f"{H_OBJECT_KEY} is missing or malformed")
    return value


def parse(headers: dict[str, str] | None, *, destination: str | None = None) -> DeliveryRequest:
    """A delivery request from headers; ``destination`` overrides the header's (replay)."""
    instance = messages.parse(headers, sealed=True)
    name = destination or (headers or {}).get(H_DESTINATION, "")
    if not DESTINATION_NAME.fullmatch(name):
        raise ContractViolation(f"{H_DESTINATION} is missing or malformed")
    return DeliveryRequest(instance, object_key_of(headers), name)


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


async def publish(js: JetStreamContext, req: DeliveryRequest, publish_timeout: float) -> None:
    """Queue ``req`` on its destination's subject; BrokerUnavailable unless acknowledged."""
    try:
        await js.publish(
            subjects.deliver_subject(req.destination),
            b"",
            headers=req.headers(),
            timeout=publish_timeout,
        )
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"could not queue a delivery request: {exc!r}") from exc
