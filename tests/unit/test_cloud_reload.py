"""`cloud add-site` while the cloud runs: JetStream answering "no responders" for a
moment after the hub re-read its config is waited out, not the end of the cloud."""

from __future__ import annotations

import pytest
from dicomflow.shared.settings import NatsSettings
from nats.errors import NoRespondersError
from nats.js.errors import ServiceUnavailableError

from dicomflow.cli import cloud


def test_topology_after_a_reload_is_tried_again_while_jetstream_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = [ServiceUnavailableError(), NoRespondersError()]
    calls: list[dict[str, str]] = []

    async def topology(admin: NatsSettings, sites: dict[str, str]) -> None:
        calls.append(sites)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(cloud, "_topology", topology)
    monkeypatch.setattr(cloud.time, "sleep", lambda seconds: None)
    cloud._topology_after_reload(NatsSettings(), {"site-a": "k", "site-b": "k"})
    assert len(calls) == 3


def test_a_jetstream_that_never_answers_again_is_still_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def topology(admin: NatsSettings, sites: dict[str, str]) -> None:
        raise ServiceUnavailableError()

    monkeypatch.setattr(cloud, "_topology", topology)
    monkeypatch.setattr(cloud.time, "sleep", lambda seconds: None)
    with pytest.raises(ServiceUnavailableError):
        cloud._topology_after_reload(NatsSettings(), {"site-a": "k"}, wait=0.0)
