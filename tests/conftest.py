"""One real local Ray cluster per test session; simulator servers on loopback.

The simulator (`teamorch.sim`) is a real HTTP server speaking the Ollama API;
it stands in for Ollama wherever a test needs faults or known timings.

The fast lane (`make test-fast`, i.e. `pytest --fast`) runs only test modules
that need neither Ray nor the real model, and never imports Ray: a module is
left out when a test in it takes a Ray fixture (`ray_cluster`, `coordinator`),
or it imports ray, teamorch.api or teamorch.actors, or is marked `model`. Ray is imported here only
inside the fixtures, and the session fails if anything in the fast lane
imported it anyway.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teamorch.config import TeamConfig
from teamorch.sim import SimConfig, SimServer

_NEEDS_RAY = re.compile(
    r"^def \w+\([^)]*\b(ray_cluster|coordinator)\b"  # a test that takes a Ray fixture
    r"|^\s*(import ray|from ray\b|from teamorch import api|from teamorch\.api\b)"
    r"|teamorch\.actors\b|pytest\.mark\.model",
    re.M,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true", help="only tests that need neither Ray nor the real model")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not config.getoption("--fast") or collection_path.suffix != ".py" or collection_path.name == "conftest.py":
        return None
    return bool(_NEEDS_RAY.search(collection_path.read_text())) or None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--fast") and "ray" in sys.modules:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nfast lane imported ray: a module it collected pulls Ray in (see tests/conftest.py)", file=sys.stderr)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

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


@pytest.fixture
def coordinator(ray_cluster: None) -> Iterator[Callable[[TeamConfig], Any]]:
    """Factory: start a coordinator for a team; it and its actors are killed after the test."""
    from teamorch import api

    handles: list[Any] = []

    def make(team: TeamConfig) -> Any:
        handle = api.start_coordinator(team)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        api.stop_coordinator(handle)
