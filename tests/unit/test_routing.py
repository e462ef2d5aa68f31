"""Routing rules, their validation, DIMSE status classes and delivery requests."""

from __future__ import annotations

from typing import Any

import pytest
from dicomflow.scu_gateway.routing import Router
from dicomflow.scu_gateway.service import delivery_consumer
from dicomflow.scu_gateway.settings import DestinationSettings, ScuGatewaySettings, ScuSettings
from dicomflow.scu_gateway.status import (
    DeliveryDeferred,
    DeliveryRefused,
    Outcome,
    classify,
    error_for,
)
from dicomflow.shared.contracts import deliveries, subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.errors import ConfigError, ContractViolation
from dicomflow.shared.settings import ConsumerSettings, load_settings
from dicomflow.shared.storage.index import Record, State

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def instance(**overrides: Any) -> Instance:
    values: dict[str, Any] = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": "1.2.3.4",
        "study_uid": "1.2.3",
        "series_uid": "1.2.3.1",
        "calling_ae": "CT01",
        "called_ae": "DICOMFLOW",
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "size": 1000,
        "sha256": "a" * 64,
        "modality": "CT",
        "key_id": 1,
        "sealed_size": 1086,
    }
    values.update(overrides)
    return Instance(**values)


def router(*rules: dict[str, Any]) -> Router:
    names = {d for rule in rules for d in rule["destinations"]}
    scu = ScuSettings(destinations={n: DEST for n in names}, rules=list(rules))  # type: ignore[arg-type]
    return Router.from_settings(scu)


def test_rules_fan_out_in_order_without_repeats() -> None:
    r = router(
        {"modality": "CT", "destinations": ["A", "B"]},
        {"calling_ae": "ct*", "destinations": ["B", "C"]},
        {"modality": "MR", "destinations": ["D"]},
    )
    assert r.destinations(instance()) == ["A", "B", "C"]
    assert r.destinations(instance(modality="MR", calling_ae="MR01")) == ["D"]
    assert r.destinations(instance(modality="US", calling_ae="US01")) == []


def test_every_pattern_of_a_rule_must_match() -> None:
    r = router(
        {
            "called_ae": "DICOM*",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.*",
            "study_uid": "1.2.3",
            "series_uid": "1.2.3.?",
            "destinations": ["A"],
        }
    )
    assert r.destinations(instance()) == ["A"]
    assert r.destinations(instance(series_uid="1.2.3.10")) == []
    assert r.destinations(instance(study_uid="1.2.30")) == []
    assert r.destinations(instance(called_ae="OTHER")) == []


def test_unknown_destination_names_the_rule(tmp_path: Any) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[scu.destinations.A]\nae_title = "PACS"\nhost = "h"\nport = 104\n'
        '[[scu.rules]]\ndestinations = ["A"]\n'
        '[[scu.rules]]\nmodality = "CT"\ndestinations = ["A", "NOPE"]\n'
    )
    with pytest.raises(ConfigError, match=r"rules\[1\]\.destinations: unknown destination 'NOPE'"):
        load_settings(ScuGatewaySettings, config)


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"study_uid": "1.2.abc", "destinations": ["A"]}, "scu.rules.0.study_uid"),
        ({"destinations": []}, "scu.rules.0.destinations"),
        ({"destinations": ["A"], "modality_": "CT"}, "scu.rules.0.modality_"),
    ],
)
def test_bad_rule_fields_are_named(tmp_path: Any, rule: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(ScuGatewaySettings, None, scu={"destinations": {"A": DEST}, "rules": [rule]})


def test_destination_names_and_syntaxes_are_checked() -> None:
    with pytest.raises(ValueError, match="destination name"):
        ScuSettings(destinations={"a.b": DestinationSettings(**DEST)})
    with pytest.raises(ValueError, match="not a transfer syntax UID"):
        DestinationSettings(**DEST, transfer_syntaxes=["explicit"])


def test_a_destination_at_a_site_is_queued_for_it_without_host_or_port() -> None:
    remote = DestinationSettings(ae_title="PACS", site="site-a")
    assert not remote.delivered_here
    assert subjects.deliver_subject("PACS", remote.site) == "dicomflow.deliver.site-a.PACS"
    assert subjects.deliver_subject("PACS") == "dicomflow.deliver.PACS"
    at_site = DestinationSettings(**DEST, site="site-a")  # the site's own scu-gateway
    assert at_site.delivered_here
    with pytest.raises(ValueError, match="host is required"):
        DestinationSettings(ae_title="PACS")
    with pytest.raises(ValueError, match="host is required"):
        DestinationSettings(ae_title="PACS", site="site-a", port=104)
    with pytest.raises(ValueError, match="port: 1 to 65535"):
        DestinationSettings(ae_title="PACS", host="pacs")
    with pytest.raises(ValueError, match="site name"):
        DestinationSettings(ae_title="PACS", site="Site A")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),
        (0xB006, Outcome.DELIVERED),
        (0xB007, Outcome.DELIVERED),
        (0x0001, Outcome.DELIVERED),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (0x0213, Outcome.TRANSIENT),
        (0xFE00, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xCFFF, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
        (0x0124, Outcome.PERMANENT),
        (0x0111, Outcome.PERMANENT),
    ],
)
def test_status_classes(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_errors_carry_the_status() -> None:
    assert error_for(0x0000, "A") is None
    deferred = error_for(0xA701, "A")
    assert isinstance(deferred, DeliveryDeferred) and deferred.status == 0xA701
    refused = error_for(0xC210, "A")
    assert isinstance(refused, DeliveryRefused) and refused.status == 0xC210
    assert "status 0xC210" in str(refused)


def test_request_round_trip_and_message_id() -> None:
    req = deliveries.DeliveryRequest(instance(), "dicom/x.dcm.enc", "PACS_1")
    headers = req.headers()
    assert headers["Nats-Msg-Id"] == f"PACS_1:1.2.3.4:{'a' * 64}"
    assert deliveries.parse(headers) == req
    moved = deliveries.parse(headers, destination="OTHER")
    assert moved.destination == "OTHER" and moved.msg_id.startswith("OTHER:")
    for key, bad in (
        (deliveries.H_OBJECT_KEY, "../../etc/passwd"),
        (deliveries.H_DESTINATION, "a.b"),
        ("Dicomflow-Key-Id", ""),
    ):
        with pytest.raises(ContractViolation):
            deliveries.parse({**headers, key: bad})


def test_relay_rules_route_before_storage_and_blobs_once_stored() -> None:
    r = router(
        {"modality": "CT", "destinations": ["CLOUD"]},
        {"modality": "CT", "destinations": ["ENTERPRISE", "CLOUD"], "relay": True},
        {"modality": "MR", "destinations": ["MRPACS"], "relay": True},
    )
    assert r.relays
    ct = instance()
    assert r.relay_destinations(ct) == ["ENTERPRISE", "CLOUD"]
    # Relayed before storage: once stored, only the plain rules still apply.
    assert r.destinations(ct, relayed=True) == ["CLOUD"]
    # Not relayed (its sealed body was a blob): the relay rules route it from storage.
    assert r.destinations(ct, relayed=False) == ["CLOUD", "ENTERPRISE"]
    assert r.relay_destinations(instance(modality="US")) == []
    assert not router({"destinations": ["A"]}).relays


def test_relayed_request_carries_its_body_not_an_object_key() -> None:
    req = deliveries.DeliveryRequest(instance(), "", "PACS_1", relayed=True)
    headers = req.headers()
    assert headers[deliveries.H_RELAY] == "sealed"
    assert deliveries.H_OBJECT_KEY not in headers
    assert headers["Nats-Msg-Id"] == f"PACS_1:1.2.3.4:{'a' * 64}"  # as if routed once stored
    assert deliveries.parse(headers) == req
    assert deliveries.parse(headers, destination="OTHER").relayed  # dlq replay --to keeps it
    with pytest.raises(ContractViolation, match="Dicomflow-Relay"):
        deliveries.parse({**headers, deliveries.H_RELAY: "plain"})
    with pytest.raises(ContractViolation, match="not Dicomflow-Object-Key"):
        deliveries.parse({**headers, deliveries.H_OBJECT_KEY: "dicom/x.dcm.enc"})
    stored = deliveries.DeliveryRequest(instance(), "dicom/x.dcm.enc", "PACS_1")
    with pytest.raises(ContractViolation, match="has no body"):
        deliveries.check_body(stored, b"sealed bytes")


def test_request_from_an_index_record() -> None:
    record = Record(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="CT01",
        called_ae="DICOMFLOW",
        object_key="k.dcm.enc",
        size=1000,
        sealed_size=1086,
        sha256="a" * 64,
        key_id=1,
        state=State.STORED,
    )
    req = deliveries.from_record(record, "A")
    assert deliveries.parse(req.headers()) == req
    assert req.instance == instance()


def test_delivery_consumer_settings() -> None:
    base = ConsumerSettings(max_deliver=10, backoff_max=60)
    plain = delivery_consumer(base, DestinationSettings(**DEST, max_associations=3))
    assert (plain.concurrency, plain.max_deliver, plain.backoff_max) == (12, 10, 60)  # 4 per assoc
    widest = delivery_consumer(base, DestinationSettings(**DEST, max_associations=64))
    assert widest.concurrency == 256  # ConsumerSettings' bound
    tuned = delivery_consumer(base, DestinationSettings(**DEST, max_deliver=50, backoff_max=300))
    assert (tuned.max_deliver, tuned.backoff_max) == (50, 300)


def test_dead_letter_record_carries_the_dicom_status() -> None:
    from dicomflow.scu_gateway.status import DeliveryRefused

    assert DeliveryRefused("refused", 0xA900).dead_letter_headers() == {
        "Dicomflow-Dlq-Status": "0xA900"
    }
    assert DeliveryRefused("association rejected").dead_letter_headers() == {}
