"""The scp-gateway's own metrics: C-STORE responses, associations, DICOM TLS handshakes.

Declared here, registered in the service's registry through ``Metrics.own``
(``of(metrics)``): labels are status classes and calling-AE classes, never AE titles.
"""

from __future__ import annotations

from dicomflow.shared.telemetry.metrics import LATENCY_BUCKETS, NAMESPACE, Metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CSTORE_STATUSES = ("success", "out_of_resources", "does_not_match", "cannot_understand")
CALLING_AE_CLASSES = ("allowed", "not_allowed", "any")
SCP_ASSOCIATION_RESULTS = ("accepted", "rejected", "aborted")


class ScpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.cstore = Counter(
            "cstore_responses",
            "C-STORE responses of the gateway by status class and calling-AE class.",
            ["status", "calling_ae"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.cstore_seconds = Histogram(
            "cstore_seconds",
            "From the received dataset to the C-STORE response (publish included).",
            ["status"],
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.cstore_bytes = Counter(
            "cstore_bytes",
            "Bytes of the datasets answered Success.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.scp_associations = Counter(
            "scp_associations",
            "Associations requested of the gateway, by result and calling-AE class.",
            ["result", "calling_ae"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.scp_associations_active = Gauge(
            "scp_associations_active",
            "Associations open on the gateway now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.scp_tls_handshakes = Counter(
            "scp_tls_handshakes",
            "DICOM TLS handshakes on the gateway: ok, or the kind of refusal.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
        )

    def at_zero(self, accept_any: bool) -> None:
        classes = ("any",) if accept_any else ("allowed",)
        for status in CSTORE_STATUSES:
            self.cstore_seconds.labels(status)
            for calling in classes:
                self.cstore.labels(status, calling)
        for result in SCP_ASSOCIATION_RESULTS:
            for calling in (*classes, "not_allowed"):
                self.scp_associations.labels(result, calling)

    def tls_at_zero(self, refusal_kinds: tuple[str, ...]) -> None:
        for outcome in ("ok", *refusal_kinds):
            self.scp_tls_handshakes.labels(outcome)


def of(metrics: Metrics) -> ScpMetrics:
    """The scp-gateway's metrics in ``metrics``' registry (created on first use)."""
    return metrics.own(ScpMetrics)
