"""The end-to-end path on every cloud backend: storescu -> pipeline -> storage -> `get`.

Each backend runs a real server on a free loopback port: moto (S3), Azurite (Azure
Blob) and fake-gcs-server behind the XML adapter of ``support.gcs`` (GCS; see there for
exactly what the adapter does). Each uses another layout and root path, and stores a
few small instances plus one above the multipart part size, so multipart (S3, GCS) and
block-list (Azure) uploads are exercised. Object names are checked by listing the
bucket with a client other than obstore where one exists (boto3; fake-gcs-server's JSON
API), and with a separate obstore store for Azurite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from dicomflow.shared.storage.layout import Layout, object_key
from obstore.store import AzureStore

from dicomflow.embedded.natsserver import NatsServer
from support.azurite import ACCOUNT, KEY, Azurite
from support.dicomfiles import Made, ct_series, dataset_bytes, with_pixel_bytes
from support.gcs import FakeGcs
from support.pipeline import Pipeline
from support.servers import MotoServer

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    server = Azurite().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fake_gcs() -> Iterator[FakeGcs]:
    server = FakeGcs().start()
    try:
        yield server
    finally:
        server.stop()


class Backend(ABC):
    """One backend under test: its [storage] table and an independent way to list it."""

    layout: Layout
    root: str

    @abstractmethod
    def storage(self, tmp_path: Path) -> dict[str, Any]: ...

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def read(self, key: str) -> bytes: ...


class S3(Backend):
    layout, root = Layout.HIERARCHICAL, "s3root"

    def __init__(self, moto: MotoServer) -> None:
        self.moto, self.bucket = moto, "backends-s3"
        moto.create_bucket(self.bucket)

    def storage(self, tmp_path: Path) -> dict[str, Any]:
        return {
            "backend": "s3",
            "s3_bucket": self.bucket,
            "s3_endpoint": self.moto.endpoint,
            "s3_allow_http": True,
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
            "s3_storage_class": "STANDARD_IA",
        }

    def names(self) -> list[str]:
        listed = self.moto.client().list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def read(self, key: str) -> bytes:
        body: bytes = self.moto.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def storage_class(self, key: str) -> str:
        return str(self.moto.client().head_object(Bucket=self.bucket, Key=key)["StorageClass"])


class Azure(Backend):
    layout, root = Layout.LEGACY, "azure/root/"

    def __init__(self, azurite: Azurite) -> None:
        self.azurite, self.container = azurite, "dicom-e2e"

    def storage(self, tmp_path: Path) -> dict[str, Any]:
        # The container does not exist yet: the store writer creates it at start-up.
        return {
            "backend": "azure",
            "azure_connection_string": self.azurite.connection_string,
            "azure_container": self.container,
            "azure_create_container": True,
        }

    def _store(self) -> AzureStore:
        return AzureStore(
            self.container,
            account_name=ACCOUNT,
            account_key=KEY,
            endpoint=self.azurite.endpoint,
            client_options={"allow_http": True},
        )

    def names(self) -> list[str]:
        return sorted(m["path"] for batch in obstore.list(self._store()) for m in batch)

    def read(self, key: str) -> bytes:
        return bytes(obstore.get(self._store(), key).bytes())


class Gcs(Backend):
    layout, root = Layout.FLAT, ""

    def __init__(self, fake: FakeGcs) -> None:
        self.fake, self.bucket = fake, "dicom-e2e"
        fake.create_bucket(self.bucket)

    def storage(self, tmp_path: Path) -> dict[str, Any]:
        account = self.fake.service_account_file(tmp_path / "service-account.json")
        return {
            "backend": "gcs",
            "gcs_bucket": self.bucket,
            "gcs_service_account_file": account,
            "gcs_endpoint": self.fake.endpoint,
        }

    def names(self) -> list[str]:
        return self.fake.names(self.bucket)

    def read(self, key: str) -> bytes:
        return self.fake.read(self.bucket, key)


def _backend(kind: str, request: pytest.FixtureRequest) -> Backend:
    if kind == "s3":
        return S3(request.getfixturevalue("moto"))
    if kind == "azure":
        return Azure(request.getfixturevalue("azurite"))
    return Gcs(request.getfixturevalue("fake_gcs"))


def _files(folder: Path) -> list[Made]:
    files = ct_series(folder / "small", 3)
    # Sealed, 6 MiB is above the 5 MiB part size: a multipart / block-list upload.
    files.append(with_pixel_bytes(folder / "multipart.dcm", 6 * MiB, seed=21))
    return files


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_storescu_to_cloud_backend_and_back(
    kind: str, tmp_path: Path, nats_server: NatsServer, request: pytest.FixtureRequest
) -> None:
    backend = _backend(kind, request)
    files = _files(tmp_path / "in")
    storage = {
        **backend.storage(tmp_path),
        "layout": backend.layout.value,
        "root_path": backend.root,
        "multipart_chunk_size": PART,
        "max_retries": 2,
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, storage).start()
    try:
        sent = pipeline.send(files)
        assert sent.statuses() == ["Success"] * len(files), sent.output
        stored = pipeline.wait_stored(len(files), timeout=60)
        assert set(stored) == {f.sop_instance_uid for f in files}

        expected = {
            f.sop_instance_uid: object_key(
                backend.layout,
                backend.root,
                sop_instance_uid=f.sop_instance_uid,
                study_uid=f.study_uid,
                series_uid=f.series_uid,
                encrypted=True,
            )
            for f in files
        }
        assert {uid: r["object_key"] for uid, r in stored.items()} == expected
        assert backend.names() == sorted(expected.values())

        for f in files:
            fetched = tmp_path / f"get-{f.sop_instance_uid}.dcm"
            got = pipeline.cli("get", f.sop_instance_uid, "-o", str(fetched))
            assert got.returncode == 0, got.stderr
            assert dataset_bytes(fetched) == dataset_bytes(f.path)

        # The multipart object, read raw by the independent client, decrypts to the same.
        big = files[-1]
        raw = backend.read(expected[big.sop_instance_uid])
        assert raw[:2] == b"A1" and len(raw) > PART
        sealed, plain = tmp_path / "big.enc", tmp_path / "big.dcm"
        sealed.write_bytes(raw)
        dec = pipeline.cli("decrypt", "--master-key", f"1={pipeline.key}", str(sealed), str(plain))
        assert dec.returncode == 0, dec.stderr
        assert dataset_bytes(plain) == dataset_bytes(big.path)

        if isinstance(backend, S3):
            assert {backend.storage_class(k) for k in expected.values()} == {"STANDARD_IA"}

        verify = pipeline.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f'"verified": {len(files)}' in verify.stdout
        assert pipeline.dead_letters() == []
    finally:
        pipeline.stop()


def test_store_writer_with_bad_backend_config_exits_2(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A stage process refuses to start on a bad storage table: exit 2, the field named."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backend": "azure", "azure_container": "dicom"}, "storage.azure_account_name"),
        ({"backend": "gcs"}, "storage.gcs_bucket"),
        (
            {"backend": "gcs", "gcs_bucket": "b", "gcs_service_account_file": tmp_path / "none"},
            "storage.gcs_service_account_file",
        ),
        (
            {"backend": "s3", "s3_bucket": "b", "s3_access_key_id": "AKIA"},
            "storage.s3_access_key_id and storage.s3_secret_access_key",
        ),
        ({"backend": "local", "local_path": tmp_path, "layout": "spiral"}, "storage.layout"),
        ({"backend": "local", "local_path": tmp_path, "root_path": "/abs"}, "storage.root_path"),
    ]
    for i, (table, field) in enumerate(cases):
        pipeline = Pipeline(tmp_path / f"p{i}", nats_server, table)
        stage = pipeline.stages["store-writer"]
        stage.start()
        code = _wait_exit(stage)
        stage.stop(timeout=5)  # closes its log file
        log = pipeline.logs("store-writer")
        assert code == 2, log[-2000:]
        assert field in log, log[-2000:]
        assert "configuration error" in log


def test_azure_secrets_never_in_errors(tmp_path: Path, azurite: Azurite) -> None:
    """A wrong key is reported by status and field, never by value."""
    from dicomflow.shared.errors import ConfigError
    from dicomflow.shared.settings import StorageSettings
    from dicomflow.shared.storage import objectstore

    wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc="
    settings = StorageSettings(
        backend="azure",
        azure_account_name=ACCOUNT,
        azure_account_key=wrong,
        azure_endpoint=azurite.endpoint,
        azure_container="denied",
        azure_create_container=True,
    )
    with pytest.raises(ConfigError, match=r"HTTP 403") as caught:
        objectstore.build_store(settings)
    assert wrong not in str(caught.value)
    assert wrong not in repr(settings)


def _wait_exit(stage: Any, timeout: float = 30.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while (code := stage.exit_code()) is None:
        if time.monotonic() > deadline:
            stage.kill()
            raise AssertionError("the stage did not exit on a bad configuration")
        time.sleep(0.05)
    return int(code)
