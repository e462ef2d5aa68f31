"""DICOM TLS on real associations: DCMTK and Python TLS clients against a real
scp-gateway process, and the scu-gateway delivering to a DCMTK TLS storescp.

Certificates are made per module with trustme: a hospital CA signing the gateway's
certificate and the modalities' client certificates, and a stranger CA that signs
nothing the gateway trusts.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import DeliveryDeferred
from dicomflow.shared.settings import DestinationTlsSettings
from pydicom import dcmread

from dicomflow.embedded.layout import to_toml
from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.process import terminate
from support.dicomfiles import Made, ct_series
from support.keyfiles import owner_only
from support.pipeline import STORESCU, Pipeline, StoreResult
from support.servers import free_port, wait_for, wait_for_port

pytestmark = pytest.mark.integration

STORESCP = "/usr/bin/storescp"
ALLOWED = ["STORESCU", "CT01", "CT02"]


@dataclass
class Identity:
    cert: Path
    key: Path


class Pki:
    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = trustme.CA(organization_name=name)
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *identities: str, common_name: str | None = None) -> Identity:
        issued = self.ca.issue_cert(*identities, common_name=common_name)
        out = Identity(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        issued.cert_chain_pems[0].write_to_path(str(out.cert))
        issued.private_key_pem.write_to_path(str(out.key))
        owner_only(out.key)
        return out


@dataclass
class Certs:
    hospital: Pki
    stranger: Pki
    gateway: Identity
    ct01: Identity  # may call as CT01 only
    stranger_ct01: Identity  # same names, signed by the stranger CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("pki")
    hospital = Pki(root / "hospital", "Hospital CA")
    stranger = Pki(root / "stranger", "Stranger CA")
    return Certs(
        hospital=hospital,
        stranger=stranger,
        gateway=hospital.issue("gateway", "localhost", "127.0.0.1"),
        ct01=hospital.issue("ct01", "ct01-device", common_name="CT01 Modality"),
        stranger_ct01=stranger.issue("ct01", "ct01-device", common_name="CT01 Modality"),
    )


@pytest.fixture(scope="module")
def mutual_gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[tuple[Pipeline, int]]:
    """A TLS-only gateway requiring client certificates, ct01-device mapped to CT01."""
    root = tmp_path_factory.mktemp("mutual")
    with NatsServer(root / "jetstream") as nats_server:
        pipeline = Pipeline(
            root / "p", nats_server, {"backend": "local", "local_path": root / "objects"}
        )
        pipeline.allowed = ALLOWED
        plain_port = pipeline.port
        pipeline.port = free_port()  # Pipeline.start waits for this one: the TLS port
        pipeline.extra = {
            "scp": {
                "port": plain_port,
                "tls": {
                    "enabled": True,
                    "port": pipeline.port,
                    "plain_listener": False,
                    "cert_file": certs.gateway.cert,
                    "key_file": certs.gateway.key,
                    "ca_file": certs.hospital.ca_file,
                    "require_client_cert": True,
                    "client_aes": {"ct01-device": ["CT01"]},
                    "handshake_timeout": 2.0,
                },
            }
        }
        pipeline.write_config()
        pipeline.start()
        try:
            yield pipeline, plain_port
        finally:
            pipeline.stop()


def storescu_tls(
    port: int,
    files: list[Path],
    *,
    ca: Path,
    identity: Identity | None,
    calling: str = "CT01",
) -> StoreResult:
    """DCMTK storescu over TLS (its default BCP 195 non-downgrading profile)."""
    tls = ["+tls", str(identity.key), str(identity.cert), "-pw"] if identity else ["+tla"]
    proc = subprocess.run(
        [
            STORESCU,
            "-v",
            *tls,
            "+cf",
            str(ca),
            "-aet",
            calling,
            "-aec",
            "DICOMFLOW",
            "127.0.0.1",
            str(port),
            *[str(f) for f in files],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TCP_NODELAY="1"),
        check=False,
    )
    return StoreResult(proc.returncode, proc.stdout + proc.stderr)


def refusals(pipeline: Pipeline, why: str) -> list[str]:
    return [
        line
        for line in pipeline.logs("scp-gateway").splitlines()
        if '"level": "WARNING"' in line
        and "DICOM TLS handshake from 127.0.0.1:" in line
        and why in line
    ]


def tls_metric(pipeline: Pipeline, outcome: str) -> float:
    port = pipeline.metrics_port("scp-gateway")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    pattern = rf'^dicomflow_scp_tls_handshakes_total\{{outcome="{outcome}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no scp_tls_handshakes sample for {outcome}"
    return float(match.group(1))


# -- (a) the right CA and certificate: stored -------------------------------------------
def test_storescu_with_client_certificate_is_stored(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, plain_port = mutual_gateway
    files = ct_series(tmp_path / "ct", 3)
    before = len(pipeline.wait_stored(0, timeout=0))
    result = storescu_tls(
        pipeline.port, [f.path for f in files], ca=certs.hospital.ca_file, identity=certs.ct01
    )
    assert result.statuses() == ["Success"] * 3, result.output
    stored = pipeline.wait_stored(before + 3)
    assert {f.sop_instance_uid for f in files} <= set(stored)
    assert tls_metric(pipeline, "ok") >= 1
    # TLS only: nothing listens on the plain port.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", plain_port), timeout=2).close()


# -- (b) TLS 1.0 / 1.1: refused and logged ------------------------------------------------
def test_tls11_client_is_refused_and_logged(mutual_gateway: tuple[Pipeline, int]) -> None:
    pipeline, _ = mutual_gateway
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # a deprecated protocol is the point of this client
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    before = tls_metric(pipeline, "protocol_version")
    with (
        socket.create_connection(("127.0.0.1", pipeline.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")
    wait_for(
        "the refusal in the gateway log",
        lambda: refusals(pipeline, "protocol version too old or not supported"),
        30,
    )
    wait_for("the metric", lambda: tls_metric(pipeline, "protocol_version") == before + 1, 10)


# -- (c) wrong CA on either side -----------------------------------------------------------
def test_client_trusting_another_ca_fails(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, _ = mutual_gateway
    files = ct_series(tmp_path / "ct", 1)
    result = storescu_tls(
        pipeline.port, [files[0].path], ca=certs.stranger.ca_file, identity=certs.ct01
    )
    assert result.returncode != 0
    assert result.statuses() == []
    assert "TLS error: certificate verify failed" in result.output, result.output
    wait_for(
        "the gateway's log of the client's refusal",
        lambda: refusals(pipeline, "the peer does not trust our certificate (unknown CA)"),
        30,
    )


def test_client_certificate_of_another_ca_is_refused_and_logged(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, _ = mutual_gateway
    files = ct_series(tmp_path / "ct", 1)
    result = storescu_tls(
        pipeline.port, [files[0].path], ca=certs.hospital.ca_file, identity=certs.stranger_ct01
    )
    assert result.statuses() == [], result.output
    wait_for(
        "the refusal in the gateway log",
        lambda: refusals(pipeline, "certificate not trusted: unable to get local issuer"),
        30,
    )
    assert tls_metric(pipeline, "untrusted_client_certificate") >= 1
    assert files[0].sop_instance_uid not in pipeline.records()


# -- (d) a client certificate is required --------------------------------------------------
def test_no_client_certificate_is_refused_and_logged(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, _ = mutual_gateway
    files = ct_series(tmp_path / "ct", 1)
    result = storescu_tls(pipeline.port, [files[0].path], ca=certs.hospital.ca_file, identity=None)
    assert result.statuses() == [], result.output
    wait_for(
        "the refusal in the gateway log",
        lambda: refusals(pipeline, "the client sent no certificate and one is required"),
        30,
    )
    assert tls_metric(pipeline, "no_client_certificate") >= 1
    assert files[0].sop_instance_uid not in pipeline.records()


# -- (e) a certificate may only call as the AEs it is mapped to ------------------------------
def test_certificate_calling_as_another_ae_is_rejected(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, _ = mutual_gateway
    files = ct_series(tmp_path / "ct", 1)
    # CT02 is on the allow-list, but not for the ct01-device certificate.
    result = storescu_tls(
        pipeline.port,
        [files[0].path],
        ca=certs.hospital.ca_file,
        identity=certs.ct01,
        calling="CT02",
    )
    assert result.statuses() == [], result.output
    assert "Association Rejected" in result.output, result.output
    assert "Calling AE Title Not Recognized" in result.output, result.output
    wait_for(
        "the rejection in the gateway log",
        lambda: (
            "calling AE CT02 is not allowed for client certificate ct01 modality, "
            "ct01-device" in pipeline.logs("scp-gateway")
        ),
        30,
    )
    assert files[0].sop_instance_uid not in pipeline.records()


# -- a client that starts a handshake and stalls -----------------------------------------
def test_stalled_handshake_times_out_without_blocking_others(
    tmp_path: Path, mutual_gateway: tuple[Pipeline, int], certs: Certs
) -> None:
    pipeline, _ = mutual_gateway
    files = ct_series(tmp_path / "ct", 1)
    with socket.create_connection(("127.0.0.1", pipeline.port), timeout=10) as stalled:
        stalled.sendall(b"\x16")  # the first byte of a TLS record, then nothing
        # pynetdicom alone would handshake in its accepting thread: this store would wait.
        result = storescu_tls(
            pipeline.port, [files[0].path], ca=certs.hospital.ca_file, identity=certs.ct01
        )
        assert result.statuses() == ["Success"], result.output
        wait_for(
            "the timeout in the gateway log",
            lambda: refusals(pipeline, "no TLS handshake within 2 s"),
            30,
        )
        assert stalled.recv(1) == b""  # the gateway closed it


# -- (f) the scu-gateway forwards over TLS, and a gateway with both listeners ---------------
class TlsStoreScp:
    """DCMTK storescp with TLS, requiring a client certificate of the hospital CA."""

    def __init__(self, folder: Path, certs: Certs, identity: Identity) -> None:
        self.out = folder / "received"
        self.out.mkdir(parents=True)
        self.port = free_port()
        self.log = folder / "storescp.log"
        args = [
            STORESCP,
            "-v",
            "+tls",
            str(identity.key),
            str(identity.cert),
            "-pw",
            "+cf",
            str(certs.hospital.ca_file),
            "-aet",
            "PEER",
            "-od",
            str(self.out),
            str(self.port),
        ]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, TCP_NODELAY="1"),
                start_new_session=True,
            )

    def received(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.out.iterdir()}

    def stop(self) -> None:
        terminate(self.proc, timeout=10)


@pytest.fixture
def tls_peer(tmp_path: Path, certs: Certs) -> Iterator[TlsStoreScp]:
    peer_identity = certs.hospital.issue("peer", "pacs-peer.test")
    peer = TlsStoreScp(tmp_path / "peer", certs, peer_identity)
    try:
        wait_for("storescp's port", lambda: _listening(peer.port), 30)
        yield peer
    finally:
        peer.stop()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_scu_gateway_forwards_over_tls(
    tmp_path: Path, nats_server: NatsServer, certs: Certs, tls_peer: TlsStoreScp
) -> None:
    scu_identity = certs.hospital.issue("scu", "dicomflow-scu")
    tls: dict[str, Any] = {
        "ca_file": certs.hospital.ca_file,
        "cert_file": scu_identity.cert,
        "key_file": scu_identity.key,
        "server_name": "pacs-peer.test",
    }
    scu = {
        "destinations": {
            "PEER": {"ae_title": "PEER", "host": "127.0.0.1", "port": tls_peer.port, "tls": tls}
        },
        "rules": [{"destinations": ["PEER"]}],
    }
    tls_port = free_port()
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        scu=scu,
    )
    pipeline.extra = {
        "scp": {
            "tls": {
                "enabled": True,
                "port": tls_port,
                "cert_file": certs.gateway.cert,
                "key_file": certs.gateway.key,
            }
        }
    }
    pipeline.write_config()
    pipeline.start()
    try:
        wait_for_port(tls_port)
        plain: list[Made] = ct_series(tmp_path / "plain", 2)
        over_tls: list[Made] = ct_series(tmp_path / "tls", 2)
        sent = pipeline.send(plain)  # the plain listener runs beside the TLS one
        assert sent.statuses() == ["Success"] * 2, sent.output
        # No client certificate needed here; the gateway's certificate is verified.
        sent = storescu_tls(
            tls_port,
            [f.path for f in over_tls],
            ca=certs.hospital.ca_file,
            identity=None,
            calling="STORESCU",
        )
        assert sent.statuses() == ["Success"] * 2, sent.output
        expected = {f.sop_instance_uid for f in plain + over_tls}
        wait_for("all four at the TLS peer", lambda: tls_peer.received() == expected, 90)
        wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
        logs = pipeline.logs("scu-gateway")
        assert "PEER (PEER@127.0.0.1:" in logs and ", TLS): association open" in logs, logs
        assert pipeline.dead_letters() == []
        ready = [line for line in pipeline.logs("scp-gateway").splitlines() if "ready" in line]
        assert f"127.0.0.1:{tls_port} (DICOM TLS)" in ready[-1], ready
    finally:
        pipeline.stop()


def test_destination_checks_the_peer_certificate(
    tmp_path: Path, certs: Certs, tls_peer: TlsStoreScp
) -> None:
    scu_identity = certs.hospital.issue("scu", "dicomflow-scu")

    def pool(**tls: Any) -> AssociationPool:
        dest = DestinationSettings(
            ae_title="PEER",
            host="127.0.0.1",
            port=tls_peer.port,
            connect_timeout=5,
            acse_timeout=5,
            tls=DestinationTlsSettings(
                cert_file=scu_identity.cert, key_file=scu_identity.key, **tls
            ),
        )
        return AssociationPool("PEER", dest, "DICOMFLOW")

    right = {"ca_file": certs.hospital.ca_file, "server_name": "pacs-peer.test"}
    assert pool(**right).echo() == 0x0000
    # The peer's certificate names pacs-peer.test, not the address dialled.
    with pytest.raises(DeliveryDeferred, match=r"cannot associate with PEER .*, TLS\)"):
        pool(ca_file=certs.hospital.ca_file).echo()
    with pytest.raises(DeliveryDeferred):
        pool(ca_file=certs.stranger.ca_file, server_name="pacs-peer.test").echo()
    # Name check off (logged loudly): the chain is still verified.
    assert pool(ca_file=certs.hospital.ca_file, check_hostname=False).echo() == 0x0000
    with pytest.raises(DeliveryDeferred):
        pool(ca_file=certs.stranger.ca_file, check_hostname=False).echo()


def test_gateway_refuses_to_start_with_an_unreadable_key(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "missing.key"
    config = tmp_path / "dicomflow.toml"
    config.write_text(
        to_toml(
            {
                "nats": {"servers": ["nats://127.0.0.1:1"], "connect_timeout": 1.0},
                "scp": {
                    "allowed_calling_aes": ["CT01"],
                    "tls": {"enabled": True, "cert_file": certs.gateway.cert, "key_file": missing},
                },
                "telemetry": {"metrics_host": "127.0.0.1", "metrics_port": 0},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dicomflow", "scp-gateway", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"scp.tls.key_file {missing} cannot be read" in proc.stderr, proc.stderr
