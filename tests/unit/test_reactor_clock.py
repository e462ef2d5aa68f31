"""scp.reactor_delay reaches the acceptor reactor's fixed 1 ms sleep, and nothing else."""

from __future__ import annotations

import time

import pytest
from pynetdicom import association

from dicomflow.scp_gateway.service import ReactorClock, tune_reactors


def test_only_the_reactor_sleep_is_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = ReactorClock(0.0002)
    clock.sleep(0.001)  # the reactor's turn
    clock.sleep(0.1)  # anything else pynetdicom waits for
    clock.sleep(0.0001)
    assert slept == [0.0002, 0.1, 0.0001]
    assert clock.monotonic is time.monotonic  # the rest of the module is time's


def test_the_default_leaves_pynetdicom_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(association, "time", time)
    tune_reactors(0.001)
    assert association.time is time
    tune_reactors(0.0002)
    assert isinstance(association.time, ReactorClock)
