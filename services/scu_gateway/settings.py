"""The scu-gateway's settings: the ``[scu]`` table (destinations and routing rules),
on top of what every service has (``shared.settings.ServiceSettings``). `dicomflow
send`, `dlq`, `up`, `edge` and `cloud` read it too (the destinations they name).
"""

from __future__ import annotations

import re

from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats.zones import check_site
from dicomflow.shared.settings import (
    AETitle,
    ConsumerSettings,
    DestinationTlsSettings,
    EncryptionSettings,
    NatsSettings,
    Section,
    ServiceSettings,
    StorageSettings,
)
from pydantic import Field, field_validator, model_validator

_DESTINATION_NAME = r"^[A-Za-z0-9_-]{1,32}$"  # a subject token and a consumer name as is
_UID_PATTERN = r"^[0-9.*?\[\]!-]{1,64}$"  # fnmatch over a UID: digits, dots, wildcards


class DestinationSettings(Section):
    """A remote AE the scu_gateway delivers to, over DICOM TLS when ``tls`` is set.

    ``site``: the destination is at that site of the hybrid edge; its requests wait on
    ``dicomflow.deliver.<site>.<name>``. In the cloud it is named without host and port
    (the router and `send` queue for it; the site's scu-gateway delivers); at the site,
    with them.
    """

    ae_title: AETitle = Field(min_length=1, max_length=16)
    host: str = Field(default="", description="empty: delivered at its site, not here")
    port: int = Field(default=0, ge=0, lt=65536)
    site: str | None = Field(default=None, description="the hybrid edge's site it is at")
    max_associations: int = Field(default=2, ge=1, le=64)
    transfer_syntaxes: list[str] = Field(
        default_factory=list,
        description="syntaxes the peer accepts (empty: any); instances are never transcoded",
    )
    connect_timeout: float = Field(default=10.0, gt=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    idle_timeout: float = Field(default=15.0, gt=0, description="close an unused association")
    echo_interval: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds between C-ECHO probes while the destination cannot be reached",
    )
    maximum_pdu_size: int = Field(default=0, ge=0, description="0 means no limit")
    max_deliver: int | None = Field(default=None, ge=2, description="default: consumer's")
    backoff_max: float | None = Field(default=None, gt=0, description="default: consumer's")
    tls: DestinationTlsSettings | None = None

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) or len(value) > 64:
                raise ValueError(f"{value!r} is not a transfer syntax UID")
        return values

    @field_validator("site")
    @classmethod
    def _site(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_site(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _where(self) -> DestinationSettings:
        if self.delivered_here and self.port == 0:
            raise ValueError("port: 1 to 65535 (a destination with a host)")
        if not self.delivered_here and (self.port or self.site is None):
            raise ValueError(
                "host is required, unless the destination is at a site of the hybrid edge "
                "(site = NAME, and no host or port: that site's scu-gateway delivers)"
            )
        return self

    @property
    def delivered_here(self) -> bool:
        """Whether this scu-gateway sends to it (false: only queued, for its site)."""
        return bool(self.host)


class RuleSettings(Section):
    """Instances whose attributes match every pattern go to every listed destination.

    Patterns are shell-style (``fnmatch``: ``*``, ``?``, ``[...]``); AE titles and
    Modality are compared case-insensitively, UIDs exactly.

    ``relay``: route the instance as soon as it is sealed, before storage, carrying the
    sealed bytes to the destination's queue (the scu-gateway then needs no storage
    read); an instance too large to travel inline is routed once stored instead.
    """

    destinations: list[str] = Field(min_length=1)
    relay: bool = False
    called_ae: str = "*"
    calling_ae: str = "*"
    modality: str = "*"
    sop_class_uid: str = Field(default="*", pattern=_UID_PATTERN)
    study_uid: str = Field(default="*", pattern=_UID_PATTERN)
    series_uid: str = Field(default="*", pattern=_UID_PATTERN)


class ScuSettings(Section):
    ae_title: AETitle = Field(default="DICOMFLOW", min_length=1, max_length=16)
    destinations: dict[str, DestinationSettings] = Field(default_factory=dict)
    rules: list[RuleSettings] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _names(cls, values: dict[str, DestinationSettings]) -> dict[str, DestinationSettings]:
        for name in values:
            if not re.fullmatch(_DESTINATION_NAME, name):
                raise ValueError(
                    f"destination name {name!r}: 1 to 32 characters of A-Z a-z 0-9 _ -"
                )
        return values

    @model_validator(mode="after")
    def _rules_name_destinations(self) -> ScuSettings:
        for i, rule in enumerate(self.rules):
            for name in rule.destinations:
                if name not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none configured"
                    raise ValueError(
                        f"rules[{i}].destinations: unknown destination {name!r} (known: {known})"
                    )
        return self


class ScuGatewaySettings(ServiceSettings):
    scu: ScuSettings = Field(default_factory=ScuSettings)
    # Hybrid edge: the EDGE account's connection, where the site's DELIVERY (sourced from
    # the cloud) is; ``nats`` is then the LOCAL one (key check values, dead letters).
    nats_sealed: NatsSettings | None = None
    storage: StorageSettings = Field(default_factory=StorageSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
