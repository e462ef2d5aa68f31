"""Creating an Azure Blob container at start-up when it is missing.

``obstore`` reads and writes blobs but cannot create a container, and the Azure SDK is
a large dependency for one request. This is that one request, "Create Container"
(``PUT {endpoint}/{container}?restype=container``), signed with the account key
(Shared Key) or sent with a SAS token. 201 means created, 409 means it exists already;
anything else stops start-up with the status and the service's error code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import re
from email.utils import formatdate
from urllib.parse import urlsplit

from dicomflow.shared.errors import ConfigError

API_VERSION = "2021-08-06"
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z]+)</Code>")


def create_if_missing(
    *, endpoint: str, account: str, key: str, sas: str, container: str, timeout: float
) -> bool:
    """Create ``container``; True if it was created, False if it already existed."""
    url = f"{endpoint.rstrip('/')}/{container}?restype=container"
    if not url.startswith(("http://", "https://")):
        raise ConfigError("storage.azure_endpoint must be an http:// or https:// URL")
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": API_VERSION}
    if key:
        headers["Authorization"] = f"SharedKey {account}:{_signature(url, headers, account, key)}"
    elif sas:
        url = f"{url}&{sas}"
    else:
        raise ConfigError(
            "storage.azure_create_container needs an account key or a SAS token to create "
            f"container {container}"
        )
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.netloc, timeout=timeout)
    try:
        # http.client adds Content-Length: 0 and nothing else (no Content-Type), so the
        # request is exactly what was signed.
        connection.request("PUT", f"{parts.path}?{parts.query}", body=b"", headers=headers)
        response = connection.getresponse()
        answer = response.read(4096)
    except OSError as exc:
        raise ConfigError(
            f"storage.azure_create_container: cannot reach the blob endpoint to create "
            f"container {container}: {exc}"
        ) from exc
    finally:
        connection.close()
    if response.status == 201:
        return True
    if response.status == 409:
        return False
    match = _ERROR_CODE.search(answer)
    code = match.group(1).decode() if match else "no error code"
    raise ConfigError(
        f"storage.azure_create_container: creating container {container} failed: "
        f"HTTP {response.status} ({code}); check the storage.azure_* credentials and permissions"
    )


def _signature(url: str, headers: dict[str, str], account: str, key: str) -> str:
    """Shared Key signature of a body-less PUT (Azure Storage REST, version 2015-02-21+)."""
    parts = urlsplit(url)
    canonical_headers = "".join(
        f"{name}:{value}\n" for name, value in sorted(headers.items()) if name.startswith("x-ms-")
    )
    resource = f"/{account}{parts.path}"
    for pair in sorted(parts.query.split("&")):
        name, _, value = pair.partition("=")
        resource += f"\n{name.lower()}:{value}"
    # VERB, then Content-Encoding .. Range (11 empty fields: no body, no conditions).
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
    try:
        secret = base64.b64decode(key, validate=True)
    except ValueError as exc:
        raise ConfigError("the Azure account key is not valid base64") from exc
    digest = hmac.new(secret, to_sign.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()
