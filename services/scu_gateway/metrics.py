"""The scu-gateway's own metrics: deliveries and associations by destination, and
whether each destination is up.

Declared here, registered in the service's registry through ``Metrics.own``
(``of(metrics)``): the destination label is a name from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable

from dicomflow.shared.telemetry.metrics import NAMESPACE, Metrics
from prometheus_client import CollectorRegistry, Counter, Gauge

SCU_ASSOCIATION_RESULTS = ("opened", "rejected", "failed")
DELIVERY_OUTCOMES = ("delivered", "deferred", "refused")


class ScuMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.deliveries = Counter(
            "deliveries",
            "Delivery attempts by destination and outcome (delivered, deferred, refused).",
            ["destination", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.scu_associations = Counter(
            "scu_associations",
            "Associations to destinations, by result (opened, rejected, failed).",
            ["destination", "result"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.scu_associations_open = Gauge(
            "scu_associations_open",
            "Associations open to a destination now.",
            ["destination"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.scu_destination_up = Gauge(
            "scu_destination_up",
            "1 while a destination is reachable; 0 while its deliveries are held.",
            ["destination"],
            namespace=NAMESPACE,
            registry=r,
        )

    def destination_at_zero(self, name: str, open_count: Callable[[], int]) -> None:
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(name, outcome)
        for result in SCU_ASSOCIATION_RESULTS:
            self.scu_associations.labels(name, result)
        self.scu_associations_open.labels(name).set_function(open_count)


def of(metrics: Metrics) -> ScuMetrics:
    """The scu-gateway's metrics in ``metrics``' registry (created on first use)."""
    return metrics.own(ScuMetrics)
