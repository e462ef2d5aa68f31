"""The scu_gateway stage: routes instances and delivers them to DICOM peers.

Three kinds of durable consumers run in one process:

- ``scu-router`` on EVENTS (only when rules are configured): for each event, the
  destinations of the matching rules each get a delivery request on DELIVERY
  (``dicomflow.deliver.<destination>``), de-duplicated by message id; the event is
  acked once every request is acknowledged. Created with "deliver all", so events
  stored before the first start are routed too.
- ``scu-relay`` on SEALED (only when a rule has ``relay = true``): each sealed
  instance the relay rules match is queued for its destinations before storage, the
  request carrying the sealed bytes (``routing``). With no relay rule the consumer is
  removed at start, since SEALED keeps every message until each consumer acked it.
- ``deliver-<destination>`` on DELIVERY, one per destination, with ``max_associations``
  workers: each request is read from storage, decrypted, verified and sent with
  C-STORE over a reused association; transient failures are retried with backoff,
  refusals dead-lettered with the DICOM status (``shared.disposition``). While the
  destination cannot be reached its consumer fetches nothing (``health``): an outage
  of any length spends no retries, and C-ECHO probes tell when to resume.

Queued requests survive rule changes and restarts: they wait on DELIVERY until their
destination's consumer takes them.

Hybrid edge. A destination at a site (``site = NAME``) is addressed as
``dicomflow.deliver.<site>.<destination>``. In the cloud it has no host or port: the
router and `send` only queue for it, and the cloud's ``downlink-<site>`` durable carries
the requests over the site's leafnode link (the site's DELIVERY sources them). A cloud
scu-gateway whose destinations are all at sites holds no master key and reads no storage.
At the site (``nats_sealed`` set) the scu-gateway consumes the EDGE account's DELIVERY,
reads storage directly, decrypts with the site's master key and dead-letters into the
LOCAL account's DLQ; routing rules run in the cloud, never there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from dicomflow.scu_gateway import metrics as scu_metrics
from dicomflow.scu_gateway import pdata, response
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.delivery import Deliverer
from dicomflow.scu_gateway.health import DestinationHealth
from dicomflow.scu_gateway.routing import Router
from dicomflow.scu_gateway.settings import DestinationSettings, ScuGatewaySettings
from dicomflow.shared.contracts import deliveries, messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.crypto import keycheck
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.errors import ConfigError, PermanentError
from dicomflow.shared.patches import reactors
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import bootstrap, delivery
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery, Handler
from dicomflow.shared.storage import objectstore
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.metrics import Metrics
from dicomflow.shared.telemetry.tracing import Tracing
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pynetdicom import _config as pynetdicom_config

log = logging.getLogger(__name__)

STAGE = "scu-gateway"
ROUTER_STAGE = "scu-router"
RELAY_STAGE = "scu-relay"
REAP_INTERVAL = 1.0


class Routing:
    """The handlers of the router (stored instances) and relay (sealed) consumers."""

    def __init__(
        self,
        js: JetStreamContext,
        router: Router,
        publish_timeout: float,
        tracing: Tracing,
        sites: dict[str, str | None] | None = None,
    ) -> None:
        self._js = js
        self._router = router
        self._timeout = publish_timeout
        self._tracing = tracing
        self._sites = sites or {}  # destination -> its site of the hybrid edge, if any

    async def handle(self, delivery: Delivery[Msg]) -> AfterAck | None:
        msg = delivery.record  # EVENTS: the event's contract is checked here
        instance = self._tracing.propagate(messages.parse(msg.headers, sealed=True))
        object_key = deliveries.object_key_of(msg.headers)
        relayed = (msg.headers or {}).get(messages.H_SEALED_BODY) == BodyKind.INLINE.value
        for destination in self._router.destinations(instance, relayed=relayed):
            req = deliveries.DeliveryRequest(instance, object_key, destination)
            await deliveries.publish(
                self._js, req, self._timeout, site=self._sites.get(destination)
            )
        return None

    async def relay(self, delivery: Delivery[Instance]) -> AfterAck | None:
        """Queue a sealed instance for the relay rules' destinations, its sealed bytes
        as the request's body (the consumer checked them against the headers: their
        length and A1 prefix; the deliverer checks the GCM tag and the digest). The
        request carries no signature: it is the store-writer's to check."""
        msg = delivery.message
        instance = self._tracing.propagate(delivery.record.signed("", ""))
        if instance.body is BodyKind.BLOB:
            return None  # too large to travel inline: routed once stored (its event says so)
        for destination in self._router.relay_destinations(instance):
            req = deliveries.DeliveryRequest(instance, "", destination, relayed=True)
            await deliveries.publish(
                self._js, req, self._timeout, body=msg.data, site=self._sites.get(destination)
            )
        return None


MsgHandler = Callable[[Msg], Awaitable[AfterAck | None]]


def counted(handler: MsgHandler, destination: str, metrics: Metrics) -> Handler[Msg]:
    """``handler`` counting each attempt's outcome for ``destination``: delivered,
    deferred (retried later) or refused (permanent: dead-lettered)."""

    async def handle(delivery: Delivery[Msg]) -> AfterAck | None:
        try:
            after_ack = await handler(delivery.record)
        except PermanentError:
            scu_metrics.of(metrics).deliveries.labels(destination, "refused").inc()
            raise
        except Exception:
            scu_metrics.of(metrics).deliveries.labels(destination, "deferred").inc()
            raise
        scu_metrics.of(metrics).deliveries.labels(destination, "delivered").inc()
        return after_ack

    return handle


def up_gauge(metrics: Metrics, destination: str) -> Callable[[bool], None]:
    """Sets ``dicomflow_scu_destination_up`` for ``destination``."""
    gauge = scu_metrics.of(metrics).scu_destination_up.labels(destination)
    return lambda up: gauge.set(1 if up else 0)


WORKERS_PER_ASSOCIATION = 4
MAX_WORKERS = 256  # ConsumerSettings.concurrency's bound


def delivery_consumer(base: ConsumerSettings, dest: DestinationSettings) -> ConsumerSettings:
    """Four workers per association: while one's instance is on the wire, the others
    fetch, decrypt and ack, so a sender thread finds the next instance ready when the
    peer answers even when a NATS round trip is slow; Deliverer's max_associations
    sender threads send them. The destination may stretch the retry budget."""
    workers = min(WORKERS_PER_ASSOCIATION * dest.max_associations, MAX_WORKERS)
    update: dict[str, object] = {"concurrency": workers}
    if dest.max_deliver is not None:
        update["max_deliver"] = dest.max_deliver
    if dest.backoff_max is not None:
        update["backoff_max"] = dest.backoff_max
    return base.model_copy(update=update)


async def serve(settings: ScuGatewaySettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    scu = settings.scu
    if not scu.destinations:
        raise ConfigError(
            "scu.destinations is empty: configure at least one [scu.destinations.NAME] "
            "with ae_title, host and port"
        )
    at_edge = settings.nats_sealed is not None
    if at_edge and scu.rules:
        raise ConfigError(
            "scu.rules at a site of the hybrid edge: routing rules run in the cloud (its "
            "scu-gateway queues for destinations with site = NAME); remove them here"
        )
    here = {name: dest for name, dest in scu.destinations.items() if dest.delivered_here}
    # Only a scu-gateway that delivers holds a master key and reads storage.
    keyring = load_keyring(settings.encryption) if here else None
    store = objectstore.build_store(settings.storage) if here else None
    router = Router.from_settings(scu)
    reactors.install()  # responses and pauses without waiting out pynetdicom's polls
    # Requests written to the socket, responses decoded here: per association, when on.
    pdata.FENCE.install()
    response.FENCE.install()
    # Send each file's encoded dataset as stored, in PDU-sized chunks: no decoding,
    # byte-identical on the wire, memory independent of the object's size.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    pools = {
        name: AssociationPool(name, dest, scu.ae_title, telemetry.metrics)
        for name, dest in here.items()
    }
    health = {
        name: DestinationHealth(
            pool.where,
            pool.echo,
            scu.destinations[name].echo_interval,
            on_change=up_gauge(telemetry.metrics, name),
        )
        for name, pool in pools.items()
    }
    if store is not None:
        telemetry.readiness.add_storage(store, settings.storage.root_path)
    wiring = await bootstrap.wire(STAGE, settings, stop, telemetry)
    tasks: list[asyncio.Task[None]] = []
    deliverers: list[Deliverer] = []
    try:
        js = wiring.js
        if keyring is not None:
            await keycheck.check(js, keyring)  # refuses a key file that is not its id's key
        delivery_link = wiring.main
        if settings.nats_sealed is not None:  # the site's DELIVERY is in its EDGE account
            delivery_link = await wiring.connect(settings.nats_sealed, "sealed")
        consumers: list[Consumer[Msg] | Consumer[Instance]] = []
        sites = {name: dest.site for name, dest in scu.destinations.items()}
        routing = Routing(js, router, settings.nats.publish_timeout, telemetry.tracing, sites)
        if at_edge:
            pass  # no SEALED relay, no EVENTS at a site: the cloud routes
        elif router.relays:
            consumers.append(
                await wiring.consumer(
                    stage=RELAY_STAGE,
                    stream=subjects.SEALED_STREAM,
                    durable=subjects.RELAY_DURABLE,
                    decoder=delivery.sealed(wiring.transport),
                    handler=delivery.one_at_a_time(routing.relay),
                )
            )
        else:
            await _drop_relay(js)
        if len(router):
            consumers.append(
                await wiring.consumer(
                    stage=ROUTER_STAGE,
                    stream=subjects.EVENTS_STREAM,
                    durable=subjects.ROUTER_DURABLE,
                    filter_subject=f"{subjects.STORED_PREFIX}.>",
                    decoder=delivery.raw,
                    handler=delivery.one_at_a_time(routing.handle),
                )
            )
        if keyring is not None and store is not None:  # ``here`` is not empty
            for name, dest in here.items():
                durable = subjects.deliver_durable(name)
                deliverer = Deliverer(
                    name, dest, pools[name], store, keyring, settings.spool_dir, health[name]
                )
                deliverers.append(deliverer)
                consumers.append(
                    await wiring.consumer(
                        stage=durable,
                        stream=subjects.DELIVERY_STREAM,
                        durable=durable,
                        on=delivery_link,
                        filter_subject=subjects.deliver_subject(name, dest.site),
                        settings=delivery_consumer(settings.consumer, dest),
                        decoder=delivery.raw,  # the request's contract: checked by Deliverer
                        handler=delivery.one_at_a_time(
                            counted(deliverer.handle, name, telemetry.metrics)
                        ),
                        gate=health[name].wait_up,
                        dead_letters=js,
                    )
                )
        # The start-up C-ECHO: a destination that cannot be reached starts held.
        await asyncio.gather(*(h.check() for h in health.values()))
        tasks.append(asyncio.create_task(_reap(pools, stop)))
        telemetry.readiness.started()
        log.info(
            "scu-gateway ready: destinations %s; %d rule(s); calling AE %s",
            ", ".join(
                [pool.where for pool in pools.values()]
                + [f"{n} (at site {d.site})" for n, d in scu.destinations.items() if n not in here]
            ),
            len(router),
            scu.ae_title,
        )
        if consumers:
            await asyncio.gather(*(consumer.run(stop) for consumer in consumers))
        else:  # only `send` queues here (no rule, every destination at a site)
            await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for h in health.values():
            await h.close()
        for deliverer in deliverers:
            await asyncio.to_thread(deliverer.close)
        for pool in pools.values():
            await asyncio.to_thread(pool.close)
        await wiring.drain()


async def _drop_relay(js: JetStreamContext) -> None:
    """Remove the relay consumer a configuration with relay rules left: SEALED keeps
    each message until every consumer acked it, so an unused relay consumer would fill
    it and stop ingest. What it had not relayed yet is stored as usual."""
    try:
        info = await js.consumer_info(subjects.SEALED_STREAM, subjects.RELAY_DURABLE)
    except NotFoundError:
        return
    await js.delete_consumer(subjects.SEALED_STREAM, subjects.RELAY_DURABLE)
    log.warning(
        "no rule relays any more: removed the %s consumer of %s; %d sealed instance(s) "
        "it had not relayed yet are stored, and routed by the remaining rules, as usual",
        subjects.RELAY_DURABLE,
        subjects.SEALED_STREAM,
        (info.num_pending or 0) + (info.num_ack_pending or 0),
    )


async def _reap(pools: dict[str, AssociationPool], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=REAP_INTERVAL)
        for pool in pools.values():
            await asyncio.to_thread(pool.reap)
