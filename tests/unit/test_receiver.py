"""The gateway's reading of a dataset's identity, without a network."""

from __future__ import annotations

import io

import pytest
from pydicom.uid import CTImageStorage

from dicomflow.scp_gateway.receiver import CANNOT_UNDERSTAND, DOES_NOT_MATCH, Rejected, identify
from support.dicomfiles import dataset

# pydicom warns (it does not raise) about malformed input; the suite turns warnings into
# errors, so these tests restore the production behaviour for pydicom's UserWarnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")


def _part10(**changes: object) -> tuple[bytes, str]:
    ds = dataset(CTImageStorage, modality="CT")
    for name, value in changes.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.file_meta.MediaStorageSOPInstanceUID)


def test_identity_is_read_without_pixel_data() -> None:
    data, sop = _part10()
    identity = identify(data, sop)
    assert identity.sop_instance_uid == sop
    assert identity.modality == "CT"


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 10, b"\x00" * 128 + b"DICM" + b"\xff" * 64, b"not dicom at all" * 9]
)
def test_garbage_cannot_be_understood(data: bytes) -> None:
    with pytest.raises(Rejected) as err:
        identify(data, "1.2.3")
    assert err.value.status in (CANNOT_UNDERSTAND, DOES_NOT_MATCH)


def test_truncated_dataset_is_refused() -> None:
    data, sop = _part10()
    with pytest.raises(Rejected):
        identify(data[:200], sop)


@pytest.mark.parametrize(
    "changes",
    [{"StudyInstanceUID": None}, {"SeriesInstanceUID": "not-a-uid"}, {"SOPInstanceUID": "1.2.9"}],
)
def test_missing_or_inconsistent_identity_does_not_match(changes: dict[str, object]) -> None:
    data, sop = _part10(**changes)
    with pytest.raises(Rejected) as err:
        identify(data, sop)
    assert err.value.status == DOES_NOT_MATCH
