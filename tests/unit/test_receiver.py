"""The gateway's reading of a dataset's identity, without a network."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from dicomflow.scp_gateway.admission import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    Rejected,
    digest,
    identify,
)
from dicomflow.scp_gateway.identity import INFLATE_LIMIT
from dicomflow.scp_gateway.service import ConnectionLimits
from pydicom.uid import CTImageStorage

from support.dicomfiles import dataset, transfer_syntax_set, write

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
    identity = identify(io.BytesIO(data), sop)
    assert identity.sop_instance_uid == sop
    assert identity.modality == "CT"


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 10, b"\x00" * 128 + b"DICM" + b"\xff" * 64, b"not dicom at all" * 9]
)
def test_garbage_cannot_be_understood(data: bytes) -> None:
    with pytest.raises(Rejected) as err:
        identify(io.BytesIO(data), "1.2.3")
    assert err.value.status in (CANNOT_UNDERSTAND, DOES_NOT_MATCH)


def test_truncated_dataset_is_refused() -> None:
    data, sop = _part10()
    with pytest.raises(Rejected):
        identify(io.BytesIO(data[:200]), sop)


@pytest.mark.parametrize(
    "changes",
    [{"StudyInstanceUID": None}, {"SeriesInstanceUID": "not-a-uid"}, {"SOPInstanceUID": "1.2.9"}],
)
def test_missing_or_inconsistent_identity_does_not_match(changes: dict[str, object]) -> None:
    data, sop = _part10(**changes)
    with pytest.raises(Rejected) as err:
        identify(io.BytesIO(data), sop)
    assert err.value.status == DOES_NOT_MATCH


def test_every_transfer_syntax_of_the_test_set_is_identified(tmp_path: Path) -> None:
    for made in transfer_syntax_set(tmp_path):
        with made.path.open("rb") as fp:
            identity = identify(fp, made.sop_instance_uid)
        assert identity.study_uid == made.study_uid
        assert identity.series_uid == made.series_uid
        assert identity.transfer_syntax == made.transfer_syntax


def test_deflated_dataset_is_inflated_only_up_to_the_limit(tmp_path: Path) -> None:
    # 48 MiB of pixel data deflates to almost nothing; reading the identity must not
    # inflate it all (pydicom's dcmread would, in memory).
    ds = dataset(CTImageStorage, modality="CT", rows=4096, columns=6144)
    ds.PixelData = bytes(len(ds.PixelData))
    plain = write(ds, tmp_path / "plain.dcm")
    deflated = tmp_path / "deflated.dcm"
    subprocess.run(["/usr/bin/dcmconv", "+td", str(plain), str(deflated)], check=True)
    assert deflated.stat().st_size < 1024 * 1024
    tracemalloc.start()
    try:
        with deflated.open("rb") as fp:
            identity = identify(fp, str(ds.SOPInstanceUID))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert identity.study_uid == ds.StudyInstanceUID
    assert peak < INFLATE_LIMIT * 2 < len(ds.PixelData)


def test_digest_in_memory_equals_the_chunked_file_digest(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # over one read chunk of the file path
    path = tmp_path / "body"
    path.write_bytes(data)
    with path.open("rb") as fp:
        from_file = digest(fp)
    buffer = io.BytesIO(data)
    buffer.seek(17)  # digest always starts from the beginning
    assert digest(buffer) == from_file == (len(data), hashlib.sha256(data).hexdigest())
    assert buffer.read() == b""  # left at the end, as the chunked path leaves a file


def test_reactor_delay_is_set_on_each_association() -> None:
    dul = SimpleNamespace(_run_loop_delay=0.001, socket=SimpleNamespace(socket=None))
    event = SimpleNamespace(assoc=SimpleNamespace(dul=dul))
    ConnectionLimits(60.0, 0, 0.0002).on_open(event)
    assert dul._run_loop_delay == 0.0002
    ConnectionLimits(60.0, 0).on_open(event)  # no delay given: pynetdicom's own stays
    assert dul._run_loop_delay == 0.0002
