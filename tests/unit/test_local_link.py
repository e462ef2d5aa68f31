"""The local backend links the store writer's spool file of a large body into place
(fsynced, create-only or replacing) instead of copying its bytes again, and uploads it
the ordinary way where a link cannot be made."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import obstore
import pytest
from dicomflow.shared.nats import transport
from dicomflow.shared.settings import StorageSettings
from dicomflow.shared.storage import localfiles, objectstore

from support.fsyncs import record_fsyncs

KEY = "study/series/instance.dcm.enc"


def _settings(tmp_path: Path) -> StorageSettings:
    return StorageSettings(backend="local", local_path=tmp_path / "objects")


def _spool(tmp_path: Path, data: bytes) -> IO[bytes]:
    spool = tempfile.NamedTemporaryFile(dir=tmp_path)  # noqa: SIM115 (closed by the test)
    spool.write(data)
    spool.seek(0)
    return spool


def _no_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the body was uploaded, not linked")

    monkeypatch.setattr(obstore, "put_async", refuse)


async def _put(settings: StorageSettings, body: IO[bytes], size: int, *, create: bool) -> None:
    store = objectstore.build_store(settings)
    await objectstore.put(store, KEY, body, size=size, create=create, settings=settings)


async def test_a_spool_file_becomes_the_object_without_an_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    data = os.urandom(3 * 1024 * 1024)
    _no_upload(monkeypatch)
    synced = record_fsyncs(monkeypatch)
    with _spool(tmp_path, data) as spool:
        await _put(settings, spool, len(data), create=True)
    path = tmp_path / "objects" / KEY
    assert path.read_bytes() == data  # still there once the spool is closed
    assert path.stat().st_mode & 0o777 == localfiles.OBJECT_MODE
    assert str(path.resolve()) in synced  # the object, and its folders, fsynced
    assert str(path.parent.resolve()) in synced


def _object_there(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "objects" / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


async def test_create_only_never_replaces_an_object_that_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    path = _object_there(tmp_path, b"the first object")
    _no_upload(monkeypatch)
    with (
        _spool(tmp_path, b"other bytes") as spool,
        pytest.raises(objectstore.ObjectExists),
    ):
        await _put(settings, spool, len(b"other bytes"), create=True)
    assert path.read_bytes() == b"the first object"


async def test_overwrite_replaces_the_object_and_leaves_no_staging_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    path = _object_there(tmp_path, b"a partial earlier attempt")
    _no_upload(monkeypatch)
    with _spool(tmp_path, b"the object written now") as spool:
        await _put(settings, spool, len(b"the object written now"), create=False)
    assert path.read_bytes() == b"the object written now"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EPERM])
async def test_a_file_that_cannot_be_linked_is_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """Another file system (EXDEV) or one without hard links: the ordinary upload."""
    settings = _settings(tmp_path)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", no_link)
    data = os.urandom(4096)
    with _spool(tmp_path, data) as spool:
        await _put(settings, spool, len(data), create=True)
    assert (tmp_path / "objects" / KEY).read_bytes() == data


async def test_a_body_in_memory_is_uploaded(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    await _put(settings, io.BytesIO(b"inline"), 6, create=True)
    assert (tmp_path / "objects" / KEY).read_bytes() == b"inline"


def _replace(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"somebody else's file")


async def test_a_spool_whose_name_now_names_another_file_is_uploaded(tmp_path: Path) -> None:
    """The spool's name was replaced under it: its bytes are uploaded, the other file's
    are not linked."""
    settings = _settings(tmp_path)
    data = os.urandom(4096)
    with _spool(tmp_path, data) as spool:
        _replace(Path(spool.name))
        await _put(settings, spool, len(data), create=True)
    assert (tmp_path / "objects" / KEY).read_bytes() == data


def test_sealed_spool_files_left_behind_are_swept_and_nothing_else(tmp_path: Path) -> None:
    """A store-writer killed with kill -9 leaves its named sealed spool; the next one to
    start removes such files from spool_dir, and nothing else there."""
    left = [tmp_path / f"{transport.SEALED_SPOOL_PREFIX}abc{i}" for i in range(2)]
    for path in left:
        path.write_bytes(b"ciphertext")
    other = tmp_path / "scp-gateway-spool"
    other.write_bytes(b"not ours")
    assert transport.sweep_sealed_spools(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]


def test_a_sealed_blob_is_spooled_to_a_named_file_plaintext_to_an_anonymous_one(
    tmp_path: Path,
) -> None:
    """Only ciphertext ever gets a name in spool_dir (a name is what lets the local
    backend link it, and what a kill -9 can leave behind)."""
    spooler = transport.Transport(None, None, publish_timeout=1, spool_dir=tmp_path)  # type: ignore[arg-type]
    sealed = spooler._blob_spool(_with_blob("sealed.0123456789abcdef.N"))
    plain = spooler._blob_spool(_with_blob("ingest.0123456789abcdef.N"))
    try:
        assert Path(sealed.name).name.startswith(transport.SEALED_SPOOL_PREFIX)
        assert [p.name for p in tmp_path.iterdir()] == [Path(sealed.name).name]
    finally:
        sealed.close()
        plain.close()
    assert list(tmp_path.iterdir()) == []


def _with_blob(name: str) -> Any:
    class Blobbed:
        blob = name

    return Blobbed()
