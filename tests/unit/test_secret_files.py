"""Secret files: master keys, signing keys, NKey seeds and TLS keys that other users may
read are refused, with the chmod to run; the files dicomflow writes are owner-only; the
Kubernetes manifests mount Secrets in a way the check accepts."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trustme
from dicomflow.shared.crypto.keyfiles import refuse_shared
from dicomflow.shared.crypto.keyring import generate_master_key_file, load_master_key
from dicomflow.shared.crypto.sealsign import (
    generate_signing_key_pair,
    load_signing_key,
    load_trusted_keys,
)
from dicomflow.shared.dicom import dicomtls
from dicomflow.shared.errors import KeyFileError
from dicomflow.shared.nats import natscerts, natsconn
from dicomflow.shared.settings import DicomTlsSettings, NatsSettings
from test_manifests import OVERLAYS, render

from dicomflow.cli.natsconfig import Bundle, new_seed, write_bundle
from support.keyfiles import write_secret

KEY_B64 = b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"  # bytes(range(32))


def _stat(mode: int, uid: int) -> os.stat_result:
    # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, 10001, 45, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "accepted"),
    [
        (0o600, 1000, True),
        (0o400, 1000, True),
        (0o600, 0, True),
        (0o640, 1000, False),  # group-readable and owned by the service user: a mistake
        (0o440, 1000, False),
        (0o644, 1000, False),
        (0o604, 1000, False),
        (0o602, 1000, False),  # others may replace what it holds
        (0o660, 1000, False),
        (0o440, 0, True),  # root-owned, shared with one group: Kubernetes fsGroup
        (0o640, 0, True),
        (0o460, 0, False),  # the group may write
        (0o444, 0, False),
        (0o644, 0, False),
        (0o0604, 0, False),
    ],
)
def test_who_may_open_a_secret(mode: int, uid: int, accepted: bool) -> None:
    path = Path("/keys/master-1.key")
    if accepted:
        refuse_shared(_stat(mode, uid), path, "master key file")
        return
    with pytest.raises(KeyFileError) as info:
        refuse_shared(_stat(mode, uid), path, "master key file")
    message = str(info.value)
    assert message.startswith(f"master key file {path} is open to ")
    assert f"(mode {mode:04o})" in message
    assert f"run `chmod 600 {path}`" in message
    assert "defaultMode: 0400" in message


def test_a_master_key_others_may_read_is_refused(tmp_path: Path) -> None:
    key = write_secret(tmp_path / "master-1.key", KEY_B64)
    assert load_master_key(1, key).key == bytes(range(32))
    key.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        load_master_key(1, key)
    assert str(info.value) == (
        f"master key file {key} is open to its group and other users (mode 0644); a secret "
        f"must be readable by its owner only: run `chmod 600 {key}` (in Kubernetes: "
        "defaultMode: 0400 on the Secret volume)"
    )
    assert KEY_B64.decode().strip() not in str(info.value)
    key.chmod(0o400)
    assert load_master_key(1, key).key == bytes(range(32))


def test_the_mode_of_the_file_a_symlink_names_counts(tmp_path: Path) -> None:
    """As in a Kubernetes Secret volume: key -> ..data/key -> ..2024_01_01/key."""
    real = tmp_path / "..2024_01_01" / "master-1.key"
    real.parent.mkdir()
    write_secret(real, KEY_B64)
    (tmp_path / "..data").symlink_to(real.parent.name)
    link = tmp_path / "master-1.key"
    link.symlink_to(Path("..data") / "master-1.key")
    assert load_master_key(1, link).key_id == 1  # the link itself is 0777
    real.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"{link} is open to its group and other users"):
        load_master_key(1, link)


def test_signing_key_refused_public_key_not(tmp_path: Path) -> None:
    private, public = generate_signing_key_pair(tmp_path)
    assert stat.S_IMODE(public.stat().st_mode) == 0o644  # public: anyone may read it
    load_trusted_keys([public], "encryption.trusted_signing_keys")
    load_signing_key(private, "encryption.signing_key")
    private.chmod(0o640)
    if os.geteuid() == 0:  # group-readable is accepted for a root-owned file only
        load_signing_key(private, "encryption.signing_key")
        os.chown(private, 65534, -1)
    with pytest.raises(
        KeyFileError, match=rf"encryption\.signing_key: key file {private} is open to its group"
    ):
        load_signing_key(private, "encryption.signing_key")


def test_nkey_seed_others_may_read_is_refused(tmp_path: Path) -> None:
    seed = write_secret(tmp_path / "encryptor.nk", new_seed() + "\n")
    settings = NatsSettings(nkey_seed_file=seed)
    assert natsconn.security_options(settings)["inbox_prefix"].startswith("_INBOX.U")
    seed.chmod(0o604)
    with pytest.raises(KeyFileError, match=rf"nats\.nkey_seed_file {seed} is open to other users"):
        natsconn.security_options(settings)


def test_tls_keys_others_may_read_are_refused(tmp_path: Path) -> None:
    issued = trustme.CA().issue_cert("localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    write_secret(key, issued.private_key_pem.bytes())
    tls = DicomTlsSettings(enabled=True, cert_file=cert, key_file=key)
    dicomtls.server_context(tls)
    nats: dict[str, Any] = {"enabled": True, "cert_file": cert, "key_file": key}
    natsconn.tls_context(NatsSettings(tls=nats))
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"scp\.tls\.key_file {key} is open .*chmod 600"):
        dicomtls.server_context(tls)
    with pytest.raises(KeyFileError, match=rf"nats\.tls\.key_file {key} is open .*chmod 600"):
        natsconn.tls_context(NatsSettings(tls=nats))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_secrets_dicomflow_writes_are_owner_only(tmp_path: Path) -> None:
    generate_master_key_file(tmp_path / "master.key")
    private, _ = generate_signing_key_pair(tmp_path)
    bundle = Bundle(tmp_path / "nats")
    write_bundle(bundle, mtls=True)
    secrets = [
        tmp_path / "master.key",
        private,
        *bundle.creds.iterdir(),
        *bundle.tls.glob("*-key.pem"),
        bundle.k8s / "nats-credentials.yaml",
    ]
    assert len(secrets) > 10
    assert {p.name: _mode(p) for p in secrets} == {p.name: 0o600 for p in secrets}
    # Replaced with --force over files someone made readable: owner-only again, and the
    # CA key is reused (`up`) only while it is owner-only.
    for path in secrets[2:]:
        path.chmod(0o644)
    write_bundle(bundle, mtls=True, force=True)
    assert {p.name: _mode(p) for p in secrets[2:]} == {p.name: 0o600 for p in secrets[2:]}
    bundle.key("ca").chmod(0o644)
    with pytest.raises(KeyFileError, match=r"NATS CA key file .* is open"):
        write_bundle(bundle, mtls=True, reuse=True)
    bundle.key("ca").chmod(0o600)
    write_bundle(bundle, mtls=True, reuse=True)


def test_write_private_narrows_an_existing_file_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed or key replaced over a 0644 file is never in it while others may read it."""
    path = tmp_path / "seed.nk"
    path.write_text("old\n")
    path.chmod(0o644)
    modes: list[int] = []
    fdopen = os.fdopen

    def watched(fd: int, *args: Any, **kwargs: Any) -> Any:
        out = fdopen(fd, *args, **kwargs)
        write = out.write

        def write_and_watch(data: bytes) -> int:
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            return int(write(data))

        out.write = write_and_watch
        return out

    monkeypatch.setattr(os, "fdopen", watched)
    natscerts.write_private(path, b"new\n")
    assert modes == [0o600]
    assert _mode(path) == 0o600
    assert path.read_bytes() == b"new\n"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_secret_volumes_produce_files_the_check_accepts(overlay: str) -> None:
    """kubelet writes a Secret volume's files as root with ``defaultMode``, and with an
    ``fsGroup`` chowns them to that group and adds group read (0400 -> 0440; kubernetes
    issue 57923): every Secret volume is 0400, and the file that makes passes the check."""
    secret_volumes = 0
    for obj in render(overlay):
        if obj["kind"] not in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            continue
        pod = obj["spec"]["template"]["spec"]
        fs_group = pod.get("securityContext", {}).get("fsGroup")
        for volume in pod.get("volumes", []):
            if "secret" not in volume:
                continue
            secret_volumes += 1
            mode = volume["secret"].get("defaultMode", 0o644)
            where = f"{obj['metadata']['name']}: volume {volume['name']}"
            assert mode == 0o400, f"{where}: defaultMode {mode:04o}"
            made = mode | 0o440 if fs_group is not None else mode
            refuse_shared(_stat(made, 0), Path(where), "Secret file")
    # every overlay mounts its stages' keys (the cloud's, holding no master key, fewest: 3)
    assert secret_volumes >= 3, f"{overlay}: only {secret_volumes} Secret volumes checked"
