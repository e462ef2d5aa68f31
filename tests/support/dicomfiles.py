"""Makes DICOM Part-10 files for tests: several SOP classes and transfer syntaxes.

Compressed syntaxes are produced by real encoders: DCMTK's dcmcjpeg (JPEG baseline and
lossless), dcmcrle (RLE) and dcmconv (deflate), and Pillow's OpenJPEG (JPEG 2000).
"""

from __future__ import annotations

import io
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)


@dataclass(frozen=True)
class Made:
    path: Path
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str


def dataset(
    sop_class: UID,
    *,
    modality: str,
    rows: int = 64,
    columns: int = 64,
    bits: int = 16,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    ds = Dataset()
    sop = sop_instance_uid or generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.InstanceNumber = seed + 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if bits == 8 else np.uint16
    high = 255 if bits == 8 else 4095
    # Smooth content compresses like an image; a little noise keeps every file distinct.
    y, x = np.mgrid[0:rows, 0:columns]
    base = ((x * 7 + y * 3 + seed * 11) % (high + 1)).astype(np.int64)
    noise = rng.integers(0, 4, size=(rows, columns))
    pixels = np.clip(base + noise, 0, high).astype(dtype)
    ds.PixelData = pixels.tobytes()
    return ds


def write(ds: Dataset, path: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(
        path,
        enforce_file_format=True,
        implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
        little_endian=True,
    )
    return path


def _dcmtk(tool: str, *args: str) -> None:
    subprocess.run([f"/usr/bin/{tool}", *args], check=True, capture_output=True)


def made(path: Path) -> Made:
    ds = dcmread(path, stop_before_pixels=True)
    return Made(
        path,
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


def transfer_syntax_set(folder: Path) -> list[Made]:
    """One file per transfer syntax, over several SOP classes."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    out.append(write(dataset(CTImageStorage, modality="CT", seed=1), folder / "ct_explicit.dcm"))
    out.append(
        write(
            dataset(MRImageStorage, modality="MR", seed=2),
            folder / "mr_implicit.dcm",
            ImplicitVRLittleEndian,
        )
    )
    src = write(
        dataset(UltrasoundImageStorage, modality="US", bits=8, seed=3), folder / "us_src.dcm"
    )
    _dcmtk("dcmconv", "+td", str(src), str(folder / "us_deflated.dcm"))
    out.append(folder / "us_deflated.dcm")
    src = write(
        dataset(SecondaryCaptureImageStorage, modality="OT", bits=8, seed=4), folder / "sc_src.dcm"
    )
    _dcmtk("dcmcjpeg", "+eb", str(src), str(folder / "sc_jpeg_baseline.dcm"))
    out.append(folder / "sc_jpeg_baseline.dcm")
    src = write(dataset(CTImageStorage, modality="CT", seed=5), folder / "ct_src.dcm")
    _dcmtk("dcmcjpeg", "+e1", str(src), str(folder / "ct_jpeg_lossless.dcm"))
    out.append(folder / "ct_jpeg_lossless.dcm")
    src = write(
        dataset(DigitalXRayImageStorageForPresentation, modality="DX", seed=6),
        folder / "dx_src.dcm",
    )
    _dcmtk("dcmcrle", str(src), str(folder / "dx_rle.dcm"))
    out.append(folder / "dx_rle.dcm")
    out.append(_jpeg2000(folder / "mr_j2k.dcm"))
    for leftover in ("us_src.dcm", "sc_src.dcm", "ct_src.dcm", "dx_src.dcm"):
        (folder / leftover).unlink()
    return [made(p) for p in out]


def _jpeg2000(path: Path) -> Path:
    ds = dataset(MRImageStorage, modality="MR", seed=7)
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(
        buffer, format="JPEG2000", irreversible=False, no_jp2=True
    )
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, count: int, *, rows: int = 64, columns: int = 64) -> list[Made]:
    """``count`` CT images of one series (512x512x16 bit is ~0.5 MiB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = [
        write(
            dataset(
                CTImageStorage,
                modality="CT",
                rows=rows,
                columns=columns,
                study_uid=study,
                series_uid=series,
                seed=i,
            ),
            folder / f"ct_{i:04d}.dcm",
        )
        for i in range(count)
    ]
    return [made(p) for p in paths]


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset without preamble and file meta: what travels over DIMSE.

    A deflated dataset is inflated first: DCMTK's storescu re-deflates what it sends
    (its own compression level, an even-length pad), so only the inflated bytes of the
    file and of the received instance can be the same.
    """
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    body = raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
    if meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    return body


def with_pixel_bytes(path: Path, count: int, *, seed: int = 0) -> Made:
    """A Secondary Capture instance whose Pixel Data (OB) holds ``count`` random bytes
    (odd counts are padded to even, as DICOM requires). The bytes are random so that any
    reordering or loss of chunks on the way changes the digest."""
    ds = _secondary_capture(seed)
    _set_pixels(ds, count, seed)
    write(ds, path)
    return made(path)


def of_total_size(path: Path, total: int, *, seed: int = 0) -> Made:
    """An instance whose Part-10 file is exactly ``total`` bytes (even)."""
    ds = _secondary_capture(seed)
    _set_pixels(ds, 0, seed)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    base = len(buffer.getvalue())
    if total < base or (total - base) % 2:
        raise ValueError(f"cannot make a {total}-byte file (smallest is {base}, even sizes)")
    _set_pixels(ds, total - base, seed)
    write(ds, path)
    if path.stat().st_size != total:
        raise AssertionError(f"made {path.stat().st_size} bytes, wanted {total}")
    return made(path)


def _secondary_capture(seed: int) -> Dataset:
    return dataset(
        SecondaryCaptureImageStorage, modality="OT", rows=1, columns=1, bits=8, seed=seed
    )


def _set_pixels(ds: Dataset, count: int, seed: int) -> None:
    ds.PixelData = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
