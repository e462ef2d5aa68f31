"""`dicomflow up`, the embedded default, as a user runs it: start, send, read, stop, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.dicomfiles import ct_series, dataset_bytes
from support.orthanc import Orthanc
from support.servers import free_port, wait_for, wait_for_port
from support.up import cli as _cli
from support.up import send as _send
from support.up import start as _up
from support.up import stop as _stop
from support.up import wait_listed as _wait_listed

pytestmark = pytest.mark.integration


def test_up_stores_reads_back_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    first, second = ct_series(tmp_path / "in", 2)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()

    proc = _up(data, port, log)
    try:
        wait_for_port(port, timeout=90)
        banner = log.read_text()
        assert "DEVELOPMENT master key" in banner
        assert (data / "keys" / "master-1.key").stat().st_mode & 0o777 == 0o600
        # The encryptor signs what it seals; the store-writer trusts the public half only.
        signing = data / "keys" / "signing"
        assert (signing / "signing.pem").stat().st_mode & 0o777 == 0o600
        public = (signing / "signing.pub.pem").read_bytes()
        config = (data / "dicomflow.toml").read_text()
        assert "signing_key = " in config and "trusted_signing_keys = " in config
        assert "Received Store Response (Success)" in _send(port, first.path)
        # received datasets are spooled in the data folder, privately, never in /tmp
        assert (data / "spool").stat().st_mode & 0o777 == 0o700
        folders = [p.name for p in (data / "spool").iterdir()]
        assert folders, "the gateway made no folder of its own in the spool"
        assert all(name.startswith("dicomflow-scp-gateway") for name in folders), folders
        assert "Association Rejected" in _send(port, first.path, calling="STORESCU")
        _wait_listed(data, first.sop_instance_uid)
        out = tmp_path / "first.dcm"
        got = _cli("get", "--data-dir", str(data), first.sop_instance_uid, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert dataset_bytes(out) == dataset_bytes(first.path)
    finally:
        code = _stop(proc, twice=True)
    assert code == 0, log.read_text()[-3000:]
    assert "dicomflow: stopped." in log.read_text()

    # A second `up` on the same folder resumes: same key, same index, same objects.
    proc = _up(data, port, log)
    try:
        wait_for_port(port, timeout=90)
        assert "using the development master key" in log.read_text()
        assert (data / "keys" / "signing" / "signing.pub.pem").read_bytes() == public
        assert "Received Store Response (Success)" in _send(port, second.path)
        listed = _wait_listed(data, second.sop_instance_uid)
        assert first.sop_instance_uid in listed
        verify = _cli("verify", "--data-dir", str(data))
        assert verify.returncode == 0
        assert '"verified": 2' in verify.stdout
    finally:
        assert _stop(proc) == 0


def test_up_runs_each_stage_as_its_own_nats_user_with_mutual_tls(tmp_path: Path) -> None:
    """`up --nats-tls`: generated users and certificates; stages and `ls` still work, and
    a client without credentials is refused by the embedded server."""
    (first,) = ct_series(tmp_path / "in", 1)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    proc = _up(data, port, log, "--nats-tls")
    try:
        wait_for_port(port, timeout=90)
        security = data / "keys" / "nats"
        for user in ("admin", "scp-gateway", "encryptor", "store-writer"):
            assert (security / "creds" / f"{user}.nk").stat().st_mode & 0o777 == 0o600
        config = (security / "nats-server.conf").read_text()
        assert "verify: true" in config and "authorization" in config
        assert "Received Store Response (Success)" in _send(port, first.path)
        _wait_listed(data, first.sop_instance_uid)
        # The admin's config without its seed (TLS client certificate kept), then without
        # its client certificate (seed kept): both refused by the embedded server.
        admin = (data / "dicomflow.toml").read_text().splitlines()
        for dropped in (("nkey_seed_file",), ("cert_file", "key_file")):
            config = tmp_path / f"without-{dropped[0]}.toml"
            config.write_text("\n".join(li for li in admin if not li.startswith(dropped)))
            refused = _cli("ls", "--config", str(config))
            assert refused.returncode != 0, dropped
            assert "cannot connect to NATS" in refused.stderr, refused.stderr
        assert _cli("ls", "--data-dir", str(data)).returncode == 0
    finally:
        assert _stop(proc) == 0, log.read_text()[-3000:]


def test_up_forwards_every_stored_instance_to_a_real_pacs(tmp_path: Path) -> None:
    """`up --forward`: the scu-gateway runs too, as its own NATS user, and every stored
    instance reaches Orthanc byte-identical; a malformed --forward is refused at once."""
    files = ct_series(tmp_path / "in", 3)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    bad = subprocess.run(
        [sys.executable, "-m", "dicomflow", "up", "--data-dir", str(data), "--forward", "PACS"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "--forward 'PACS': expected [NAME=]AET@HOST:PORT" in bad.stderr
    assert not (data / "nats").exists()  # refused before anything started

    with Orthanc(tmp_path / "orthanc", peers=("DICOMFLOW",)) as pacs:
        forward = f"PACS={pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"
        proc = _up(data, port, log, "--forward", forward)
        try:
            wait_for_port(port, timeout=90)
            wait_for("the banner", lambda: "dicomflow is up" in log.read_text())
            assert f"Forwarded to:      {forward}" in log.read_text()
            for f in files:
                assert "Received Store Response (Success)" in _send(port, f.path)
            wait_for("all in Orthanc", lambda: len(pacs.instances()) == len(files), 90)
            arrived = pacs.instances()
            for f in files:
                assert pacs.dataset_bytes(arrived[f.sop_instance_uid]) == dataset_bytes(f.path)
            dlq = _cli("dlq", "ls", "--data-dir", str(data))
            assert dlq.returncode == 0 and "0 dead-lettered message(s)" in dlq.stderr, dlq
        finally:
            assert _stop(proc) == 0, log.read_text()[-3000:]
    scu_log = (data / "logs" / "scu-gateway.log").read_text()
    assert scu_log.count("delivered to PACS:") == len(files)
