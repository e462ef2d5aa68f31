"""A 3-node nats-server cluster with JetStream on loopback, for R3 streams under faults.

Every node has a fixed client port and a fixed cluster (route) port, both chosen free
up front, so a node killed with SIGKILL restarts on the same ports with the same store
folder and rejoins its peers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from dicomflow.embedded.natsserver import NatsServer
from support.servers import free_port

CLUSTER = "dicomflow-faults"


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        client_ports = [free_port() for _ in range(size)]
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
        self.nodes: list[NatsServer] = []
        for i, (client, route) in enumerate(zip(client_ports, route_ports, strict=True)):
            folder = root / f"n{i + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "node.conf"
            config.write_text(
                f'server_name: "n{i + 1}"\n'
                f"cluster {{\n"
                f'  name: "{CLUSTER}"\n'
                f'  listen: "127.0.0.1:{route}"\n'
                f"  routes: [{routes}]\n"
                f"}}\n"
            )
            node = NatsServer(folder / "jetstream", port=client, config_file=config)
            self.nodes.append(node)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_jetstream(timeout)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start node ``i`` again on its ports and store folder; wait for JetStream."""
        self.nodes[i].start()
        self.wait_jetstream(timeout, node=i)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def wait_jetstream(self, timeout: float = 60.0, node: int | None = None) -> None:
        """Until JetStream answers through ``node`` (every node if None): a meta leader."""
        deadline = time.monotonic() + timeout
        targets = range(len(self.nodes)) if node is None else [node]
        for i in targets:
            while not asyncio.run(_jetstream_answers(self.nodes[i].url)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"JetStream of the cluster did not answer via node {i + 1}")
                time.sleep(0.3)


async def _jetstream_answers(url: str) -> bool:
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    except (NatsError, OSError, TimeoutError):
        return False
    try:
        await nc.jetstream().account_info()
    except (NatsError, TimeoutError):
        return False
    else:
        return True
    finally:
        await nc.close()
