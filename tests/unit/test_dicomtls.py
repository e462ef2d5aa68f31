"""DICOM TLS contexts: their properties, their configuration errors, and the reasons
given for refused handshakes (real handshakes over a socket pair)."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
from dicomflow.scp_gateway.service import build_tls
from dicomflow.scp_gateway.settings import ScpGatewaySettings, ScpSettings
from dicomflow.shared.dicom import dicomtls
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import DestinationTlsSettings, DicomTlsSettings, load_settings
from pydantic import ValidationError

from support.keyfiles import owner_only


class Pki:
    """A CA, a server certificate for localhost and a client certificate, as PEM files."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = folder / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert_file, self.key_file = folder / "server.pem", folder / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.cert_file))
        server.private_key_pem.write_to_path(str(self.key_file))
        owner_only(self.key_file)
        client = self.ca.issue_cert("ct01-device", common_name="CT01 Modality")
        self.client_cert, self.client_key = folder / "client.pem", folder / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        owner_only(self.client_key)

    def server(self, **kwargs: Any) -> DicomTlsSettings:
        return DicomTlsSettings(
            enabled=True, cert_file=self.cert_file, key_file=self.key_file, **kwargs
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def test_server_context_is_tls12_plus_aead_only(pki: Pki) -> None:
    ctx = dicomtls.server_context(pki.server())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.verify_mode == ssl.CERT_NONE
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["aead"], cipher["name"]
        assert "CBC" not in cipher["description"], cipher["name"]
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}


def test_server_client_verification_modes(pki: Pki) -> None:
    optional = dicomtls.server_context(pki.server(ca_file=pki.ca_file))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = dicomtls.server_context(pki.server(ca_file=pki.ca_file, require_client_cert=True))
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_client_context_always_verifies(pki: Pki) -> None:
    tls = DestinationTlsSettings(ca_file=pki.ca_file)
    ctx = dicomtls.client_context(tls, "scu.destinations.pacs.tls")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert dicomtls.server_hostname(tls, "10.0.0.5") == "10.0.0.5"
    named = DestinationTlsSettings(ca_file=pki.ca_file, server_name="pacs.example")
    assert dicomtls.server_hostname(named, "10.0.0.5") == "pacs.example"
    loose = DestinationTlsSettings(ca_file=pki.ca_file, check_hostname=False)
    loose_ctx = dicomtls.client_context(loose, "scu.destinations.pacs.tls")
    assert not loose_ctx.check_hostname
    assert loose_ctx.verify_mode == ssl.CERT_REQUIRED


def test_missing_files_name_the_setting_and_path(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"scp\.tls\.cert_file {missing} cannot be read"):
        dicomtls.server_context(_with(pki, cert_file=missing))
    with pytest.raises(ConfigError, match=rf"scp\.tls\.key_file {missing} cannot be read"):
        dicomtls.server_context(_with(pki, key_file=missing))
    with pytest.raises(ConfigError, match=rf"scp\.tls\.ca_file {missing} cannot be read"):
        dicomtls.server_context(_with(pki, ca_file=missing))
    where = "scu.destinations.pacs.tls"
    with pytest.raises(ConfigError, match=rf"{where}\.ca_file {missing} cannot be read"):
        dicomtls.client_context(DestinationTlsSettings(ca_file=missing), where)


def _with(pki: Pki, **changes: Any) -> DicomTlsSettings:
    return pki.server().model_copy(update=changes)


def test_bad_key_is_an_error_without_key_material(pki: Pki, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert("localhost")
    wrong_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    owner_only(wrong_key)
    with pytest.raises(ConfigError, match=r"scp\.tls\.cert_file .* and scp\.tls\.key_file") as info:
        dicomtls.server_context(_with(pki, key_file=wrong_key))
    secret = wrong_key.read_text().splitlines()[1]
    assert secret not in str(info.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"scp\.tls\.ca_file .*garbage\.pem: no PEM CA"):
        dicomtls.server_context(_with(pki, ca_file=garbage))


def test_encrypted_key_fails_instead_of_prompting(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret-passphrase"),
        )
    )
    owner_only(encrypted)
    with pytest.raises(ConfigError, match="unencrypted private key"):
        dicomtls.server_context(_with(pki, key_file=encrypted))


def test_settings_check_what_tls_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("tls.enabled needs tls.cert_file")):
        load_settings(ScpGatewaySettings, scp={"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match=re.escape("require_client_cert needs tls.ca_file")):
        load_settings(
            ScpGatewaySettings,
            scp={
                "tls": {
                    "enabled": True,
                    "cert_file": "c",
                    "key_file": "k",
                    "require_client_cert": True,
                }
            },
        )
    with pytest.raises(ConfigError, match=re.escape("client_aes needs tls.require_client_cert")):
        load_settings(
            ScpGatewaySettings,
            scp={
                "tls": {
                    "enabled": True,
                    "cert_file": "c",
                    "key_file": "k",
                    "client_aes": {"ct01": ["CT01"]},
                }
            },
        )
    with pytest.raises(ConfigError, match=re.escape("plain_listener = false needs tls.enabled")):
        load_settings(ScpGatewaySettings, scp={"tls": {"plain_listener": False}})
    with pytest.raises(ValidationError, match=re.escape("cert_file and tls.key_file go together")):
        DestinationTlsSettings(cert_file=tmp_path / "c.pem")
    settings = load_settings(ScpGatewaySettings)
    assert settings.scp.tls.port == 2762
    assert not settings.scp.tls.enabled


def test_mapped_ae_must_be_allowed(pki: Pki) -> None:
    tls = pki.server(
        ca_file=pki.ca_file, require_client_cert=True, client_aes={"ct01-device": ["CT01", "CT99"]}
    )
    scp = ScpSettings(allowed_calling_aes=["CT01"], tls=tls)
    with pytest.raises(ConfigError, match=r"scp\.tls\.client_aes\.ct01-device: CT99"):
        build_tls(scp)
    assert build_tls(ScpSettings(accept_any_calling_ae=True, tls=tls)) is not None
    assert build_tls(ScpSettings(accept_any_calling_ae=True)) is None


def test_certificate_identities(pki: Pki) -> None:
    cert = {
        "subject": ((("countryName", "XX"),), (("commonName", "CT01 Modality"),)),
        "subjectAltName": (("DNS", "CT01-Device"), ("IP Address", "10.0.0.1")),
    }
    assert dicomtls.certificate_identities(cert) == {"ct01 modality", "ct01-device"}
    assert dicomtls.certificate_identities(None) == set()
    assert dicomtls.certificate_identities({}) == set()


# -- real handshakes over a socket pair: the refusal the server side reports ----------
def _handshake(server: ssl.SSLContext, client: ssl.SSLContext | None) -> BaseException | None:
    """Run both sides; return what the server side raised (None: handshake succeeded)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    errors: list[BaseException] = []

    def client_side() -> None:
        try:
            if client is None:
                b.sendall(b"\x01\x00\x00\x00\x00\xccA-ASSOCIATE-RQ, not TLS")
                b.recv(100)
            else:
                with client.wrap_socket(b, server_hostname="localhost") as tls:
                    tls.recv(1)
        except (OSError, ValueError):
            pass
        finally:
            b.close()

    thread = threading.Thread(target=client_side)
    thread.start()
    try:
        with server.wrap_socket(a, server_side=True) as tls:
            tls.sendall(b"x")
    except (OSError, ValueError) as exc:
        errors.append(exc)
    finally:
        a.close()
        thread.join(10)
    return errors[0] if errors else None


def _client(pki: Pki, **kwargs: Any) -> ssl.SSLContext:
    return dicomtls.client_context(DestinationTlsSettings(ca_file=pki.ca_file, **kwargs), "t")


def test_refusal_reasons_of_real_handshakes(pki: Pki, tmp_path: Path) -> None:
    server = dicomtls.server_context(pki.server())
    assert _handshake(server, _client(pki)) is None

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # the very thing under test is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    exc = _handshake(server, old)
    assert exc is not None
    assert dicomtls.refusal(exc)[0] == "protocol_version"

    cbc_only = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc_only.load_verify_locations(cafile=pki.ca_file)
    cbc_only.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc_only.set_ciphers("ECDHE-RSA-AES128-SHA:AES128-SHA")
    exc = _handshake(server, cbc_only)
    assert exc is not None
    assert dicomtls.refusal(exc)[0] == "no_shared_cipher"

    exc = _handshake(server, None)
    assert exc is not None
    assert dicomtls.refusal(exc)[0] == "not_tls"

    mutual = dicomtls.server_context(pki.server(ca_file=pki.ca_file, require_client_cert=True))
    exc = _handshake(mutual, _client(pki))
    assert exc is not None
    assert dicomtls.refusal(exc) == (
        "no_client_certificate",
        "the client sent no certificate and one is required",
    )
    assert (
        _handshake(mutual, _client(pki, cert_file=pki.client_cert, key_file=pki.client_key)) is None
    )

    stranger = Pki(tmp_path / "stranger", name="stranger-ca")
    exc = _handshake(
        mutual, _client(pki, cert_file=stranger.client_cert, key_file=stranger.client_key)
    )
    assert exc is not None
    kind, why = dicomtls.refusal(exc)
    assert kind == "untrusted_client_certificate"
    assert "unable to get local issuer certificate" in why

    exc = _handshake(server, _client(stranger))  # the client does not trust our CA
    assert exc is not None
    assert dicomtls.refusal(exc)[0] == "peer_rejected_certificate"


def test_refusal_of_timeouts_and_resets() -> None:
    assert dicomtls.refusal(TimeoutError(), 10.0) == ("timeout", "no TLS handshake within 10 s")
    assert dicomtls.refusal(ConnectionResetError())[0] == "closed"
    assert all(
        dicomtls.refusal(exc)[0] in dicomtls.REFUSAL_KINDS
        for exc in (ssl.SSLError(1, "x"), OSError("x"), ssl.SSLEOFError())
    )
