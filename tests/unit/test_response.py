"""C-STORE responses decoded without pydicom: the same primitive pynetdicom builds, or
pynetdicom's own path for anything but a plain C-STORE-RSP."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest
from dicomflow.scu_gateway import response
from dicomflow.shared.telemetry import logs
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"  # odd length: padded


def rsp_pdata(context_id: int = 3, max_pdu: int = 16382, **values: Any) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom's own encoder makes of a C-STORE-RSP."""
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = values.pop("message_id", 7)
    prim.AffectedSOPClassUID = CT
    prim.AffectedSOPInstanceUID = UID
    prim.Status = values.pop("status", 0x0000)
    for keyword, value in values.items():
        setattr(prim, keyword, value)
    msg = C_STORE_RSP()
    msg.primitive_to_message(prim)
    return list(msg.encode_msg(context_id, max_pdu))


def pynetdicom_decoded(pdatas: list[P_DATA]) -> Any:
    msg = DIMSEMessage()
    done = [msg.decode_msg(p) for p in pdatas]
    assert done[-1]
    return msg.message_to_primitive()


def primitive_fields(prim: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(prim).items() if k != "_dataset_file"}


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007, 0xA700, 0xC210])
def test_plain_response_decodes_to_the_primitive_pynetdicom_builds(status: int) -> None:
    (pdata,) = rsp_pdata(status=status)
    found = response.decode(pdata.presentation_data_value_list)
    assert found is not None
    context_id, rsp = found
    expected = pynetdicom_decoded([pdata])
    assert context_id == 3
    assert type(rsp) is type(expected)
    assert primitive_fields(rsp) == primitive_fields(expected)
    assert rsp.Status == status
    assert rsp.AffectedSOPInstanceUID == UID
    assert rsp.is_valid_response


@pytest.mark.parametrize(
    "optional",
    [
        {"ErrorComment": "disk full"},
        {"OffendingElement": [0x00100010]},
    ],
    ids=["error comment", "offending element"],
)
def test_response_with_optional_elements_is_left_to_pynetdicom(optional: dict[str, Any]) -> None:
    pdatas = rsp_pdata(status=0xA700, **optional)
    assert response.decode(pdatas[0].presentation_data_value_list) is None


def test_fragmented_command_is_left_to_pynetdicom() -> None:
    pdatas = rsp_pdata(max_pdu=40)
    assert len(pdatas) > 1
    assert all(response.decode(p.presentation_data_value_list) is None for p in pdatas)


def test_other_messages_and_damaged_bytes_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.Status = 0
    msg = C_ECHO_RSP()
    msg.primitive_to_message(echo)
    (pdata,) = list(msg.encode_msg(1, 16382))
    assert response.decode(pdata.presentation_data_value_list) is None
    ((context_id, data),) = rsp_pdata()[0].presentation_data_value_list
    error_id = struct.pack("<HHIH", 0x0000, 0x0903, 2, 1)  # (0000,0903) Error ID, US
    for damaged in (
        data[:-3],
        data[:20],
        data[:1],
        b"\x02" + data[1:],
        data + b"\x00\x00",
        data + error_id,
    ):
        assert response.decode([(context_id, damaged)]) is None, damaged
    assert response.decode([(context_id, data), (context_id, data)]) is None


def requestor() -> Association:
    return Association(AE(), "requestor")


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No standard logging handlers, as the services run (``logs.setup``)."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")


def test_services_bind_no_standard_logging_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "standard")
    assert requestor().get_handlers(evt.EVT_DIMSE_RECV)  # pynetdicom's default
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    monkeypatch.setattr(pynetdicom_logger, "level", pynetdicom_logger.level)
    logs.setup("scu-gateway", "INFO")
    assert not requestor().get_handlers(evt.EVT_DIMSE_RECV)


def test_installed_provider_queues_the_fast_primitive(quiet: None) -> None:
    assoc = requestor()

    def pynetdicoms(primitive: Any) -> None:
        pytest.fail("a plain C-STORE-RSP went to pynetdicom's decoder")

    assoc.dimse.receive_primitive = pynetdicoms  # type: ignore[method-assign]
    response.install(assoc)
    (pdata,) = rsp_pdata(status=0xB000)
    assoc.dimse.receive_primitive(pdata)
    context_id, rsp = assoc.dimse.msg_queue.get_nowait()
    assert context_id == 3
    assert primitive_fields(rsp) == primitive_fields(pynetdicom_decoded([pdata]))


def test_installed_provider_hands_everything_else_to_pynetdicom(quiet: None) -> None:
    assoc = requestor()
    response.install(assoc)
    for pdata in rsp_pdata(status=0xA700, max_pdu=40, ErrorComment="disk full"):
        assoc.dimse.receive_primitive(pdata)
    _, rsp = assoc.dimse.msg_queue.get_nowait()
    assert rsp.ErrorComment == "disk full"
    assert rsp.Status == 0xA700


def test_a_bound_dimse_handler_still_sees_every_message() -> None:
    assoc = requestor()
    seen: list[Any] = []
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(event.message))
    response.install(assoc)
    (pdata,) = rsp_pdata()
    assoc.dimse.receive_primitive(pdata)
    assert len(seen) == 1
    _, rsp = assoc.dimse.msg_queue.get_nowait()
    assert rsp.Status == 0x0000


def test_a_provider_without_the_internals_is_left_alone() -> None:
    class Provider:
        def __init__(self) -> None:
            self.msg_queue: list[Any] = []

        def receive_primitive(self, primitive: Any) -> None:
            return None

    class Assoc:
        dimse = Provider()

    assoc = Assoc()
    before = assoc.dimse.receive_primitive
    response.install(assoc)  # no ``message`` attribute: another pynetdicom
    assert assoc.dimse.receive_primitive == before
