"""Prometheus (Debian package ``prometheus``) scraping the stages of a test pipeline.

Prometheus cannot report a port it chose itself, so its port comes from ``free_port``;
readiness is ``GET /-/ready`` answering 200. It scrapes every second, keeps its TSDB
in the test's folder and answers PromQL through the HTTP API.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dicomflow.embedded.process import terminate
from support.servers import free_port

PROMETHEUS = "/usr/bin/prometheus"
JOB = "dicomflow"


class Prometheus:
    def __init__(self, root: Path, targets: dict[str, int]) -> None:
        """``targets``: service name -> loopback port of its /metrics."""
        self.root = root
        self.targets = targets
        self.port = free_port()
        self.log = root / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        static = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}}
            for name, port in self.targets.items()
        ]
        scrape = {"job_name": JOB, "scrape_interval": "1s", "static_configs": static}
        # JSON is YAML: no YAML writer needed.
        return json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]})

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(self.config())
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not become ready:\n{self.log.read_text()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as rsp:  # noqa: S310
                return int(rsp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully (so later increases show in rates)."""
        deadline = time.monotonic() + timeout
        while True:
            up = self.query(f'up{{job="{JOB}"}} == 1')
            if len(up) == len(self.targets):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus scraped only {len(up)} of {self.targets}")
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as rsp:  # noqa: S310 (loopback)
            body = json.load(rsp)
        if body.get("status") != "success":
            raise AssertionError(f"PromQL error for {expr}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self, timeout: float = 20.0) -> None:
        terminate(self._proc, timeout)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
