"""storescu -> scp-gateway -> encryptor -> store-writer -> storage, and back with `get`.

Every stored object is also decrypted with the `decrypt` command from its raw bytes in
storage, so the A1 format is checked by a path independent of `get`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dicomflow.shared.storage.layout import object_uuid

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset_bytes, transfer_syntax_set
from support.pipeline import Pipeline
from support.servers import MotoServer

pytestmark = pytest.mark.integration


def _files(folder: Path) -> list[Made]:
    files = transfer_syntax_set(folder / "ts")
    # 1024 x 1024 x 16 bit = 2 MiB: above the inline limit, so it travels as a blob.
    files += ct_series(folder / "big", 1, rows=1024, columns=1024)
    return files


def _storage(kind: str, tmp_path: Path, moto: MotoServer | None) -> dict[str, Any]:
    if kind == "local":
        return {
            "backend": "local",
            "local_path": tmp_path / "objects",
            "layout": "flat",
            "root_path": "dicom/",
        }
    assert moto is not None
    bucket = f"e2e-{tmp_path.name.lower().replace('_', '-')}"[:60]
    moto.create_bucket(bucket)
    return {
        "backend": "s3",
        "s3_bucket": bucket,
        "s3_endpoint": moto.endpoint,
        "s3_allow_http": True,
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "layout": "flat",
        "root_path": "dicom/",
    }


def _raw_object(kind: str, storage: dict[str, Any], key: str, moto: MotoServer | None) -> bytes:
    if kind == "local":
        return (Path(storage["local_path"]) / key).read_bytes()
    assert moto is not None
    return moto.client().get_object(Bucket=storage["s3_bucket"], Key=key)["Body"].read()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_storescu_to_storage_and_back(
    kind: str, tmp_path: Path, nats_server: NatsServer, request: pytest.FixtureRequest
) -> None:
    moto = request.getfixturevalue("moto") if kind == "s3" else None
    files = _files(tmp_path / "in")
    storage = _storage(kind, tmp_path, moto)
    pipeline = Pipeline(tmp_path / "p", nats_server, storage).start()
    try:
        sent = pipeline.send(files)
        assert sent.statuses() == ["Success"] * len(files), sent.output
        stored = pipeline.wait_stored(len(files))
        assert set(stored) == {f.sop_instance_uid for f in files}

        for f in files:
            record = stored[f.sop_instance_uid]
            # Orthanc-compatible flat name under the root path, .enc since encrypted.
            assert record["object_key"] == f"dicom/{object_uuid(f.sop_instance_uid)}.dcm.enc"
            assert record["transfer_syntax"] == f.transfer_syntax  # sent unconverted

            fetched = tmp_path / f"get-{f.sop_instance_uid}.dcm"
            got = pipeline.cli("get", f.sop_instance_uid, "-o", str(fetched))
            assert got.returncode == 0, got.stderr
            assert dataset_bytes(fetched) == dataset_bytes(f.path)

            sealed = tmp_path / f"{f.sop_instance_uid}.enc"
            sealed.write_bytes(_raw_object(kind, storage, record["object_key"], moto))
            assert sealed.read_bytes()[:2] == b"A1"
            assert sealed.stat().st_size == fetched.stat().st_size + 86
            plain = tmp_path / f"dec-{f.sop_instance_uid}.dcm"
            dec = pipeline.cli(
                "decrypt", "--master-key", f"1={pipeline.key}", str(sealed), str(plain)
            )
            assert dec.returncode == 0, dec.stderr
            assert plain.read_bytes() == fetched.read_bytes()

        verify = pipeline.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert '"verified": 8' in verify.stdout
    finally:
        pipeline.stop()
