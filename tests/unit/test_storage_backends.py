"""Building each backend's store: every bad or missing field is named, no secret is shown."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import obstore
import pytest
from dicomflow.shared.errors import ConfigError, StorageUnavailable
from dicomflow.shared.settings import StorageSettings, load_settings
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.backends import parse_connection_string
from dicomflow.store_writer.settings import StoreWriterSettings
from obstore.store import AzureStore, GCSStore, S3Store

from support.fsyncs import record_fsyncs

SECRET = "c2VjcmV0LWtleS1zZWNyZXQta2V5LXNlY3JldC1rZXktMTIz"  # noqa: S105 (a made-up value)


def _build(**fields: Any) -> object:
    return objectstore.build_store(StorageSettings(**fields))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"backend": "local"}, "storage.local_path"),
        ({"backend": "s3"}, "storage.s3_bucket"),
        (
            {"backend": "s3", "s3_bucket": "b", "s3_secret_access_key": SECRET},
            "storage.s3_access_key_id",
        ),
        (
            {"backend": "s3", "s3_bucket": "b", "s3_endpoint": "http://127.0.0.1:9"},
            "storage.s3_allow_http",
        ),
        (
            {"backend": "azure", "azure_account_name": "a", "azure_account_key": SECRET},
            "storage.azure_container",
        ),
        ({"backend": "azure", "azure_container": "dicom"}, "storage.azure_account_name"),
        (
            {"backend": "azure", "azure_container": "dicom", "azure_account_name": "a"},
            "storage.azure_account_key",
        ),
        (
            {
                "backend": "azure",
                "azure_container": "dicom",
                "azure_account_name": "a",
                "azure_connection_string": f"AccountName=a;AccountKey={SECRET}",
            },
            "storage.azure_connection_string",
        ),
        (
            {
                "backend": "azure",
                "azure_container": "dicom",
                "azure_connection_string": f"AccountKey={SECRET}",
            },
            "has no AccountName",
        ),
        (
            {
                "backend": "azure",
                "azure_container": "dicom",
                "azure_connection_string": "AccountName=a;EndpointSuffix=core.windows.net",
            },
            "neither AccountKey nor SharedAccessSignature",
        ),
        (
            {
                "backend": "azure",
                "azure_container": "dicom",
                "azure_connection_string": f"AccountName=a;{SECRET}",
            },
            "malformed",
        ),
        ({"backend": "gcs"}, "storage.gcs_bucket"),
        (
            {"backend": "gcs", "gcs_bucket": "b", "gcs_service_account_file": "/nonexistent.json"},
            "storage.gcs_service_account_file",
        ),
    ],
)
def test_missing_or_bad_backend_fields_are_named(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as caught:
        _build(**fields)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[storage]\nbackend = "dropbox"\n', "storage.backend"),
        ('[storage]\nazure_container = "Has_Upper"\n', "storage.azure_container"),
        ('[storage]\nazure_endpoint = "ftp://x"\n', "storage.azure_endpoint"),
        ('[storage]\ngcs_endpoint = "localhost:4443"\n', "storage.gcs_endpoint"),
        ('[storage]\ns3_storage_class = "cheap please"\n', "storage.s3_storage_class"),
        ("[storage]\nconnect_timeout = 0\n", "storage.connect_timeout"),
    ],
)
def test_bad_backend_values_fail_at_load(tmp_path: Path, toml: str, field: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(StoreWriterSettings, config)


def test_a_bad_service_account_file_is_a_config_error(tmp_path: Path) -> None:
    account = tmp_path / "sa.json"
    account.write_text('{"private_key": "' + SECRET + '"}')
    with pytest.raises(ConfigError, match=r"storage\.backend gcs") as caught:
        _build(backend="gcs", gcs_bucket="b", gcs_service_account_file=account)
    assert SECRET not in str(caught.value)


def test_each_backend_builds_its_store(tmp_path: Path) -> None:
    assert isinstance(
        _build(
            backend="s3",
            s3_bucket="b",
            s3_access_key_id="k",
            s3_secret_access_key=SECRET,
            s3_virtual_hosted_style=True,
            s3_storage_class="GLACIER_IR",
        ),
        S3Store,
    )
    assert isinstance(
        _build(
            backend="azure",
            azure_container="dicom",
            azure_connection_string=f"AccountName=acct;AccountKey={SECRET};",
        ),
        AzureStore,
    )
    account = tmp_path / "sa.json"
    account.write_text(
        '{"gcs_base_url": "http://127.0.0.1:9", "disable_oauth": true, "client_email": "",'
        ' "private_key": "", "private_key_id": ""}'
    )
    assert isinstance(
        _build(backend="gcs", gcs_bucket="b", gcs_service_account_file=account), GCSStore
    )


def test_connection_string_parts() -> None:
    account = parse_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET};"
        "EndpointSuffix=core.usgovcloudapi.net"
    )
    assert account.endpoint == "https://acct.blob.core.usgovcloudapi.net"
    assert account.key == SECRET  # '=' inside the value survives
    assert SECRET not in repr(account)
    emulator = parse_connection_string(
        "AccountName=devstoreaccount1;SharedAccessSignature=?sv=2021&sig=x;"
        "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1/"
    )
    assert emulator.endpoint == "http://127.0.0.1:10000/devstoreaccount1"
    assert emulator.sas == "sv=2021&sig=x"


def test_secrets_are_not_in_the_settings_repr() -> None:
    settings = StorageSettings(
        backend="azure",
        azure_connection_string=f"AccountName=a;AccountKey={SECRET}",
        azure_account_key=SECRET,
        s3_secret_access_key=SECRET,
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


async def test_a_multipart_upload_the_store_kept_short_is_not_taken_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store acknowledges a multipart upload but keeps fewer bytes (s3rver killed
    mid-upload did): put raises StorageUnavailable, and writing again over it works."""
    settings = StorageSettings(backend="local", local_path=tmp_path / "objects")
    store = objectstore.build_store(settings)
    data = os.urandom(settings.multipart_chunk_size + 4096)
    real_put = obstore.put_async

    async def keeps_a_part(store: Any, key: str, body: Any, **kwargs: Any) -> Any:
        return await real_put(store, key, body.read()[: settings.multipart_chunk_size])

    monkeypatch.setattr(obstore, "put_async", keeps_a_part)
    with pytest.raises(StorageUnavailable, match=f"holds {settings.multipart_chunk_size} bytes"):
        await objectstore.put(
            store, "k", io.BytesIO(data), size=len(data), create=True, settings=settings
        )
    monkeypatch.setattr(obstore, "put_async", real_put)
    await objectstore.put(
        store, "k", io.BytesIO(data), size=len(data), create=False, settings=settings
    )
    assert bytes(await (await obstore.get_async(store, "k")).bytes_async()) == data


@pytest.mark.parametrize("size", [4096, 5 * 1024 * 1024 + 4096], ids=["one-put", "multipart"])
async def test_a_local_object_and_its_new_folders_are_fsynced_before_put_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """obstore links a local object into place without fsync: put syncs the file and
    every folder from its parent up to local_path, so a power cut after the store
    writer's ack cannot take the object back."""
    settings = StorageSettings(backend="local", local_path=tmp_path / "objects")
    store = objectstore.build_store(settings)
    synced = record_fsyncs(monkeypatch)
    key = "study/series/instance.dcm.enc"
    await objectstore.put(
        store, key, io.BytesIO(os.urandom(size)), size=size, create=True, settings=settings
    )
    root = settings.local_path
    assert root is not None
    expected = [root / key, root / "study/series", root / "study", root]
    assert synced == [str(path.resolve()) for path in expected]

    # A second object in the same folder: the file and its folder again, the folders
    # above were synced into their parents already.
    synced.clear()
    other = "study/series/other.dcm.enc"
    await objectstore.put(
        store, other, io.BytesIO(os.urandom(size)), size=size, create=True, settings=settings
    )
    assert synced == [str((root / other).resolve()), str((root / "study/series").resolve())]


async def test_a_disk_that_refuses_fsync_fails_the_put_as_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync failing (EIO) is the write not holding: StorageUnavailable, so the store
    writer retries and does not acknowledge."""
    settings = StorageSettings(backend="local", local_path=tmp_path / "objects")
    store = objectstore.build_store(settings)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageUnavailable, match="making the object durable failed"):
        await objectstore.put(
            store, "k.dcm", io.BytesIO(b"x" * 10), size=10, create=True, settings=settings
        )
