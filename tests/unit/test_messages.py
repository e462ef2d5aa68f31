"""The header contract: what parses, and what is refused with ContractViolation."""

from __future__ import annotations

import pytest
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance, parse
from dicomflow.shared.crypto.envelope import OVERHEAD
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats.transport import blob_name

SHA = "ab" * 32


def _instance(**changes: object) -> Instance:
    values: dict[str, object] = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.5",
        calling_ae="CT 01",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1234,
        sha256=SHA,
        modality="CT",
    )
    values.update(changes)
    return Instance(**values)  # type: ignore[arg-type]


def test_round_trip_inline_and_sealed_blob() -> None:
    inst = _instance()
    assert parse(inst.headers()) == inst
    sealed = (
        inst.sealed(7, 1320, "cd" * 32)
        .signed("ef" * 8, "01" * 64)
        .with_body(BodyKind.BLOB, blob_name("sealed", inst))
    )
    assert parse(sealed.headers(), sealed=True, signed=True) == sealed
    assert (
        sealed.unsigned()
        .headers()
        .keys()
        .isdisjoint({"Dicomflow-Sealed-Sha256", "Dicomflow-Signer", "Dicomflow-Signature"})
    )


def test_message_id_is_identity_plus_digest() -> None:
    assert _instance().headers()["Nats-Msg-Id"] == f"1.2.3.4:{SHA}"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Dicomflow-Schema", "2"),
        ("Dicomflow-Sop-Instance-Uid", "../../etc/passwd"),
        ("Dicomflow-Study-Uid", ""),
        ("Dicomflow-Size", "-1"),
        ("Dicomflow-Size", "0"),
        ("Dicomflow-Size", "12a"),
        ("Dicomflow-Sha256", "XYZ"),
        ("Dicomflow-Body", "carrier-pigeon"),
        ("Dicomflow-Calling-Ae", "A" * 17),
        ("Dicomflow-Modality", "ct; rm -rf"),
    ],
)
def test_malformed_headers_are_contract_violations(header: str, value: str) -> None:
    headers = _instance().headers()
    headers[header] = value
    with pytest.raises(ContractViolation) as err:
        parse(headers)
    if header != "Dicomflow-Schema":  # a schema number is echoed; nothing else is
        assert value not in str(err.value) or value == ""


def test_missing_headers_and_blob_reference() -> None:
    with pytest.raises(ContractViolation):
        parse(None)
    headers = _instance().headers()
    headers["Dicomflow-Body"] = "blob"
    with pytest.raises(ContractViolation, match="Dicomflow-Blob"):
        parse(headers)


def test_sealed_messages_need_key_id_and_sealed_size() -> None:
    with pytest.raises(ContractViolation, match="Dicomflow-Key-Id"):
        parse(_instance().headers(), sealed=True)
    headers = _instance().sealed(1, 50, SHA).headers()  # smaller than the A1 overhead
    with pytest.raises(ContractViolation, match="Sealed-Size"):
        parse(headers, sealed=True, signed=True)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Dicomflow-Sealed-Sha256", None),
        ("Dicomflow-Sealed-Sha256", "AB" * 32),
        ("Dicomflow-Signer", None),
        ("Dicomflow-Signer", "ab" * 9),
        ("Dicomflow-Signature", None),
        ("Dicomflow-Signature", "zz" * 64),
        ("Dicomflow-Signature", "ab" * 63),
    ],
)
def test_sealed_messages_need_a_well_formed_digest_and_signature(
    header: str, value: str | None
) -> None:
    headers = _instance().sealed(1, 1234 + 86, SHA).signed("ef" * 8, "01" * 64).headers()
    if value is None:
        del headers[header]
    else:
        headers[header] = value
    with pytest.raises(ContractViolation, match=header):
        parse(headers, sealed=True, signed=True)


@pytest.mark.parametrize("ae", ["CT01", "CT 01", "A.B", "*>", "MR_3-T", "ÆØ", ""])
def test_ae_titles_become_one_valid_subject_token_and_back(ae: str) -> None:
    token = subjects.encode_token(ae)
    assert token and not any(c in token for c in " .*>\t")
    assert subjects.decode_token(token) == ae


def test_distinct_ae_titles_give_distinct_subjects() -> None:
    assert subjects.ingest_subject("A.B", "C") != subjects.ingest_subject("A", "B.C")


def test_each_stream_has_its_contract_in_one_table() -> None:
    """INGEST and SEALED messages are decoded by the table's contract; a stream with no
    instance contract (EVENTS, DELIVERY, DLQ) is not checked here."""
    assert set(messages.CONTRACTS) == {subjects.INGEST_STREAM, subjects.SEALED_STREAM}
    inst = _instance(size=3)
    assert messages.decode(subjects.INGEST_STREAM, inst.headers(), b"abc") == inst
    with pytest.raises(ContractViolation, match="the inline body is 2 bytes"):
        messages.decode(subjects.INGEST_STREAM, inst.headers(), b"ab")
    sealed = inst.sealed(7, 3 + OVERHEAD, "cd" * 32).signed("ef" * 8, "01" * 64)
    with pytest.raises(ContractViolation, match="not an A1 envelope"):
        messages.decode(subjects.SEALED_STREAM, sealed.headers(), b"x" * (3 + OVERHEAD))
    with pytest.raises(ContractViolation, match="Dicomflow-Key-Id is missing"):
        messages.decode(subjects.SEALED_STREAM, inst.headers(), b"abc")  # not sealed
    for stream in (subjects.EVENTS_STREAM, subjects.DELIVERY_STREAM, subjects.DLQ_STREAM):
        assert messages.decode(stream, inst.headers(), b"") is None
