"""The message contract on arbitrary and forged input: a ContractViolation or a valid
Instance, nothing else; and each gap a forged message could use is closed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance, check_delivery, parse
from dicomflow.shared.crypto.envelope import OVERHEAD, seal
from dicomflow.shared.crypto.keyring import MasterKey
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats.transport import blob_name
from dicomflow.shared.stage.consumer import _declared_size
from hypothesis import given
from hypothesis import strategies as st

SHA = "0123456789abcdef" * 4
KEY = MasterKey(7, bytes(range(32)))
HEADER_NAMES = [
    messages.H_SCHEMA,
    messages.H_SOP_CLASS,
    messages.H_SOP_INSTANCE,
    messages.H_STUDY,
    messages.H_SERIES,
    messages.H_MODALITY,
    messages.H_CALLING_AE,
    messages.H_CALLED_AE,
    messages.H_TRANSFER_SYNTAX,
    messages.H_SIZE,
    messages.H_SHA256,
    messages.H_BODY,
    messages.H_BLOB,
    messages.H_KEY_ID,
    messages.H_SEALED_SIZE,
    messages.H_SEALED_SHA256,
    messages.H_SIGNER,
    messages.H_SIGNATURE,
    messages.H_TRACEPARENT,
]
TRICKY = [
    "",
    " ",
    "²",
    "\u0661",
    "1" * 5000,
    "-1",
    "+1",
    " 1",
    "1\n",
    "0x10",
    "1e3",
    "1.2.",
    ".1.2",
    "1..2",
    "1.2.3\x00",
    "A\\B",
    "\x1b[2J",
    "sealed.1.2.3." + SHA[:16],
    "ingest.1.2.3.4." + SHA[:16],
    "ingest.9.9.9." + SHA[:16],
    "../../etc/passwd",
    "inline",
    "blob",
    "1",
]


NUID = "A" * 22


def _other() -> Instance:
    return _instance(sop_instance_uid="1.2.3.9")


def _instance(**changes: Any) -> Instance:
    values: dict[str, Any] = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.5",
        calling_ae="CT 01",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256=SHA,
        modality="CT",
    )
    values.update(changes)
    return Instance(**values)


def _sealed(**changes: Any) -> Instance:
    # Well-formed signature headers: verifying them is the store-writer's (test_sealsign).
    return _instance(**changes).sealed(KEY.key_id, 10 + OVERHEAD, SHA).signed("ab" * 8, "cd" * 64)


header_values = st.one_of(st.sampled_from(TRICKY), st.text(max_size=80))


@st.composite
def mutated_headers(draw: st.DrawFn) -> dict[str, str]:
    base = draw(
        st.sampled_from(
            [
                _instance().headers(),
                _instance().with_body(BodyKind.BLOB, f"ingest.1.2.3.4.{SHA[:16]}").headers(),
                _sealed().headers(),
                _sealed().with_body(BodyKind.BLOB, f"sealed.1.2.3.4.{SHA[:16]}").headers(),
            ]
        )
    )
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(HEADER_NAMES))
        if draw(st.booleans()):
            base.pop(name, None)
        else:
            base[name] = draw(header_values)
    return base


def _parse_or_violation(headers: dict[str, str], sealed: bool) -> Instance | None:
    try:
        instance = parse(headers, sealed=sealed, signed=sealed)
    except ContractViolation as exc:
        assert str(exc)
        return None
    # Whatever parses is well-formed: its own headers parse back to the same instance.
    assert parse(instance.headers(), sealed=sealed, signed=sealed) == instance
    return instance


@given(st.dictionaries(st.sampled_from(HEADER_NAMES) | st.text(max_size=20), header_values))
def test_arbitrary_headers_parse_or_violate(headers: dict[str, str]) -> None:
    for sealed in (False, True):
        _parse_or_violation(headers, sealed)


@given(mutated_headers())
def test_mutated_headers_parse_or_violate(headers: dict[str, str]) -> None:
    for sealed in (False, True):
        _parse_or_violation(headers, sealed)


@given(
    st.sampled_from([subjects.INGEST_STREAM, subjects.SEALED_STREAM]),
    mutated_headers(),
    st.one_of(st.binary(max_size=200), st.just(seal(KEY, bytes(10)))),
)
def test_consumed_messages_pass_the_contract_or_violate(
    stream: str, headers: dict[str, str], data: bytes
) -> None:
    try:
        check_delivery(stream, headers, data)
    except ContractViolation:
        return
    assert parse(headers, sealed=stream == subjects.SEALED_STREAM)


# -- the gaps closed, each as a forged message would use it ------------------------------


def test_genuine_ingest_and_sealed_messages_pass() -> None:
    check_delivery(subjects.INGEST_STREAM, _instance().headers(), bytes(10))
    check_delivery(subjects.SEALED_STREAM, _sealed().headers(), seal(KEY, bytes(10)))
    blob = _instance().with_body(BodyKind.BLOB, blob_name("ingest", _instance()))
    check_delivery(subjects.INGEST_STREAM, blob.headers(), b"")


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        (messages.H_SIZE, "²", "Dicomflow-Size"),  # str.isdigit() passed, int() raised
        (messages.H_SIZE, "1" * 5000, "Dicomflow-Size"),  # int() refuses > 4300 digits
        (messages.H_SIZE, str(2**63), "out of range"),
        (messages.H_SOP_INSTANCE, "1.2.\u0661", "not a DICOM UID"),
        (messages.H_TRANSFER_SYNTAX, "JPEG", "Dicomflow-Transfer-Syntax"),
        (messages.H_CALLING_AE, "CT\\01", "Dicomflow-Calling-Ae"),
        (messages.H_CALLED_AE, "DICOMFLÖW", "Dicomflow-Called-Ae"),
        (messages.H_TRACEPARENT, "00-zz-not-a-trace", "traceparent"),
        (messages.H_BLOB, f"ingest.{_instance().ref}.{NUID}", "inline"),
    ],
)
def test_forged_header_values_are_violations(header: str, value: str, reason: str) -> None:
    headers = _instance().headers()
    headers[header] = value
    with pytest.raises(ContractViolation) as err:
        check_delivery(subjects.INGEST_STREAM, headers, bytes(10))
    assert reason in str(err.value)
    assert value not in str(err.value) or value in ("1" * 5000,)


def test_a_non_text_header_value_is_a_violation() -> None:
    headers: dict[str, Any] = _instance().headers()
    headers[messages.H_SIZE] = 10
    with pytest.raises(ContractViolation, match="not a text header"):
        parse(headers)


@pytest.mark.parametrize(
    ("stream", "blob"),
    [
        (subjects.INGEST_STREAM, f"sealed.{_instance().ref}.{NUID}"),  # the other prefix
        (subjects.INGEST_STREAM, f"ingest.{_other().ref}.{NUID}"),  # another instance's blob
        (subjects.INGEST_STREAM, f"ingest.{_instance(sha256='f' * 64).ref}.{NUID}"),  # digest
        (subjects.INGEST_STREAM, f"ingest.{_instance().ref}"),
        (subjects.INGEST_STREAM, f"ingest.{_instance().ref}.{NUID}.x"),
        (subjects.INGEST_STREAM, f"ingest.1.2.3.4.{SHA[:16]}"),  # the old, identifying form
        (subjects.INGEST_STREAM, f"index.{_instance().ref}.{NUID}"),
        (subjects.SEALED_STREAM, f"ingest.{_instance().ref}.{NUID}"),
        (subjects.SEALED_STREAM, f"sealed.{_instance().ref}.{NUID}.x"),
    ],
)
def test_a_blob_outside_the_prefix_or_of_another_instance_is_refused(
    stream: str, blob: str
) -> None:
    sealed = stream == subjects.SEALED_STREAM
    instance = (_sealed() if sealed else _instance()).with_body(BodyKind.BLOB, blob)
    with pytest.raises(ContractViolation, match="own blob"):
        check_delivery(stream, instance.headers(), b"")


def test_a_blob_body_with_a_payload_is_refused() -> None:
    instance = _instance().with_body(BodyKind.BLOB, blob_name("ingest", _instance()))
    with pytest.raises(ContractViolation, match="empty payload"):
        check_delivery(subjects.INGEST_STREAM, instance.headers(), b"x")


@pytest.mark.parametrize("length", [0, 9, 11])
def test_an_inline_body_of_another_size_is_refused(length: int) -> None:
    with pytest.raises(ContractViolation, match="Dicomflow-Size"):
        check_delivery(subjects.INGEST_STREAM, _instance().headers(), bytes(length))


def test_a_sealed_size_that_is_not_size_plus_overhead_is_refused() -> None:
    headers = _sealed().headers()
    headers[messages.H_SEALED_SIZE] = str(10 + OVERHEAD + 1)
    with pytest.raises(ContractViolation, match="A1 overhead"):
        check_delivery(subjects.SEALED_STREAM, headers, seal(KEY, bytes(11)))


def test_a_sealed_body_that_is_not_an_a1_envelope_is_refused() -> None:
    with pytest.raises(ContractViolation, match="not an A1 envelope"):
        check_delivery(subjects.SEALED_STREAM, _sealed().headers(), bytes(10 + OVERHEAD))


def test_a_sealed_body_under_another_key_id_than_its_header_is_refused() -> None:
    other = seal(MasterKey(8, bytes(32)), bytes(10))
    with pytest.raises(ContractViolation, match="key id"):
        check_delivery(subjects.SEALED_STREAM, _sealed().headers(), other)


@pytest.mark.parametrize("key_id", ["-1", str(2**32), "x", ""])
def test_a_malformed_key_id_is_refused(key_id: str) -> None:
    headers = _sealed().headers()
    headers[messages.H_KEY_ID] = key_id
    with pytest.raises(ContractViolation, match="Dicomflow-Key-Id"):
        check_delivery(subjects.SEALED_STREAM, headers, seal(KEY, bytes(10)))


def test_other_streams_are_left_to_their_handlers() -> None:
    check_delivery(subjects.DELIVERY_STREAM, {"anything": "goes"}, b"")


@pytest.mark.parametrize("raw", ["²", "1" * 5000, "12a", ""])
def test_the_consumer_sizes_a_forged_header_without_crashing(raw: str) -> None:
    # Before the fix int("²") raised ValueError in the worker, outside the handler's
    # try: the worker task died and the stage stopped consuming.
    msg = SimpleNamespace(headers={messages.H_SIZE: raw}, data=b"abc")
    assert _declared_size(msg) == 3  # type: ignore[arg-type]
