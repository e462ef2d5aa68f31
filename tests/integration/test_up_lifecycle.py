"""`dicomflow up`'s life: its children end with it, one `up` per data folder, a
configuration error stops it, and its nats-server fsyncs before acknowledging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.servers import free_port, wait_for, wait_for_port
from support.up import alive, children, send, start, stop, using, wait_listed

pytestmark = pytest.mark.integration

STAGES = ("scp-gateway", "encryptor", "store-writer")


def _family(pid: int) -> dict[int, str]:
    """`up`'s nats-server and stages, once all four run."""

    def complete() -> dict[int, str] | None:
        found = children(pid)
        names = " ".join(found.values())
        wanted = ("nats-server", *(f"dicomflow {stage} " for stage in STAGES))
        return found if all(name in names for name in wanted) else None

    return wait_for("nats-server and the three stages", complete, 60)


def test_killed_up_takes_its_children_with_it_and_the_next_up_starts(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) of `up`: its nats-server and stages end within seconds
    (they run in sessions of their own, so nothing else would end them); the next `up`
    on the folder starts at once, on the same ports, and stores."""
    first, second = ct_series(tmp_path / "in", 2)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    proc = start(data, port, log)
    family: dict[int, str] = {}
    try:
        wait_for_port(port, timeout=90)
        family = _family(proc.pid)
        assert "Received Store Response (Success)" in send(port, first.path)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: cmd for pid, cmd in family.items() if alive(pid)}
        assert not left, f"outlived `up`: {left}"
    finally:
        if proc.poll() is None:
            stop(proc)
        for pid in using(data):  # orphans (of the old code): not left to the next test
            os.kill(pid, signal.SIGKILL)

    # The first `up` may have been killed before it printed its banner (the gateway
    # listens before `up` has checked every stage): count the banners from here on.
    banners = log.read_text().count("dicomflow is up.")
    proc = start(data, port, log)
    try:
        # This `up`'s own banner, not only something on the port (a full run has other
        # servers on free ports of their own)
        deadline = time.monotonic() + 90
        while log.read_text().count("dicomflow is up.") <= banners and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        wait_for_port(port, timeout=90)
        assert "Received Store Response (Success)" in send(port, second.path)
        listed = wait_listed(data, second.sop_instance_uid)
        assert first.sop_instance_uid in listed
        assert "restarting" not in log.read_text()
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def test_second_up_on_a_folder_refuses_at_once_and_nats_fsyncs(tmp_path: Path) -> None:
    """A second `up` on a folder a live one runs on stops at once with one line naming
    the first's PID, touching nothing. The running `up`'s nats-server was given a config
    with which nats-server reports JetStream's sync_always (fsync before every ack)."""
    (image,) = ct_series(tmp_path / "in", 1)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    proc = start(data, port, log)
    try:
        wait_for_port(port, timeout=90)
        family = _family(proc.pid)
        config_before = (data / "dicomflow.toml").read_text()

        began = time.monotonic()
        second = subprocess.run(
            [
                *(sys.executable, "-m", "dicomflow", "up", "--data-dir", str(data)),
                *("--port", str(free_port()), "--metrics-port", "0"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - began
        assert second.returncode == 1, second
        assert second.stderr.splitlines() == [
            f"dicomflow: data folder {data} is in use by dicomflow up (PID {proc.pid}); "
            "stop it first"
        ]
        assert took < 10, took  # the interpreter's start-up; no server was started
        assert (data / "dicomflow.toml").read_text() == config_before
        assert children(proc.pid) == family  # the first `up`'s children, untouched
        assert "Received Store Response (Success)" in send(port, image.path)

        (nats_cmd,) = (cmd for cmd in family.values() if "nats-server" in cmd)
        given = Path(nats_cmd.split(" -c ", 1)[1].split()[0])
        assert given == data / "keys" / "nats" / "nats-server.conf"
        monitor = free_port()
        with NatsServer(tmp_path / "probe", config_file=given, extra_args=["-m", str(monitor)]):
            url = f"http://127.0.0.1:{monitor}/varz"
            with urllib.request.urlopen(url, timeout=5) as rsp:
                jetstream = json.loads(rsp.read())["jetstream"]["config"]
        assert jetstream.get("sync_always") is True, jetstream
    finally:
        code = stop(proc)
        for pid in using(data):  # a second `up`'s orphans (old code): not left running
            os.kill(pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]
    # Released with its owner: the next `up` starts.
    proc = start(data, port, log)
    try:
        wait_for_port(port, timeout=90)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def test_a_taken_metrics_port_stops_up_with_one_line(tmp_path: Path) -> None:
    """A stage that exits on a configuration error (its metrics port is taken) stops
    `up` with one line naming the stage, the port and the reason, instead of a restart
    loop; `up` leaves nothing running."""
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = taken.getsockname()[1]  # the store-writer's: the first of the base
        proc = start(data, port, log, "--metrics-port", str(metrics))
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stop(proc)  # SIGTERM: `up` stops its stages and nats-server
            raise AssertionError(f"`up` kept running:\n{log.read_text()[-3000:]}") from None
    out = log.read_text()
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "configuration error" in line]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("dicomflow: configuration error: store-writer cannot start: ")
    assert f"cannot serve metrics on 127.0.0.1:{metrics}" in errors[0]
    assert "address already in use" in errors[0].lower()
    assert "--metrics-port" in errors[0]
    assert "restarting" not in out
    assert not using(data), "left running"
