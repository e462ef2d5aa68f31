"""Loading TLS certificates, keys and CA files into an ``ssl.SSLContext``.

Shared by DICOM TLS (``dicomtls``) and the NATS client (``natsconn``). A file that cannot
be read or parsed is a ``ConfigError`` naming the setting and the path, never its
contents; a private key file that other users may read is refused (``keyfiles``); an
encrypted private key fails with an error instead of OpenSSL prompting on a
terminal (which would hang a service).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicomflow.shared.crypto.keyfiles import check_secret_file
from dicomflow.shared.errors import ConfigError


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key
    # and hang a service; an empty password makes it fail with an error instead.
    return b""


def load_chain(ctx: ssl.SSLContext, where: str, cert: Path, key: Path) -> None:
    _readable(f"{where}.cert_file", cert)
    check_secret_file(key, f"{where}.key_file")  # refused when other users may read it
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{where}.cert_file {cert} and {where}.key_file {key}: not a PEM certificate "
            f"and its unencrypted private key ({_why(exc)})"
        ) from exc


def load_ca(ctx: ssl.SSLContext, setting: str, path: Path) -> None:
    _readable(setting, path)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{setting} {path}: no PEM CA certificate in it ({_why(exc)})") from exc


def _why(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _readable(setting: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting} {path} cannot be read: {exc.strerror or exc}") from exc
