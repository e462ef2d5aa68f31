"""DICOM TLS: the ``ssl.SSLContext`` of the gateway's listener and of a destination's client.

One profile for both sides, in the spirit of BCP 195 (the basis of DICOM's current TLS
profiles): TLS 1.2 at least, 1.3 whenever the peer offers it (OpenSSL negotiates the
highest common version); for TLS 1.2 only ECDHE key exchange with an AEAD cipher
(AES-GCM or ChaCha20-Poly1305), so no CBC, no static-RSA key exchange, no SHA-1 MAC;
TLS 1.3 suites are all AEAD. Compression and renegotiation are off.

A client always verifies the peer's chain (``CERT_REQUIRED``) and, unless told
otherwise by an explicit setting, the name in its certificate. A server verifies client
certificates against its own CA file when it has one, and requires one when told to.

A file that cannot be read or parsed is a ``ConfigError`` naming the setting and the
path, never its contents. ``refusal`` turns a failed handshake into a reason a person
can act on, plus a kind from a small fixed set for metrics.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from dicomflow.shared.crypto.tlsfiles import load_ca, load_chain
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import DestinationTlsSettings, DicomTlsSettings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION

# What a refused handshake was, for the metric label: a small fixed set.
REFUSAL_KINDS = (
    "protocol_version",
    "no_shared_cipher",
    "no_client_certificate",
    "untrusted_client_certificate",
    "peer_rejected_certificate",
    "not_tls",
    "closed",
    "timeout",
    "other",
)

_REASONS: dict[str, tuple[str, str]] = {
    "UNSUPPORTED_PROTOCOL": (
        "protocol_version",
        "protocol version too old or not supported (TLS 1.2 or later required)",
    ),
    "TLSV1_ALERT_PROTOCOL_VERSION": (
        "protocol_version",
        "the peer does not support TLS 1.2 or later",
    ),
    "NO_SHARED_CIPHER": (
        "no_shared_cipher",
        "no cipher suite in common (TLS 1.2 needs ECDHE with AES-GCM or ChaCha20)",
    ),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "no_shared_cipher",
        "the peer found no acceptable parameters (cipher suite or curve)",
    ),
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "no_client_certificate",
        "the client sent no certificate and one is required",
    ),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "no_client_certificate",
        "the peer requires a client certificate and none was sent",
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "peer_rejected_certificate",
        "the peer does not trust our certificate (unknown CA)",
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "peer_rejected_certificate",
        "the peer rejected our certificate (bad certificate)",
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        "peer_rejected_certificate",
        "the peer rejected our certificate (certificate unknown)",
    ),
    "WRONG_VERSION_NUMBER": ("not_tls", "not a TLS handshake (plain DICOM on the TLS port?)"),
    "HTTP_REQUEST": ("not_tls", "not a TLS handshake (an HTTP request)"),
    "UNEXPECTED_EOF_WHILE_READING": ("closed", "the peer closed the connection mid-handshake"),
}


def server_context(tls: DicomTlsSettings, where: str = "scp.tls") -> ssl.SSLContext:
    """The listener's context: our certificate, and client verification as configured."""
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError(f"{where}.cert_file and {where}.key_file are needed for DICOM TLS")
    ctx = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    load_chain(ctx, where, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        load_ca(ctx, f"{where}.ca_file", tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ConfigError(f"{where}.require_client_cert needs {where}.ca_file")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: DestinationTlsSettings, where: str) -> ssl.SSLContext:
    """A destination's context: the peer's chain always verified, its name unless
    ``check_hostname`` is explicitly false; our certificate if one is configured.
    """
    ctx = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        load_ca(ctx, f"{where}.ca_file", tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None and tls.key_file is not None:
        load_chain(ctx, where, tls.cert_file, tls.key_file)
    return ctx


def server_hostname(tls: DestinationTlsSettings, host: str) -> str:
    """The name the peer's certificate must carry: ``server_name`` or the host dialled."""
    return tls.server_name or host


def certificate_identities(cert: Mapping[str, Any] | None) -> set[str]:
    """Subject common names and SAN DNS names of a peer certificate (``getpeercert()``),
    lower-cased; empty without a verified certificate.
    """
    if not cert:
        return set()
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value).lower())
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(str(value).lower())
    return names


def refusal(exc: BaseException, timeout: float | None = None) -> tuple[str, str]:
    """(kind, reason) of a failed handshake; the kind is one of ``REFUSAL_KINDS``."""
    reason = str(getattr(exc, "reason", None) or "")
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or reason
        return "untrusted_client_certificate", f"certificate not trusted: {detail}"
    if isinstance(exc, ssl.SSLError):
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(exc, ssl.SSLEOFError):
            return "closed", "the peer closed the connection mid-handshake"
        return "other", f"TLS error {reason or type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g} s" if timeout is not None else ""
        return "timeout", f"no TLS handshake{within}"
    if isinstance(exc, ConnectionError):
        return "closed", f"the peer closed the connection mid-handshake ({type(exc).__name__})"
    return "other", f"{type(exc).__name__}: {exc}"


def _hardened(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= _OPTIONS
    return ctx
