"""docs/reliability.md's L1-L5 under faults, with a ledger-keeping sender (marker ``faults``).

Each scenario drives load from several parallel associations for ``DICOMFLOW_FAULT_MINUTES``
(short by default; ``scripts/faults`` runs them longer), injects its faults on a
schedule, waits for the pipeline to drain and fails on any lost, unexpected or
duplicated object, anything left in flight, or a dead letter that was not injected.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from faults.hybrid import HybridTarget, check_hybrid
from faults.scenario import Injector, PoisonMaker, kill_and_restart, run
from support.hybrid import Hybrid, stop
from support.linkproxy import LinkProxy
from support.natscluster import NatsCluster
from support.pipeline import Pipeline
from support.s3rver import S3rver
from support.servers import free_port, wait_for

pytestmark = [
    pytest.mark.faults,
    # pynetdicom 3.0.4 drops the socket of a refused connection without closing it
    # (transport.py, AssociationSocket.connect); the sender meets refusals whenever the
    # gateway is down, and each leaked socket would fail the test at garbage collection.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]


def _local(tmp_path: Path) -> dict[str, object]:
    return {"backend": "local", "local_path": tmp_path / "objects", "layout": "hierarchical"}


def test_kill9_of_each_service_and_nats_restart(tmp_path: Path, nats_server: NatsServer) -> None:
    pipeline = Pipeline(tmp_path / "p", nats_server, _local(tmp_path))

    def restart_nats() -> None:
        nats_server.kill()
        time.sleep(1.0)
        nats_server.start()  # same port, same store folder

    injector = Injector(
        [
            ("kill -9 encryptor", kill_and_restart(pipeline, "encryptor")),
            ("nats-server kill -9 and restart", restart_nats),
            ("kill -9 scp-gateway", kill_and_restart(pipeline, "scp-gateway")),
            ("kill -9 store-writer", kill_and_restart(pipeline, "store-writer")),
        ],
        every=2.0,
    )
    try:
        pipeline.start()
        report = run("kills", pipeline, tmp_path / "send", injector)
    finally:
        pipeline.stop()
    assert not report.problems, report.line() + "\n" + "\n".join(report.problems[:30])
    assert report.success > 0 and report.faults["nats-server kill -9 and restart"] >= 1


def test_cluster_node_stopped_and_restarted_under_load(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "cluster").start()
    node = 0

    def bounce() -> None:
        nonlocal node
        cluster.kill(node)
        time.sleep(2.0)
        cluster.restart(node)
        node = (node + 1) % len(cluster.nodes)  # one node, then another

    try:
        pipeline = Pipeline(
            tmp_path / "p",
            cluster.nodes[0],
            _local(tmp_path),
            extra={"nats": {"servers": cluster.urls, "stream_replicas": 3}},
        )
        injector = Injector([("cluster node kill -9 and restart", bounce)], every=3.0)
        try:
            # A fresh R3 cluster may still elect its leader: topology.ensure waits for it.
            pipeline.start(timeout=90)
            report = run("cluster", pipeline, tmp_path / "send", injector)
        finally:
            pipeline.stop()
    finally:
        cluster.stop()
    assert not report.problems, report.line() + "\n" + "\n".join(report.problems[:30])
    assert report.success > 0 and report.faults["cluster node kill -9 and restart"] >= 2


def test_s3_server_killed_and_restarted_mid_upload(tmp_path: Path, nats_server: NatsServer) -> None:
    s3 = S3rver(tmp_path / "s3", "faults").start()
    storage = {
        **s3.storage(),
        "multipart_chunk_size": 5 * 1024**2,
        "request_timeout": 20.0,
        "max_retries": 2,
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, storage)

    def bounce() -> None:
        s3.kill()  # uploads in flight are cut off, new ones refused
        time.sleep(1.5)
        s3.start()

    try:
        pipeline.start()
        injector = Injector([("s3 server kill -9 and restart", bounce)], every=4.0)
        try:
            # 1700 x 1700 x 16 bit: 5.5 MiB each, sealed in more than one 5 MiB part.
            report = run("s3", pipeline, tmp_path / "send", injector, workers=2, rows=1700)
        finally:
            pipeline.stop()
    finally:
        s3.stop()
    assert not report.problems, report.line() + "\n" + "\n".join(report.problems[:30])
    assert report.success > 0 and report.faults["s3 server kill -9 and restart"] >= 1


def test_handler_stalled_past_ack_wait_and_poison_messages(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    ack_wait = 3.0
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        _local(tmp_path),
        extra={"consumer": {"ack_wait": ack_wait}},
        more={"store-writer": 1, "encryptor": 1},
    )
    poison = PoisonMaker(pipeline, tmp_path / "poison")
    stall_targets = ["store-writer", "encryptor-2", "store-writer-2", "encryptor"]
    stalls = 0

    def stall() -> None:
        nonlocal stalls
        pid = pipeline.stages[stall_targets[stalls % len(stall_targets)]].pid
        assert pid is not None
        stalls += 1
        os.kill(pid, signal.SIGSTOP)  # holds its messages, sends no progress
        time.sleep(ack_wait * 2)  # redelivered to the other process meanwhile
        os.kill(pid, signal.SIGCONT)  # wakes up and finishes (writes) them too

    injector = Injector(
        [
            ("poison batch", poison.inject("undecodable", "bad-digest")),
            ("SIGSTOP past AckWait", stall),
        ],
        every=1.5,
    )
    try:
        pipeline.start()
        report = run("stall+poison", pipeline, tmp_path / "send", injector, poisons=poison.injected)
    finally:
        pipeline.stop()
    assert not report.problems, report.line() + "\n" + "\n".join(report.problems[:30])
    assert report.faults["SIGSTOP past AckWait"] >= 1
    assert sum(report.dead_lettered.values()) == len(poison.injected) > 0


def _dead_letters_of_sealed_poison(
    tmp_path: Path, nats_server: NatsServer, kind: str
) -> list[dict[str, str]]:
    """Inject one poison of ``kind`` on SEALED; the dead letters once the pipeline drained."""
    pipeline = Pipeline(tmp_path / "p", nats_server, _local(tmp_path))
    poison = PoisonMaker(pipeline, tmp_path / "poison")
    try:
        pipeline.start()
        poison.inject(kind)()
        pipeline.wait_drained()
        return wait_for("one dead letter", lambda: pipeline.dead_letters() or None, timeout=15)
    finally:
        pipeline.stop()


def test_sealed_poison_under_an_unknown_master_key_is_dead_lettered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The store-writer holds no master key: the signature, not the key id, is checked
    (so a genuine message under a new master key is stored during a rotation)."""
    letters = _dead_letters_of_sealed_poison(tmp_path, nats_server, "unknown-key")
    assert [letter["Dicomflow-Dlq-Stage"] for letter in letters] == ["store-writer"]
    assert "SealNotTrusted: signature check failed" in letters[0]["Dicomflow-Dlq-Reason"]
    assert not [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]


def test_sealed_poison_with_a_bad_tag_is_dead_lettered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Without the master key the tag cannot be checked, but the body's digest can: it
    differs from the one the encryptor signed."""
    letters = _dead_letters_of_sealed_poison(tmp_path, nats_server, "bad-tag")
    assert [letter["Dicomflow-Dlq-Stage"] for letter in letters] == ["store-writer"]
    assert "SealNotTrusted: digest check failed" in letters[0]["Dicomflow-Dlq-Reason"]
    assert not [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]


def test_hybrid_link_flaps_and_kill9_of_leaf_and_hub_during_catch_up(tmp_path: Path) -> None:
    """The hybrid edge (`dicomflow cloud`, `dicomflow edge`): load sent to the edge while
    its link to the cloud is cut and restored, the leaf's and the hub's nats-server
    killed (-9) a moment after each restore, while the cloud catches up. Nothing lost or
    doubled; the edge's sealed streams end empty (the janitor clears what the uplink
    left below its ack floor)."""
    leafnode_port = free_port()
    with LinkProxy(leafnode_port) as proxy:
        hybrid = Hybrid(tmp_path, proxy, leafnode_port, free_port(), calling_aes=("STORESCU",))
        hybrid.add_site()
        target = HybridTarget(hybrid)

        def restore_then_kill(side: str) -> Callable[[], None]:
            def act() -> None:
                proxy.restore()
                time.sleep(0.7)  # the cloud is catching up
                target.kill_server(side)

            return act

        injector = Injector(
            [
                ("link cut", proxy.cut),
                ("link restored, then kill -9 of the leaf nats-server", restore_then_kill("edge")),
                ("link cut", proxy.cut),
                ("link restored, then kill -9 of the hub nats-server", restore_then_kill("cloud")),
            ],
            every=3.0,
        )
        try:
            hybrid.start_cloud()
            hybrid.start_edge()
            report = run(
                "hybrid",
                target,
                tmp_path / "send",
                injector,
                checker=check_hybrid,  # type: ignore[arg-type]
                drain_timeout=180.0,
            )
        finally:
            proxy.restore()
            for proc in (hybrid.edge_proc, hybrid.cloud_proc):
                if proc is not None:
                    stop(proc)
    assert not report.problems, report.line() + "\n" + "\n".join(report.problems[:30])
    assert report.success > 0 and report.faults["link cut"] >= 1
    assert sum(v for k, v in report.faults.items() if "kill -9" in k) >= 1
