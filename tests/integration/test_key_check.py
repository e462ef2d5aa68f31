"""Key check values against a real nats-server running the generated security config:
the first start with a key id records its key's check value, a stage or command whose
key file holds another key under that id refuses to start, naming the file, and only
the users holding master keys may touch the record, which nobody can replace."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto import keycheck
from dicomflow.shared.crypto.keyring import KeyRing, generate_master_key_file, load_master_key
from nats.js.errors import APIError

from dicomflow.cli.natsconfig import Bundle
from dicomflow.cli.up import stage_credentials
from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.supervisor import StageProcess, stage_env
from support.natsusers import connected_as, secured_server, violation
from support.pipeline import Pipeline
from support.servers import free_port

pytestmark = pytest.mark.integration

KEYS_STREAM = f"KV_{subjects.KEYS_BUCKET}"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, Bundle]]:
    with secured_server(tmp_path) as running:
        yield running


def _key(path: Path, key_id: int = 1) -> KeyRing:
    if not path.exists():
        generate_master_key_file(path)
    return KeyRing(load_master_key(key_id, path))


async def test_first_use_records_and_another_key_under_that_id_is_refused(
    tmp_path: Path, secured: tuple[NatsServer, Bundle]
) -> None:
    server, bundle = secured
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    async with connected_as(server, bundle, "encryptor") as (nc, errors):
        await keycheck.check(nc.jetstream(), _key(right))  # first use: recorded
        await keycheck.check(nc.jetstream(), _key(right))  # same key: accepted
        with pytest.raises(keycheck.KeyMismatch, match="master key 1") as refused:
            await keycheck.check(nc.jetstream(), _key(wrong))
        assert str(wrong) in str(refused.value)
        # Nobody replaces a recorded value, not even a user allowed to record one.
        with pytest.raises(APIError):
            await nc.jetstream().publish(f"$KV.{subjects.KEYS_BUCKET}.1", b"0" * 16, timeout=5)
        assert errors == []
    async with connected_as(server, bundle, "scu-gateway") as (nc, errors):
        await keycheck.check(nc.jetstream(), _key(right))
        # A previous key is checked as well as the current one.
        ring = KeyRing(_key(tmp_path / "two.key", 2).current, [_key(wrong).current])
        with pytest.raises(keycheck.KeyMismatch, match=str(wrong)):
            await keycheck.check(nc.jetstream(), ring)
        assert errors == []
    async with connected_as(server, bundle, "admin") as (nc, _):
        kv = await nc.jetstream().key_value(subjects.KEYS_BUCKET)
        assert (await kv.get("1")).value == _key(right).current.check_value().encode()
        assert (await kv.get("2")).value == _key(
            tmp_path / "two.key", 2
        ).current.check_value().encode()


async def test_only_the_users_holding_master_keys_touch_key_check_values(
    secured: tuple[NatsServer, Bundle],
) -> None:
    server, bundle = secured
    for user in ("scp-gateway", "store-writer"):
        async with connected_as(server, bundle, user) as (nc, errors):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.jetstream(timeout=1.5).key_value(subjects.KEYS_BUCKET)
            await violation(errors, f"$JS.API.STREAM.INFO.{KEYS_STREAM}")
            await nc.publish(f"$KV.{subjects.KEYS_BUCKET}.7", b"0" * 16)
            await violation(errors, f'Publish to "$KV.{subjects.KEYS_BUCKET}.7"')
    async with connected_as(server, bundle, "admin") as (nc, _):
        assert (await nc.jetstream().stream_info(KEYS_STREAM)).state.messages == 0


def test_a_stage_or_command_with_another_key_under_the_id_refuses_to_start(
    tmp_path: Path, secured: tuple[NatsServer, Bundle]
) -> None:
    """Real processes as `up` starts them, each as its own NATS user."""
    server, bundle = secured
    unused = free_port()  # a destination nobody listens on: the check comes first
    pipeline = Pipeline(
        tmp_path / "p",
        server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        scu={
            "destinations": {"peer": {"ae_title": "PEER", "host": "127.0.0.1", "port": unused}},
            "rules": [{"destinations": ["peer"]}],
        },
        extra={"nats": {"nkey_seed_file": str(bundle.seed("admin"))}},
    )
    base = stage_env(pipeline.config)
    envs = {name: {**base, **stage_credentials(bundle, name, tls=False)} for name in pipeline.names}
    pipeline.stages["encryptor"] = StageProcess(
        "encryptor", pipeline.config, pipeline.root / "logs", envs["encryptor"]
    )
    try:
        pipeline.start("encryptor")  # the first start with key id 1 records its key
    finally:
        pipeline.stop()
    wrong = tmp_path / "wrong.key"
    generate_master_key_file(wrong)
    pipeline.key = wrong
    pipeline.write_config()
    for stage in ("encryptor", "scu-gateway"):
        run = subprocess.run(
            [sys.executable, "-m", "dicomflow", stage, "--config", str(pipeline.config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, **envs[stage]),
        )
        output = run.stdout + run.stderr
        assert run.returncode != 0, output
        assert f"master key file {wrong} is not master key 1" in output, output
        assert f'"{stage} ready' not in output, output
    verify = pipeline.cli("verify", "--config", str(pipeline.config))
    assert verify.returncode != 0
    assert f"master key file {wrong} is not master key 1" in verify.stdout + verify.stderr
