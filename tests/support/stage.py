"""Messages and instances for tests of a stage's handler and of the consumer loop,
without a process: a received message is a real ``nats.aio.msg.Msg`` whose JetStream
metadata (delivery count, stream sequence) comes from its reply subject."""

from __future__ import annotations

import hashlib
import time

from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import Instance
from nats.aio.msg import Msg

STREAM = "TEST"


def received(
    headers: dict[str, str] | None,
    data: bytes = b"",
    *,
    subject: str = "test.1",
    delivered: int = 1,
    seq: int = 1,
    stream: str = STREAM,
) -> Msg:
    """A message as a pull consumer receives it, on its ``delivered``-th delivery."""
    reply = f"$JS.ACK.{stream}.durable.{delivered}.{seq}.{seq}.{time.time_ns()}.0"
    return Msg(_client=None, subject=subject, reply=reply, data=data, headers=headers)  # type: ignore[arg-type]


def instance(plain: bytes, uid: str = "1.2.826.0.1.3680043.8.498.1") -> Instance:
    """An instance of ``plain`` as the gateway describes it."""
    return Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_uid="1.2.826.0.1.3680043.8.498.2",
        series_uid="1.2.826.0.1.3680043.8.498.3",
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(plain),
        sha256=hashlib.sha256(plain).hexdigest(),
        modality="CT",
    )


def ingest_message(inst: Instance, data: bytes, delivered: int = 1) -> Msg:
    return received(
        inst.headers(),
        data,
        subject=subjects.ingest_subject(inst.called_ae, inst.calling_ae),
        delivered=delivered,
        stream=subjects.INGEST_STREAM,
    )


def sealed_message(inst: Instance, data: bytes, delivered: int = 1) -> Msg:
    return received(
        inst.headers(),
        data,
        subject=subjects.sealed_subject(inst.called_ae, inst.calling_ae),
        delivered=delivered,
        stream=subjects.SEALED_STREAM,
    )
