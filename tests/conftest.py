"""One real local Ray cluster per test session; simulator servers on loopback.

The simulator (`teamorch.sim`) is a real HTTP server speaking the Ollama API;
it stands in for Ollama wherever a test needs faults or known timings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

from teamorch import api
from teamorch.config import TeamConfig
from teamorch.sim import SimConfig, SimServer


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="teamorch-tests", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def sims() -> Iterator[Callable[..., SimServer]]:
    """Factory: `sims(name="a", slots=2, ...)` starts a simulator; all are stopped after the test."""
    started: list[SimServer] = []

    def make(**kwargs: Any) -> SimServer:
        server = SimServer(SimConfig(**kwargs)).start_in_thread()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def sim_team(servers: list[tuple[SimServer, int]], specialists: list[dict[str, Any]], **extra: Any) -> TeamConfig:
    """A team whose servers are the given simulators (with their slots)."""
    return TeamConfig.model_validate(
        {
            "servers": [{"name": s.config.name, "url": s.url, "slots": slots} for s, slots in servers],
            "default_model": "gemma3:270m",
            "specialists": specialists,
            **extra,
        }
    )


@pytest.fixture
def coordinator(ray_cluster: None) -> Iterator[Callable[[TeamConfig], Any]]:
    """Factory: start a coordinator for a team; it and its actors are killed after the test."""
    handles: list[Any] = []

    def make(team: TeamConfig) -> Any:
        handle = api.start_coordinator(team)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        api.stop_coordinator(handle)
