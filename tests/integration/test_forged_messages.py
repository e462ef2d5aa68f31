"""Forged messages on the internal subjects are dead-lettered with a reason, never stored.

A process that can publish on ``dicomflow.ingest.>`` or ``dicomflow.sealed.>`` sends
messages the gateway or the encryptor never would: malformed headers, a body that does
not match them, a blob of another instance or outside the stage's prefix, a sealed
body that is no A1 envelope, a sealed message without the encryptor's signature, signed
by a key the store-writer does not trust, or whose body (inline or in the blob bucket)
was altered after it was signed. Each must end in the DLQ with a reason naming what is
off, while a genuine instance sent at the same time is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.crypto.envelope import OVERHEAD, seal
from dicomflow.shared.crypto.keyring import MasterKey, load_master_key
from dicomflow.shared.crypto.sealsign import SealSigner, load_signing_key
from dicomflow.shared.nats.transport import blob_name
from dicomflow.shared.stage.consumer import H_DLQ_REASON, H_DLQ_STAGE

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.natsusers import put_object
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration

H_CASE = "X-Forged-Case"
BODY = b"forged-body-0123456789"
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass(frozen=True)
class Forged:
    name: str
    sealed: bool
    headers: dict[str, str] | None
    data: bytes
    reason: str  # a part of the dead-letter reason
    blob: bool = False  # the body goes through the sealed blob bucket


def _instance(n: int, **changes: object) -> Instance:
    values: dict[str, object] = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.999.{n}",
        study_uid="1.2.826.0.1.3680043.8.498.999",
        series_uid="1.2.826.0.1.3680043.8.498.999.0",
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(BODY),
        sha256=SHA,
        modality="CT",
    )
    values.update(changes)
    return Instance(**values)  # type: ignore[arg-type]


def _with(instance: Instance, **headers: str) -> dict[str, str]:
    out = instance.headers()
    out.update({k.replace("_", "-"): v for k, v in headers.items()})
    return out


def _sign(signer: SealSigner, instance: Instance, body: bytes) -> Instance:
    sealed = instance.sealed(1, len(body), hashlib.sha256(body).hexdigest())
    return signer.sign(sealed)


def _flipped(body: bytes) -> bytes:
    altered = bytearray(body)
    altered[len(altered) // 2] ^= 0x01
    return bytes(altered)


def forged_messages(signer: SealSigner, key: MasterKey) -> list[Forged]:
    """``signer`` is the encryptor's: its signature gets a sealed message past the
    signature check, to the contract check each case is about."""
    i = _instance
    sealed_body = b"A1" + (1).to_bytes(4, "little") + bytes(len(BODY) + OVERHEAD - 6)
    sealed = _sign(signer, i(20), sealed_body)
    zeros = bytes(len(sealed_body))
    envelope = seal(key, BODY)
    big = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: above the inline limit
    big_instance = i(30, size=len(big), sha256=hashlib.sha256(big).hexdigest())
    big_envelope = seal(key, big)
    forger = SealSigner(Ed25519PrivateKey.generate())
    forged = _sign(forger, i(27), envelope)
    unsigned = _sign(signer, i(25), envelope).headers()
    del unsigned[messages.H_SIGNER], unsigned[messages.H_SIGNATURE]
    return [
        Forged("no-contract-headers", False, None, BODY, "Dicomflow-Schema"),
        Forged("schema", False, _with(i(1), Dicomflow_Schema="9"), BODY, "Dicomflow-Schema"),
        Forged(
            "sop-not-uid",
            False,
            _with(i(2), Dicomflow_Sop_Instance_Uid="1.2.evil"),
            BODY,
            "Dicomflow-Sop-Instance-Uid is missing or not a DICOM UID",
        ),
        Forged(
            "size-unicode-digit",
            False,
            _with(i(3), Dicomflow_Size="²"),
            BODY,
            "Dicomflow-Size is missing or not a decimal integer",
        ),
        Forged(
            "size-vs-body",
            False,
            _with(i(4), Dicomflow_Size="100"),
            BODY,
            "inline body is 22 bytes, but Dicomflow-Size says 100",
        ),
        Forged("sha-vs-body", False, _with(i(5), Dicomflow_Sha256="0" * 64), BODY, "Sha256"),
        Forged(
            "blob-missing",
            False,
            i(6).with_body(BodyKind.BLOB, blob_name("ingest", i(6))).headers(),
            b"",
            "does not exist",
        ),
        Forged(
            "blob-foreign",
            False,
            _with(
                i(7).with_body(BodyKind.BLOB, blob_name("ingest", i(6))),
            ),
            b"",
            "own blob",
        ),
        Forged(
            "blob-outside-prefix",
            False,
            _with(i(8).with_body(BodyKind.BLOB, "x"), Dicomflow_Blob="dicomflow-index.key"),
            b"",
            "own blob",
        ),
        Forged(
            "transfer-syntax",
            False,
            _with(i(9), Dicomflow_Transfer_Syntax="JPEG"),
            BODY,
            "Dicomflow-Transfer-Syntax",
        ),
        Forged("calling-ae", False, _with(i(10), Dicomflow_Calling_Ae="A\\B"), BODY, "Calling-Ae"),
        Forged("traceparent", False, _with(i(11), traceparent="00-x"), BODY, "traceparent"),
        Forged("sealed-not-a1", True, _sign(signer, i(21), zeros).headers(), zeros, "not an A1"),
        Forged(
            "sealed-key-id-differs",
            True,
            _with(sealed, Dicomflow_Key_Id="2"),
            sealed_body,
            "key id differs",
        ),
        Forged(
            "sealed-key-id-malformed",
            True,
            _with(sealed, Dicomflow_Key_Id="one"),
            sealed_body,
            "Dicomflow-Key-Id",
        ),
        Forged(
            "sealed-size-inconsistent",
            True,
            _with(sealed, Dicomflow_Sealed_Size=str(len(sealed_body) + 1)),
            sealed_body + b"\0",
            "A1 overhead",
        ),
        Forged(
            "sealed-blob-with-ingest-prefix",
            True,
            sealed.with_body(BodyKind.BLOB, blob_name("ingest", sealed)).headers(),
            b"",
            "own blob",
        ),
        Forged("sealed-unsigned", True, unsigned, envelope, "Dicomflow-Signer is missing"),
        Forged(
            "sealed-untrusted-signer",
            True,
            _sign(forger, i(26), envelope).headers(),
            envelope,
            f"SealNotTrusted: signature check failed: the message is signed by signing key "
            f"{forger.signer}, which is not among encryption.trusted_signing_keys",
        ),
        Forged(
            "sealed-forged-signature",  # a forger's signature, claiming the encryptor's key
            True,
            forged.signed(signer.signer, forged.signature).headers(),
            envelope,
            "SealNotTrusted: signature check failed: Dicomflow-Signature does not verify",
        ),
        Forged(
            "sealed-altered-inline",
            True,
            _sign(signer, i(28), envelope).headers(),
            _flipped(envelope),
            "SealNotTrusted: digest check failed",
        ),
        Forged(
            "sealed-altered-blob",
            True,
            _sign(signer, big_instance, big_envelope)
            .with_body(BodyKind.BLOB, blob_name("sealed", big_instance))
            .headers(),
            _flipped(big_envelope),
            "SealNotTrusted: digest check failed",
            blob=True,
        ),
    ]


async def _publish(url: str, forged: list[Forged]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for f in forged:
            headers = dict(f.headers or {})
            headers[H_CASE] = f.name
            headers[messages.H_MSG_ID] = f"forged-{f.name}"
            subject = (subjects.sealed_subject if f.sealed else subjects.ingest_subject)(
                "DICOMFLOW", "STORESCU"
            )
            data = f.data
            if f.blob:  # the body goes into the sealed blob bucket, as the encryptor's would
                name = headers[messages.H_BLOB]
                await put_object(nc, subjects.blob_bucket(name), name, data, f"forged{f.name}")
                data = b""
            await js.publish(subject, data, headers=headers, timeout=10)
    finally:
        await nc.close()


@pytest.fixture
def pipeline(tmp_path: Path, nats_server: NatsServer) -> Iterator[Pipeline]:
    p = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
    ).start()
    yield p
    p.stop()


def test_forged_messages_are_dead_lettered_and_a_genuine_one_is_stored(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    forged = forged_messages(
        load_signing_key(pipeline.signing_key, "encryption.signing_key"),
        load_master_key(1, pipeline.key),
    )
    (genuine,) = ct_series(tmp_path / "in", 1)
    asyncio.run(_publish(pipeline.nats.url, forged[: len(forged) // 2]))
    assert pipeline.send([genuine]).statuses() == ["Success"]
    asyncio.run(_publish(pipeline.nats.url, forged[len(forged) // 2 :]))

    deadline = time.monotonic() + 60
    while len(letters := pipeline.dead_letters()) < len(forged) and time.monotonic() < deadline:
        time.sleep(0.5)
    by_case = {h.get(H_CASE, ""): h for h in letters}
    wrong = {
        f.name: by_case.get(f.name, {}).get(H_DLQ_REASON, "not dead-lettered")
        for f in forged
        if f.reason not in by_case.get(f.name, {}).get(H_DLQ_REASON, "")
        or by_case[f.name][H_DLQ_STAGE] != ("store-writer" if f.sealed else "encryptor")
    }
    assert wrong == {}
    assert len(letters) == len(forged)

    stored = pipeline.wait_stored(1)
    pipeline.wait_drained()
    assert set(pipeline.records()) == set(stored) == {genuine.sop_instance_uid}
    objects = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1, objects
