"""Signatures over sealed messages: the canonical signed bytes, signing and verifying,
and the typed errors of the key files and their settings."""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.shared.contracts.messages import BodyKind, Instance, parse
from dicomflow.shared.crypto.keyload import load_signer, load_verifier
from dicomflow.shared.crypto.sealsign import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    SealSigner,
    SealVerifier,
    generate_signing_key_pair,
    load_signing_key,
    load_trusted_keys,
    signed_bytes,
    signer_id,
)
from dicomflow.shared.errors import ConfigError, KeyFileError, SealNotTrusted
from dicomflow.shared.settings import load_settings
from dicomflow.store_writer.settings import StoreWriterSettings

from dicomflow.cli.main import main
from support.keyfiles import write_secret

SHA = "ab" * 32
SEALED_SHA = "cd" * 32


def _sealed(**changes: object) -> Instance:
    values: dict[str, object] = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.5",
        calling_ae="CT01",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256=SHA,
        modality="CT",
        key_id=1,
        sealed_size=96,
        sealed_sha256=SEALED_SHA,
        signer="0123456789abcdef",
    )
    values.update(changes)
    return Instance(**values)  # type: ignore[arg-type]


def _pair(tmp_path: Path, name: str = "k") -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    return generate_signing_key_pair(folder)


# --- the canonical signed bytes --------------------------------------------------------


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def test_signed_bytes_are_label_version_then_length_prefixed_fields() -> None:
    expected = b"".join(
        _field(x)
        for x in (
            b"dicomflow sealed message",
            b"1",
            *(
                part
                for pair in (
                    (b"Dicomflow-Schema", b"1"),
                    (b"Dicomflow-Sop-Class-Uid", b"1.2.840.10008.5.1.4.1.1.2"),
                    (b"Dicomflow-Sop-Instance-Uid", b"1.2.3.4"),
                    (b"Dicomflow-Study-Uid", b"1.2.3"),
                    (b"Dicomflow-Series-Uid", b"1.2.3.5"),
                    (b"Dicomflow-Modality", b"CT"),
                    (b"Dicomflow-Calling-Ae", b"CT01"),
                    (b"Dicomflow-Called-Ae", b"DICOMFLOW"),
                    (b"Dicomflow-Transfer-Syntax", b"1.2.840.10008.1.2.1"),
                    (b"Dicomflow-Size", b"10"),
                    (b"Dicomflow-Sha256", SHA.encode()),
                    (b"Dicomflow-Key-Id", b"1"),
                    (b"Dicomflow-Sealed-Size", b"96"),
                    (b"Dicomflow-Sealed-Sha256", SEALED_SHA.encode()),
                    (b"Dicomflow-Signer", b"0123456789abcdef"),
                )
                for part in pair
            ),
        )
    )
    assert signed_bytes(_sealed()) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"},
        {"sop_instance_uid": "1.2.3.5"},
        {"study_uid": "1.2.4"},
        {"series_uid": "1.2.3.6"},
        {"modality": "MR"},
        {"calling_ae": "CT02"},
        {"called_ae": "OTHER"},
        {"transfer_syntax": "1.2.840.10008.1.2"},
        {"size": 11},
        {"sha256": "ac" * 32},
        {"key_id": 2},
        {"sealed_size": 97},
        {"sealed_sha256": "ce" * 32},
        {"signer": "fedcba9876543210"},
    ],
)
def test_every_field_the_store_writer_acts_on_is_signed(change: dict[str, object]) -> None:
    assert signed_bytes(_sealed(**change)) != signed_bytes(_sealed())


def test_transport_and_trace_headers_are_not_signed() -> None:
    """How the body travels is covered by its digest; the trace context is not trusted."""
    moved = _sealed().with_body(BodyKind.BLOB, f"sealed.1.2.3.4.{SHA[:16]}")
    traced = dataclasses.replace(_sealed(), traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert signed_bytes(moved) == signed_bytes(traced) == signed_bytes(_sealed())


def test_a_value_cannot_be_moved_from_one_field_into_the_next() -> None:
    a = _sealed(calling_ae="CT0", called_ae="1DICOMFLOW")
    b = _sealed(calling_ae="CT01", called_ae="DICOMFLOW")
    assert signed_bytes(a) != signed_bytes(b)


# --- signing and verifying -------------------------------------------------------------


def test_signed_headers_parse_and_verify(tmp_path: Path) -> None:
    private, public = _pair(tmp_path)
    signer = load_signing_key(private, "encryption.signing_key")
    verifier = load_trusted_keys([public], "encryption.trusted_signing_keys")
    message = signer.sign(_sealed(signer=""))
    assert message.signer == signer.signer and len(message.signature) == 128
    received = parse(message.headers(), sealed=True, signed=True)
    verifier.verify(received)
    verifier.check_digest(received, SEALED_SHA)


@pytest.mark.parametrize(
    "change",
    [{"sop_instance_uid": "1.2.3.9"}, {"key_id": 99}, {"sealed_sha256": "00" * 32}],
)
def test_an_altered_header_fails_the_signature_check(
    tmp_path: Path, change: dict[str, object]
) -> None:
    private, public = _pair(tmp_path)
    message = load_signing_key(private, "s").sign(_sealed())
    verifier = load_trusted_keys([public], "t")
    with pytest.raises(SealNotTrusted, match=r"signature check failed.*does not verify"):
        verifier.verify(dataclasses.replace(message, **change))  # type: ignore[arg-type]


def test_a_forger_claiming_a_trusted_signer_fails(tmp_path: Path) -> None:
    _, public = _pair(tmp_path, "trusted")
    forger = SealSigner(Ed25519PrivateKey.generate())
    trusted = load_trusted_keys([public], "t")
    forged = forger.sign(_sealed())
    claimed = forged.signed(trusted.signers[0], forged.signature)
    with pytest.raises(SealNotTrusted, match="does not verify"):
        trusted.verify(claimed)


def test_an_untrusted_signer_is_named_in_the_reason(tmp_path: Path) -> None:
    _, public = _pair(tmp_path)
    other = SealSigner(Ed25519PrivateKey.generate())
    with pytest.raises(SealNotTrusted, match=f"signing key {other.signer}, which is not among"):
        load_trusted_keys([public], "t").verify(other.sign(_sealed()))


def test_several_trusted_keys_accept_each_signer(tmp_path: Path) -> None:
    (old_private, old_public), (new_private, new_public) = (
        _pair(tmp_path, "a"),
        _pair(tmp_path, "b"),
    )
    verifier = load_trusted_keys([old_public, new_public], "t")
    for private in (old_private, new_private):
        verifier.verify(load_signing_key(private, "s").sign(_sealed()))


def test_a_body_digest_other_than_the_signed_one_fails() -> None:
    with pytest.raises(SealNotTrusted, match="digest check failed"):
        SealVerifier([]).check_digest(_sealed(), hashlib.sha256(b"other").hexdigest())


def test_no_key_material_in_reprs(tmp_path: Path) -> None:
    private, public = _pair(tmp_path)
    pem = private.read_text()
    body = "".join(pem.splitlines()[1:-1])
    signer = load_signing_key(private, "s")
    assert body not in repr(signer) and "key=<hidden>" in repr(signer)
    assert body not in repr(load_trusted_keys([public], "t"))


# --- key files -------------------------------------------------------------------------


def test_generated_pair_modes_and_no_overwrite(tmp_path: Path) -> None:
    private, public = _pair(tmp_path)
    assert (private.name, public.name) == (PRIVATE_NAME, PUBLIC_NAME)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_signing_key(private, "s")
    assert load_trusted_keys([public], "t").signers == (key.signer,)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_signing_key_pair(private.parent)


def test_missing_key_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"encryption\.signing_key: key file .* does not exist"):
        load_signing_key(tmp_path / "nope.pem", "encryption.signing_key")
    with pytest.raises(KeyFileError, match=r"encryption\.trusted_signing_keys: key file"):
        load_trusted_keys([tmp_path / "nope.pem"], "encryption.trusted_signing_keys")


def test_a_public_key_where_the_private_key_is_expected(tmp_path: Path) -> None:
    _, public = _pair(tmp_path)
    public.chmod(0o600)  # a 0644 file is refused before its content is read
    with pytest.raises(KeyFileError, match=r"encryption\.signing_key: .* holds a public key"):
        load_signing_key(public, "encryption.signing_key")


def test_a_private_key_where_public_keys_are_expected(tmp_path: Path) -> None:
    private, _ = _pair(tmp_path)
    with pytest.raises(KeyFileError, match=r"trusted_signing_keys: .* holds a private key"):
        load_trusted_keys([private], "encryption.trusted_signing_keys")


def test_a_key_of_the_wrong_type(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "ec.pem"
    write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    public = tmp_path / "ec.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match=r"encryption\.signing_key: .*Ed25519 key is needed"):
        load_signing_key(private, "encryption.signing_key")
    with pytest.raises(KeyFileError, match=r"trusted_signing_keys: .*Ed25519 key is needed"):
        load_trusted_keys([public], "encryption.trusted_signing_keys")


def test_garbage_and_encrypted_key_files(tmp_path: Path) -> None:
    garbage = tmp_path / "g.pem"
    write_secret(garbage, "-----BEGIN SECRET-----\nc2VjcmV0\n-----END SECRET-----\n")
    with pytest.raises(KeyFileError, match="not a PEM private key") as err:
        load_signing_key(garbage, "encryption.signing_key")
    assert "c2VjcmV0" not in str(err.value)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_trusted_keys([garbage], "encryption.trusted_signing_keys")
    locked = tmp_path / "locked.pem"
    write_secret(
        locked,
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
    )
    with pytest.raises(KeyFileError, match="password-protected"):
        load_signing_key(locked, "encryption.signing_key")


# --- settings --------------------------------------------------------------------------


def test_the_encryptor_refuses_to_start_without_a_signing_key() -> None:
    with pytest.raises(ConfigError, match=r"encryption\.signing_key is not set"):
        load_signer(load_settings(EncryptorSettings).encryption)


def test_the_store_writer_refuses_to_start_without_a_trusted_key() -> None:
    with pytest.raises(ConfigError, match=r"encryption\.trusted_signing_keys is not set"):
        load_verifier(load_settings(StoreWriterSettings).encryption)


def test_settings_from_a_shared_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (private, public), (_, other) = _pair(tmp_path, "a"), _pair(tmp_path, "b")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[encryption]\nsigning_key = "{private}"\ntrusted_signing_keys = ["{public}"]\n'
        f'[encryption.master_key]\nid = 1\npath = "{tmp_path / "m.key"}"\n'
    )
    signer = load_signer(load_settings(EncryptorSettings, config).encryption)
    assert load_verifier(load_settings(StoreWriterSettings, config).encryption).signers == (
        signer.signer,
    )
    monkeypatch.setenv("DICOMFLOW_ENCRYPTION__TRUSTED_SIGNING_KEYS", f'["{public}", "{other}"]')
    verifier = load_verifier(load_settings(StoreWriterSettings, config).encryption)
    assert len(verifier.signers) == 2 and signer.signer in verifier.signers


def test_signer_id_is_a_fingerprint_of_the_public_key() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer_id(key) == hashlib.sha256(raw).hexdigest()[:16]


# --- `dicomflow keys new-signing` ------------------------------------------------------


def test_keys_new_signing_writes_a_usable_pair_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new-signing", "--out", str(tmp_path)]) == 0
    private, public = tmp_path / PRIVATE_NAME, tmp_path / PUBLIC_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signer = load_signing_key(private, "encryption.signing_key")
    load_trusted_keys([public], "encryption.trusted_signing_keys").verify(signer.sign(_sealed()))
    assert private.read_text() not in capsys.readouterr().err
    assert main(["keys", "new-signing", "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keys", "new-signing", "--out", str(tmp_path / "nope")]) == 2
    assert "not an existing folder" in capsys.readouterr().err
