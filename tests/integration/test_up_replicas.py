"""`dicomflow up --replicas N`: N processes of each stage on one host, the gateways
sharing the DICOM port (SO_REUSEPORT), the consumer stages their durable consumer."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.dicomfiles import ct_series
from support.servers import free_port, wait_for, wait_for_port
from support.up import children, cli, send, start, stop, wait_listed

pytestmark = pytest.mark.integration

REPLICATED = ("store-writer", "encryptor", "scp-gateway")
IMAGES = 24  # one association each: all on one gateway by chance is 2 in 2**24
METRICS_AT = re.compile(r"metrics and probes on http://[^:]+:(\d+)")


def log_of(data: Path, name: str) -> str:
    path = data / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def counted(port: int, family_name: str, **labels: str) -> float:
    """The sum of a counter's samples with ``labels`` in a process's /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as rsp:
        text = rsp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name.endswith("_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
    return total


def acks(ports: dict[str, int], stage: str) -> float:
    """Messages acknowledged by both processes of a consumer stage."""
    return sum(
        counted(ports[name], "dicomflow_instances", stage=stage, outcome="ack")
        for name in (stage, f"{stage}-2")
    )


def test_two_gateways_share_the_port_and_every_image_is_stored_once(tmp_path: Path) -> None:
    images = ct_series(tmp_path / "in", IMAGES)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    proc = start(data, port, log, "--replicas", "2")
    try:
        wait_for_port(port, timeout=90)
        # Two processes of each stage, each with its own log and metrics port.
        names = [f"{stage}{suffix}" for stage in REPLICATED for suffix in ("", "-2")]
        wait_for(
            "every process serving its metrics, both gateways listening",
            lambda: (
                all(METRICS_AT.search(log_of(data, name)) for name in names)
                and all(
                    "scp-gateway ready" in log_of(data, n) for n in ("scp-gateway", "scp-gateway-2")
                )
            ),
            timeout=90,
        )
        ports = {name: int(METRICS_AT.findall(log_of(data, name))[-1]) for name in names}
        assert len(set(ports.values())) == len(names), ports
        commands = list(children(proc.pid).values())
        for stage in REPLICATED:
            assert sum(f"dicomflow {stage} " in cmd for cmd in commands) == 2, commands

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda made: send(port, made.path), images))
        assert all("Received Store Response (Success)" in a for a in answers), answers

        # Both gateways answered some, and together every one, once.
        success = {
            name: counted(ports[name], "dicomflow_cstore_responses", status="success")
            for name in ("scp-gateway", "scp-gateway-2")
        }
        assert sum(success.values()) == IMAGES, success
        assert all(count > 0 for count in success.values()), success

        # Every image stored, once: IMAGES objects, each sealed and stored exactly once
        # across the replicas of each consumer stage (no redelivery, nothing lost).
        for made in images:
            wait_listed(data, made.sop_instance_uid)
        for stage in ("encryptor", "store-writer"):
            wait_for(
                f"{stage} acknowledged every image",
                lambda stage=stage: acks(ports, stage) >= IMAGES or None,
                timeout=60,
            )
            assert acks(ports, stage) == IMAGES, stage
        objects = [p for p in (data / "objects").rglob("*") if p.is_file()]
        assert len(objects) == IMAGES, [p.name for p in objects]
        verify = cli("verify", "--data-dir", str(data))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f'"verified": {IMAGES}' in verify.stdout
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert "dicomflow: stopped." in log.read_text()


def test_replicas_out_of_range_is_refused_with_one_line(tmp_path: Path) -> None:
    done = cli("up", "--data-dir", str(tmp_path / "data"), "--replicas", "0")
    assert done.returncode == 2, done.stderr
    assert "--replicas 0: run 1 to 16 of each stage" in done.stderr
    assert not (tmp_path / "data").exists()
