"""The Prometheus metrics of one service, in a registry of its own.

``Metrics`` is created by the service runner and passed down; nothing registers in
prometheus_client's default registry. Every label comes from a small fixed set: a
stage, an outcome, a DIMSE status class, a calling-AE class (allowed, not allowed, any:
never the AE title), a storage operation, or a destination name from the configuration.
What every consumer stage counts (and storage, readiness) is declared here; what one
service counts is declared in its folder (``scp_gateway.metrics``,
``scu_gateway.metrics``) and registered here through ``Metrics.own``.
UIDs and patient data never become labels. Label combinations known in advance are
created at zero, so that rates and error panels show 0 rather than no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dicomflow.shared import patches
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

NAMESPACE = "dicomflow"
T = TypeVar("T")

# Seconds: from a small inline instance (milliseconds) to a large object (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

CONSUMER_OUTCOMES = ("ack", "nak", "dead_letter")
DEAD_LETTER_KINDS = ("permanent", "exhausted")
STORAGE_OPERATIONS = ("put", "compare", "probe")
STORAGE_OUTCOMES = ("ok", "error")


class FastpathGauge(Collector):
    """``dicomflow_fastpath_active{patch}``: 1 for each patch of a dependency's internals
    that is on in this process, 0 for one its fence turned off (another version than it
    was verified on). Read from ``shared.patches`` at each scrape: the patches are the
    process's, decided as the service starts; one the service never uses has no series."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            f"{NAMESPACE}_fastpath_active",
            "1 while a patch of a dependency's internals is on; 0 when its version fence "
            "turned it off.",
            labels=["patch"],
        )
        for patch, active in sorted(patches.states().items()):
            family.add_metric([patch], 1.0 if active else 0.0)
        yield family


class Metrics:
    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # -- every consumer stage (shared.consumer) --------------------------------------
        self.instances = Counter(
            "instances",
            "Messages handled, by stage and outcome (ack, nak, dead_letter).",
            ["stage", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.bytes = Counter(
            "bytes",
            "Body bytes handled (declared size), by stage and outcome.",
            ["stage", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.handle_seconds = Histogram(
            "handle_seconds",
            "Time to handle one message, queueing for the byte budget included.",
            ["stage", "outcome"],
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.outage_retries = Counter(
            "outage_retries",
            "Handler runs tried again in place after a NATS or storage failure.",
            ["stage"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.redeliveries = Counter(
            "redeliveries",
            "Messages received again (JetStream delivery count above 1).",
            ["stage"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.dead_letters = Counter(
            "dead_letters",
            "Messages dead-lettered: permanent failure or retries exhausted.",
            ["stage", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.consumer_pending = Gauge(
            "consumer_pending",
            "Messages not yet delivered to the stage's durable consumer.",
            ["stage"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "consumer_ack_pending",
            "Messages delivered to the stage and not yet acknowledged.",
            ["stage"],
            namespace=NAMESPACE,
            registry=r,
        )
        # -- storage and readiness -------------------------------------------------------
        self.storage_seconds = Histogram(
            "storage_request_seconds",
            "Object storage requests by operation and outcome.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.check_ok = Gauge(
            "check_ok",
            "1 while a readiness check passes (nats, storage, started), else 0.",
            ["service", "check"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.ready = Gauge(
            "ready",
            "1 while the service reports ready.",
            ["service"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.ready.labels(service)
        # -- patches of dependencies' internals (shared.patches) --------------------------
        r.register(FastpathGauge())
        self._owned: dict[Callable[[CollectorRegistry], Any], Any] = {}

    def own(self, declare: Callable[[CollectorRegistry], T]) -> T:
        """The metrics a service declares in its own module (``declare``: e.g. the
        scp-gateway's ``GatewayMetrics``), registered in this registry on first use and
        the same object after: every part of the service counts into one set."""
        if declare not in self._owned:
            self._owned[declare] = declare(self.registry)
        owned: T = self._owned[declare]
        return owned

    # -- label sets created at zero ---------------------------------------------------------
    def consumer_stage(self, stage: str) -> None:
        for outcome in CONSUMER_OUTCOMES:
            self.instances.labels(stage, outcome)
            self.bytes.labels(stage, outcome)
            self.handle_seconds.labels(stage, outcome)
        for kind in DEAD_LETTER_KINDS:
            self.dead_letters.labels(stage, kind)
        self.redeliveries.labels(stage)
        self.outage_retries.labels(stage)
        self.consumer_pending.labels(stage)
        self.consumer_ack_pending.labels(stage)

    def storage(self) -> None:
        for operation in STORAGE_OPERATIONS:
            for outcome in STORAGE_OUTCOMES:
                self.storage_seconds.labels(operation, outcome)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
