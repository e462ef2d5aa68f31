"""The scp-gateway's settings: the ``[scp]`` table (DICOM listener, admission limits,
DICOM TLS), on top of what every service has (``shared.settings.ServiceSettings``).
Loaded with ``shared.settings.load_settings``; `dicomflow import` reads it too (the
gateway's AE title and ``max_dataset_bytes``: it admits as the gateway does).
"""

from __future__ import annotations

from pathlib import Path

from dicomflow.shared.settings import AETitle, DicomTlsSettings, Section, ServiceSettings
from pydantic import Field


class ScpSettings(Section):
    ae_title: AETitle = Field(default="DICOMFLOW", min_length=1, max_length=16)
    host: str = "0.0.0.0"  # noqa: S104  (a DICOM receiver listens on the imaging network)
    port: int = Field(default=11112, ge=0, lt=65536)
    reuse_port: bool = Field(
        default=False,
        description="listen with SO_REUSEPORT, so that several gateway processes on one host "
        "share the port (the kernel spreads the connections); `up --replicas` sets it",
    )
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    accept_any_calling_ae: bool = False
    max_associations: int = Field(default=32, ge=1)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    maximum_pdu_size: int = Field(
        default=4 * 1024**2,
        ge=0,
        description="largest PDU accepted (advertised, and longer PDUs close the connection); "
        "0 advertises no limit but still refuses PDUs over 64 MiB",
    )
    max_dataset_bytes: int = Field(
        default=4 * 1024**3,
        ge=1,
        description="larger datasets are refused with 0xC211 (checked while they arrive)",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="private folder (the gateway's user only, mode 0700: created so if "
        "missing, refused otherwise) that holds the datasets being received; unset: a "
        "private folder the gateway creates under spool_dir, or the system temp folder",
    )
    reactor_delay: float = Field(
        default=0.01,
        ge=0.00005,
        le=0.1,
        description="longest idle turn of each of an association's polling loops "
        "(pynetdicom's network loop and acceptor reactor; a PDU or message wakes them at "
        "once): bounds how soon a release, an abort or a timer is noticed; shorter costs "
        "CPU per idle association",
    )
    tls: DicomTlsSettings = Field(default_factory=DicomTlsSettings)


class ScpGatewaySettings(ServiceSettings):
    scp: ScpSettings = Field(default_factory=ScpSettings)
