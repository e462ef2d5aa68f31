"""Real stage processes report their patches of dependencies' internals
(``dicomflow_fastpath_active{patch}``, all 1 at the locked versions), and the gateway's
DICOM TLS port still serves, through pynetdicom's own server, when the fence of its
listener is off."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
import trustme
from dicomflow.scp_gateway.service import _shutdown, build_ae, build_tls, start_servers
from dicomflow.scp_gateway.settings import ScpSettings
from dicomflow.scp_gateway.tlslistener import TlsAssociationServer
from dicomflow.shared import patches
from dicomflow.shared.settings import DicomTlsSettings
from dicomflow.shared.telemetry.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicomflow.embedded.natsserver import NatsServer
from support.keyfiles import owner_only
from support.pipeline import Pipeline
from support.servers import free_port

pytestmark = pytest.mark.integration

EVERY_STAGE = ("nats_io", "process_exit")
EXPECTED = {
    "scp-gateway": {
        *EVERY_STAGE,
        "reactors",
        "scp_pdata",
        "scp_pdu_limit",
        "scp_tls_server",
        "scp_spool",
    },
    "encryptor": set(EVERY_STAGE),
    "store-writer": set(EVERY_STAGE),
    "scu-gateway": {*EVERY_STAGE, "reactors", "scu_pdata", "scu_response"},
}


@pytest.fixture
def gateway_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The gateway's certificate and key (for 127.0.0.1), and the CA that signed it."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "gw.pem", tmp_path / "gw.key", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    owner_only(key)
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


def fastpaths(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "dicomflow_fastpath_active":
            return {s.labels["patch"]: s.value for s in family.samples}
    return {}


def test_every_stage_reports_its_patches_active(
    tmp_path: Path, nats_server: NatsServer, gateway_cert: tuple[Path, Path, Path]
) -> None:
    cert, key, _ = gateway_cert
    scu = {
        "destinations": {"A": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}},
        "rules": [{"destinations": ["A"]}],
    }
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        scu=scu,
        extra={
            "scp": {
                "tls": {"enabled": True, "port": free_port(), "cert_file": cert, "key_file": key}
            }
        },
    ).start()
    try:
        reported = {name: fastpaths(pipeline.metrics_port(name)) for name in EXPECTED}
    finally:
        pipeline.stop()
    assert reported == {name: dict.fromkeys(names, 1.0) for name, names in EXPECTED.items()}


@pytest.fixture
def decided_again(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.undo()
    for fence in patches.ALL:
        fence.admit()


@pytest.mark.parametrize("version", [pynetdicom.__version__, "3.1.0"], ids=["locked", "other"])
def test_the_tls_port_serves_with_its_listener_on_or_off(
    version: str,
    tmp_path: Path,
    gateway_cert: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    decided_again: None,
) -> None:
    cert, key, ca_file = gateway_cert
    tls = DicomTlsSettings(
        enabled=True, port=free_port(), plain_listener=False, cert_file=cert, key_file=key
    )
    scp = ScpSettings(host="127.0.0.1", allowed_calling_aes=["ECHOSCU"], tls=tls)
    ae = build_ae(scp)
    monkeypatch.setattr(pynetdicom, "__version__", version)
    handlers: list[Any] = [(evt.EVT_C_ECHO, lambda event: 0x0000)]
    (server,) = start_servers(ae, scp, build_tls(scp), handlers, Metrics("scp-gateway"))
    try:
        ours = version in patches.SCP_TLS_SERVER.verified
        assert isinstance(server, TlsAssociationServer) is ours
        assert server.ssl_context is not None
        client = AE(ae_title="ECHOSCU")
        client.add_requested_context(Verification)
        context = ssl.create_default_context(cafile=str(ca_file))
        assoc = client.associate(
            "127.0.0.1", tls.port, ae_title=scp.ae_title, tls_args=(context, "127.0.0.1")
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        _shutdown(server)
