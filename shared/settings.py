"""Typed settings as data: the sections several services read, and ``load_settings``.

Each service's own class (its sections on top of ``ServiceSettings``) lives in its
folder: ``scp_gateway.settings``, ``scu_gateway.settings``, ``encryptor.settings``,
``store_writer.settings``; built once in ``main()`` and passed down. What reads a
section's files loads them (keys: ``shared.crypto.keyload``; TLS: ``dicomtls``,
``natsconn``), not this module.

Values come from, highest priority first: explicit overrides (CLI flags), environment
variables ``DICOMFLOW_<SECTION>__<FIELD>`` (e.g. ``DICOMFLOW_NATS__SERVERS``), then a
TOML config file (``--config`` or ``DICOMFLOW_CONFIG``) whose tables are the sections
below. Every service reads the same file and ignores the sections it does not use.
Invalid values fail at start-up with a ``ConfigError`` that names the field.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats.zones import Zone
from dicomflow.shared.storage.layout import Layout, normalize_root_path
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "DICOMFLOW_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsTlsSettings(Section):
    """TLS to NATS. The server's certificate is always verified (chain and host name);
    there is no setting to turn verification off."""

    enabled: bool = Field(default=False, description="also implied by a tls:// server URL")
    ca_file: Path | None = Field(
        default=None, description="PEM CA bundle to verify the server (default: system CAs)"
    )
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="private key of cert_file")
    server_name: str | None = Field(
        default=None, min_length=1, description="name to verify instead of the URL's host"
    )
    handshake_first: bool = Field(
        default=True,
        description="start TLS before the server's INFO (no plaintext downgrade); "
        "the server's tls block needs handshake_first: true",
    )

    @model_validator(mode="after")
    def _pair(self) -> NatsTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("nats.tls.cert_file and nats.tls.key_file go together")
        return self


class NatsSettings(Section):
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    tls: NatsTlsSettings = Field(default_factory=lambda: NatsTlsSettings())
    nkey_seed_file: Path | None = Field(
        default=None,
        description="this service's NKey seed file (from `dicomflow nats-config`); "
        "replies then come to a private inbox _INBOX.<public key>",
    )
    manage_topology: bool = Field(
        default=True,
        description="create/update streams and buckets at start; false: only verify "
        "(least-privilege users cannot manage streams; run `dicomflow topology` as admin)",
    )
    zone: Zone = Field(
        default=Zone.SINGLE,
        description="which part of the topology this connection's account holds: single "
        "(all of it), or in the hybrid edge edge-local, edge-sealed or cloud "
        "(what a stage checks at start)",
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    publish_timeout: float = Field(default=10.0, gt=0, description="seconds to await a PubAck")
    stream_replicas: int = Field(default=1, ge=1, le=5)
    ingest_max_bytes: int = Field(
        default=4 * 1024**3, gt=0, description="bound of the INGEST and SEALED streams"
    )
    blob_max_bytes: int = Field(
        default=8 * 1024**3, gt=0, description="bound of each of the two blob buckets"
    )
    dlq_max_age: float = Field(
        default=30 * 24 * 3600.0,
        gt=0,
        description="seconds a dead letter is kept before JetStream removes it",
    )
    dlq_max_bytes: int = Field(
        default=1024**3,
        gt=0,
        description="bound of the DLQ stream (discard new: a full DLQ holds the stage's "
        "message instead of losing a letter)",
    )
    duplicate_window: float = Field(default=120.0, gt=0)
    blob_sweep_interval: float = Field(default=300.0, gt=0)
    blob_orphan_grace: float = Field(
        default=600.0, gt=0, description="age before an unreferenced blob is deleted"
    )


class KeySpec(Section):
    id: int = Field(ge=0, lt=2**32)
    path: Path


class EncryptionSettings(Section):
    master_key: KeySpec | None = None
    previous_keys: list[KeySpec] = Field(default_factory=list)
    signing_key: Path | None = Field(
        default=None,
        description="the encryptor's Ed25519 private key (PEM) signing every sealed message",
    )
    trusted_signing_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) whose signatures the store-writer accepts",
    )


class StorageBackend(StrEnum):
    LOCAL = "local"
    S3 = "s3"
    AZURE = "azure"
    GCS = "gcs"


class StorageSettings(Section):
    backend: StorageBackend = StorageBackend.LOCAL
    layout: Layout = Layout.FLAT
    lookup: Literal["index", "layout"] = Field(
        default="index",
        description="how `get` finds an object: through the index (over NATS), or by the "
        "name the layout computes from the SOP Instance UID (a hybrid edge, which has no "
        "index; flat and legacy layouts)",
    )
    root_path: str = ""
    local_path: Path | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_endpoint: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_allow_http: bool = False
    s3_virtual_hosted_style: bool = Field(
        default=False, description="bucket in the host name instead of the path"
    )
    s3_storage_class: str | None = Field(
        default=None, pattern=r"^[A-Z][A-Z0-9_]{1,63}$", description="e.g. STANDARD_IA"
    )
    azure_connection_string: SecretStr | None = None
    azure_account_name: str | None = None
    azure_account_key: SecretStr | None = None
    azure_container: str | None = Field(
        default=None, max_length=63, pattern=r"^[a-z0-9](?:-?[a-z0-9]){2,62}$"
    )
    azure_endpoint: str | None = Field(
        default=None, pattern=r"^https?://", description="blob endpoint, e.g. Azurite's"
    )
    azure_create_container: bool = False
    gcs_bucket: str | None = None
    gcs_service_account_file: Path | None = None
    gcs_endpoint: str | None = Field(
        default=None, pattern=r"^https?://", description="base URL, e.g. an emulator's"
    )
    connect_timeout: float = Field(default=10.0, gt=0)
    request_timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    multipart_chunk_size: int = Field(
        default=8 * 1024**2, ge=5 * 1024**2, description="part size of multipart uploads"
    )
    multipart_concurrency: int = Field(default=4, ge=1, le=64)

    @field_validator("root_path")
    @classmethod
    def _root(cls, value: str) -> str:
        try:
            return normalize_root_path(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc


class ConsumerSettings(Section):
    concurrency: int = Field(default=4, ge=1, le=256)
    batch: int = Field(
        default=16,
        ge=1,
        le=256,
        description="messages fetched at once by each of the concurrency workers of a stage "
        "that works batches (encryptor, store-writer), handled together",
    )
    max_inflight_bytes: int = Field(
        default=256 * 1024**2,
        gt=0,
        description="byte budget of the bodies handled at once; more waits its turn",
    )
    max_deliver: int = Field(default=10, ge=2)
    ack_wait: float = Field(default=30.0, gt=1)
    backoff_initial: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)
    outage_grace: float = Field(
        default=30.0,
        ge=0,
        description="seconds a NATS or storage failure is retried in place, the message "
        "kept, before it counts as a failed delivery",
    )


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or "\\" in stripped:
        raise ValueError(f"{value!r} is not an AE title (1 to 16 characters, no backslash)")
    if any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in stripped):
        raise ValueError(f"{value!r} is not an AE title (printable ASCII only)")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae)]
"""An AE title: 1 to 16 printable ASCII characters, no backslash; surrounding spaces dropped."""


class DicomTlsSettings(Section):
    """DICOM TLS of the gateway (``[scp.tls]``): TLS 1.2 or 1.3 with AEAD ciphers only.

    ``client_aes`` maps a client-certificate identity (its subject CN or a SAN DNS name)
    to the calling AE titles that certificate may use; when it is set, a certificate
    it does not name, or a calling AE not listed for it, is rejected.
    """

    enabled: bool = False
    port: int = Field(default=2762, ge=0, lt=65536, description="2762: the DICOM-TLS port")
    plain_listener: bool = Field(
        default=True, description="also listen without TLS on scp.port; false: TLS only"
    )
    cert_file: Path | None = Field(default=None, description="PEM server certificate (chain)")
    key_file: Path | None = Field(default=None, description="PEM private key, unencrypted")
    ca_file: Path | None = Field(default=None, description="PEM CAs that sign client certs")
    require_client_cert: bool = False
    client_aes: dict[str, list[AETitle]] = Field(default_factory=dict)
    handshake_timeout: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> DicomTlsSettings:
        if not self.enabled:
            if not self.plain_listener:
                raise ValueError("tls.plain_listener = false needs tls.enabled = true")
            return self
        if self.cert_file is None or self.key_file is None:
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file (the clients' CA)")
        if self.client_aes and not self.require_client_cert:
            raise ValueError("tls.client_aes needs tls.require_client_cert = true")
        return self


class DestinationTlsSettings(Section):
    """DICOM TLS to a destination (``[scu.destinations.<name>.tls]``); the peer's
    certificate is always verified, against ``ca_file`` (default: the system's CAs).
    """

    ca_file: Path | None = None
    cert_file: Path | None = Field(default=None, description="client certificate, if asked")
    key_file: Path | None = None
    server_name: str | None = Field(
        default=None, min_length=1, description="name the peer's certificate must carry"
    )
    check_hostname: bool = Field(
        default=True, description="false: any name, chain still verified (logged loudly)"
    )

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self


class ServiceSettings(BaseSettings):
    """What every service has: NATS, logging, telemetry (metrics port, probes, traces)."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMFLOW_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    nats: NatsSettings = Field(default_factory=NatsSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="the service's event loop: uvloop (less CPU per message) or asyncio's own",
    )
    spool_dir: Path | None = Field(
        default=None, description="folder for private scratch files (default: system temp)"
    )
    telemetry: TelemetrySettings = Field(default_factory=lambda: TelemetrySettings())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


class TelemetrySettings(Section):
    """Metrics and probes over HTTP, and traces (exported only when configured)."""

    metrics_host: str = "0.0.0.0"  # noqa: S104  (Prometheus and the kubelet scrape the pod IP)
    metrics_port: int = Field(
        default=9090, ge=0, lt=65536, description="/metrics, /livez, /readyz; 0 picks a free port"
    )
    readiness_interval: float = Field(
        default=3.0, gt=0, description="seconds between readiness checks (results are cached)"
    )
    traces: Literal["off", "otlp", "jsonl"] = "off"
    otlp_endpoint: str = Field(
        default="http://127.0.0.1:4318/v1/traces", pattern=r"^https?://", description="OTLP/HTTP"
    )
    traces_path: Path | None = Field(
        default=None, description="folder of <service>.jsonl span files (traces = jsonl)"
    )


ServiceSettings.model_rebuild()  # resolves the TelemetrySettings reference above


class ReaderSettings(ServiceSettings):
    """What the read-side commands (`ls`, `get`, `verify`) need."""

    storage: StorageSettings = Field(default_factory=StorageSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from overrides, environment and the config file, or raise ConfigError."""
    path = config_file or _env_config_file()
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    bound = type(cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": path}})
    try:
        settings: S = bound(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return settings


def _env_config_file() -> Path | None:
    value = os.environ.get(CONFIG_ENV)
    return Path(value) if value else None


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" (config file {path} or DICOMFLOW_* environment)" if path else ""
    return f"invalid settings{where}: {problems(exc)}"


def problems(exc: ValidationError) -> str:
    """Each failed field as ``dotted.path: message``, without the rejected values."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)
    )
