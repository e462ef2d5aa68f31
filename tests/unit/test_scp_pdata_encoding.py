"""``scp_gateway.pdata`` encodes what pynetdicom encodes: the Part-10 head it writes before
a received data set, and the C-STORE-RSP command set."""

from __future__ import annotations

from io import BytesIO

import pytest
from dicomflow.scp_gateway import pdata
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("instance", ["1.2.3.45", "1.2.3.456", "1.2.826.0.1.3680043.8.498.1"])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_part10_head_is_pynetdicoms(instance: str, syntax: str) -> None:
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(sop_class_uid=CT, sop_instance_uid=instance, transfer_syntax=syntax)
    write_file_meta_info(expected, meta)
    assert pdata.part10_head(CT, instance, syntax) == expected.getvalue()


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC211])
@pytest.mark.parametrize("instance", ["1.2.3.45", "1.2.3.456"])
def test_response_command_is_pynetdicoms(status: int, instance: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdv,) = next(message.encode_msg(1, 16384)).presentation_data_value_list
    assert pdata.response_command(CT, 7, status, instance) == pdv[1][1:]
