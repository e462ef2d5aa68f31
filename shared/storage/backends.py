"""Building the configured ``obstore`` store: local folder, S3, Azure Blob or GCS.

Every backend gets the same timeouts and retry policy, and every problem found here is
a ``ConfigError`` that names the ``storage.*`` field to fix. Credentials are read from
``SecretStr`` fields only at the moment the store is built and never appear in an
error message or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import StorageBackend, StorageSettings
from dicomflow.shared.storage import azurecontainer
from obstore.exceptions import BaseError
from obstore.store import AzureStore, GCSStore, LocalStore, ObjectStore, S3Store

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig


def build(settings: StorageSettings) -> ObjectStore:
    match settings.backend:
        case StorageBackend.LOCAL:
            return _local(settings)
        case StorageBackend.S3:
            return _s3(settings)
        case StorageBackend.AZURE:
            return _azure(settings)
        case StorageBackend.GCS:
            return _gcs(settings)


def _retry(settings: StorageSettings) -> RetryConfig:
    return {
        "max_retries": settings.max_retries,
        "retry_timeout": timedelta(seconds=settings.request_timeout * 2),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }


def _client(settings: StorageSettings, *, allow_http: bool) -> ClientConfig:
    return {
        "allow_http": allow_http,
        "timeout": timedelta(seconds=settings.request_timeout),
        "connect_timeout": timedelta(seconds=settings.connect_timeout),
    }


def _local(settings: StorageSettings) -> ObjectStore:
    if settings.local_path is None:
        raise ConfigError("storage.local_path must be set for the local backend")
    try:
        settings.local_path.mkdir(parents=True, exist_ok=True)
        return LocalStore(settings.local_path, mkdir=True)
    except (OSError, BaseError) as exc:
        raise ConfigError(f"storage.local_path {settings.local_path}: {exc}") from exc


def _s3(settings: StorageSettings) -> ObjectStore:
    if not settings.s3_bucket:
        raise ConfigError("storage.s3_bucket must be set for the s3 backend")
    credentials: dict[str, str] = {}
    if settings.s3_access_key_id or settings.s3_secret_access_key:
        if not (settings.s3_access_key_id and settings.s3_secret_access_key):
            raise ConfigError(
                "storage.s3_access_key_id and storage.s3_secret_access_key go together: "
                "set both, or neither to use the default credential chain"
            )
        credentials = {
            "access_key_id": settings.s3_access_key_id,
            "secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
    endpoint = settings.s3_endpoint
    if endpoint and endpoint.startswith("http://") and not settings.s3_allow_http:
        raise ConfigError(
            "storage.s3_endpoint is plain http://: set storage.s3_allow_http = true to allow it"
        )
    config: dict[str, Any] = {
        "region": settings.s3_region,
        "virtual_hosted_style_request": settings.s3_virtual_hosted_style,
        **credentials,
    }
    if endpoint:
        config["endpoint"] = endpoint
    return _make(
        "s3",
        lambda: S3Store(
            settings.s3_bucket,
            config=config,  # type: ignore[arg-type]
            client_options=_client(settings, allow_http=settings.s3_allow_http),
            retry_config=_retry(settings),
        ),
    )


@dataclass(frozen=True)
class AzureAccount:
    """Where and as whom to reach Blob storage, from a connection string or fields."""

    name: str
    key: str = ""
    sas: str = ""
    endpoint: str = ""

    def __repr__(self) -> str:
        return f"AzureAccount(name={self.name!r}, endpoint={self.endpoint!r}, secrets hidden)"


def parse_connection_string(text: str) -> AzureAccount:
    """``AccountName=..;AccountKey=..;BlobEndpoint=..`` as the Azure portal shows it.

    Errors name the missing part, never quote the string (it holds the key).
    """
    parts: dict[str, str] = {}
    for item in text.strip().strip(";").split(";"):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                "storage.azure_connection_string is malformed: expected Name=Value pairs "
                "separated by ';' (as the Azure portal shows it)"
            )
        parts[name.strip().lower()] = value.strip()
    account = parts.get("accountname", "")
    if not account:
        raise ConfigError("storage.azure_connection_string has no AccountName")
    endpoint = parts.get("blobendpoint", "")
    if not endpoint:
        protocol = parts.get("defaultendpointsprotocol", "https")
        suffix = parts.get("endpointsuffix", "core.windows.net")
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    key, sas = parts.get("accountkey", ""), parts.get("sharedaccesssignature", "")
    if not key and not sas:
        raise ConfigError(
            "storage.azure_connection_string has neither AccountKey nor SharedAccessSignature"
        )
    return AzureAccount(account, key=key, sas=sas.lstrip("?"), endpoint=endpoint.rstrip("/"))


def _azure_account(settings: StorageSettings) -> AzureAccount:
    if settings.azure_connection_string is not None:
        if settings.azure_account_name or settings.azure_account_key:
            raise ConfigError(
                "storage.azure_connection_string and storage.azure_account_name/"
                "azure_account_key exclude each other: set one or the other"
            )
        account = parse_connection_string(settings.azure_connection_string.get_secret_value())
        if settings.azure_endpoint:
            account = AzureAccount(account.name, account.key, account.sas, settings.azure_endpoint)
        return account
    if not settings.azure_account_name:
        raise ConfigError(
            "storage.azure_account_name (with storage.azure_account_key) or "
            "storage.azure_connection_string must be set for the azure backend"
        )
    if settings.azure_account_key is None:
        raise ConfigError("storage.azure_account_key must be set with storage.azure_account_name")
    return AzureAccount(
        settings.azure_account_name,
        key=settings.azure_account_key.get_secret_value(),
        endpoint=(settings.azure_endpoint or "").rstrip("/"),
    )


def _azure(settings: StorageSettings) -> ObjectStore:
    if not settings.azure_container:
        raise ConfigError("storage.azure_container must be set for the azure backend")
    account = _azure_account(settings)
    config: dict[str, Any] = {"account_name": account.name}
    if account.key:
        config["account_key"] = account.key
    else:
        config["sas_key"] = account.sas
    if account.endpoint:
        config["endpoint"] = account.endpoint
    allow_http = account.endpoint.startswith("http://")
    store = _make(
        "azure",
        lambda: AzureStore(
            settings.azure_container,
            config=config,  # type: ignore[arg-type]
            client_options=_client(settings, allow_http=allow_http),
            retry_config=_retry(settings),
        ),
    )
    if settings.azure_create_container:
        azurecontainer.create_if_missing(
            endpoint=account.endpoint or f"https://{account.name}.blob.core.windows.net",
            account=account.name,
            key=account.key,
            sas=account.sas,
            container=settings.azure_container,
            timeout=settings.connect_timeout + settings.request_timeout,
        )
    return store


def _gcs(settings: StorageSettings) -> ObjectStore:
    if not settings.gcs_bucket:
        raise ConfigError("storage.gcs_bucket must be set for the gcs backend")
    config: dict[str, Any] = {}
    path = settings.gcs_service_account_file
    if path is not None:
        if not path.is_file():
            raise ConfigError(
                f"storage.gcs_service_account_file {path} does not exist or is not a file"
            )
        config["service_account"] = str(path)
    if settings.gcs_endpoint:
        config["base_url"] = settings.gcs_endpoint.rstrip("/")
    allow_http = bool(settings.gcs_endpoint and settings.gcs_endpoint.startswith("http://"))
    return _make(
        "gcs",
        lambda: GCSStore(
            settings.gcs_bucket,
            config=config,  # type: ignore[arg-type]
            client_options=_client(settings, allow_http=allow_http),
            retry_config=_retry(settings),
        ),
    )


def _make(backend: str, factory: Any) -> ObjectStore:
    """Call ``factory``; obstore's own errors (e.g. unreadable credentials) become ConfigError.

    Only the error's type and first line are kept: obstore may quote what it parsed.
    """
    try:
        store: ObjectStore = factory()
    except BaseError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"storage.backend {backend}: cannot configure the store: {first}"
        ) from exc
    return store
