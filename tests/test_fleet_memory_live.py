"""Fleet memory across runs, through real actors against Ollama-API simulators (teamorch.sim: loopback HTTP).

Two consecutive cold runs on one fleet (no speed probes before the first plan: `measure_first` off, so memory is all
that is known): the first knows nothing and probes every server with a short job;
the second starts from what the first saved and sends its first requests to the fast server only. The
simulators' own counters say where requests went.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from teamorch import api
from teamorch.actors.balancer import _write_memory
from teamorch.config import TeamConfig
from teamorch.messages import OrchestrationPlan
from teamorch.policies.fleet import MEMORY_VERSION, FleetMemory, RememberedServer, parse_memory
from teamorch.sim import SimServer
from tests.helpers import NO_PROBES, fan, sim_team


def one_run(team: TeamConfig, plan: OrchestrationPlan) -> None:
    """A cold run: its own coordinator and fleet of actors, stopped at the end (as `teamorch run` does)."""
    handle = api.start_coordinator(team)
    try:
        assert api.execute(handle, plan).success
    finally:
        api.stop_coordinator(handle)


def saved(path: Path, servers: int, timeout: float = 10.0) -> dict[str, Any]:
    """The memory file once it holds `servers` servers (the balancer writes it in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not yet, or still the corrupt one
            raw = json.loads(path.read_text())
            if len(raw.get("servers", {})) >= servers:
                return raw
        time.sleep(0.05)
    raise AssertionError(f"{path} not written with {servers} servers within {timeout}s")


def fleet(sims: Any) -> tuple[SimServer, SimServer]:
    return (
        sims(name="fast", slots=1, tokens_per_second=800, ttft=0.01),
        sims(name="slow", slots=1, tokens_per_second=60, ttft=0.01),
    )


def test_the_second_run_starts_from_what_the_first_learned(sims, ray_cluster, tmp_path: Path) -> None:
    fast, slow = fleet(sims)
    memory = tmp_path / "fleet.json"
    team = sim_team([(fast, 1), (slow, 1)], [{"name": "A"}], balancer={**NO_PROBES, "fleet_memory": str(memory)})
    one_run(team, fan(2))
    assert (fast.stats()["requests"], slow.stats()["requests"]) == (1, 1), "a cold start probes both servers"
    raw = saved(memory, servers=2)
    assert raw["version"] == MEMORY_VERSION
    one_run(team, fan(2))
    # The slow box would take ~0.7 s per task, the fast one ~0.06 s: with the memory both go to the fast one.
    assert (fast.stats()["requests"], slow.stats()["requests"]) == (3, 1)


def test_a_corrupt_memory_file_is_ignored_and_replaced(sims, ray_cluster, tmp_path: Path) -> None:
    fast, slow = fleet(sims)
    memory = tmp_path / "fleet.json"
    memory.write_text("{not json")
    team = sim_team([(fast, 1), (slow, 1)], [{"name": "A"}], balancer={**NO_PROBES, "fleet_memory": str(memory)})
    one_run(team, fan(2))
    assert (fast.stats()["requests"], slow.stats()["requests"]) == (1, 1), "started unmeasured, as with no file"
    saved(memory, servers=2)
    assert len(parse_memory(memory.read_text()).servers) == 2


def test_where_the_memory_file_is(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)

    def team(value: Any) -> TeamConfig:
        return TeamConfig.model_validate({"servers": [{"name": "s", "url": "http://x:1"}], "balancer": value})

    assert api.with_fleet_memory(team({})).balancer.fleet_memory is False  # the Python API: none unless asked
    cli = api.with_fleet_memory(team({}), tmp_path / "runs")  # what `teamorch run` passes: next to its runs
    assert cli.balancer.fleet_memory == str(tmp_path / "fleet.json")
    assert api.with_fleet_memory(team({"fleet_memory": False}), tmp_path / "runs").balancer.fleet_memory is False
    assert api.with_fleet_memory(team({"fleet_memory": True})).balancer.fleet_memory == str(
        tmp_path / ".teamorch" / "fleet.json"
    )
    assert api.with_fleet_memory(team({"fleet_memory": "m.json"})).balancer.fleet_memory == str(tmp_path / "m.json")


def test_a_save_merges_with_what_another_team_wrote_since_it_read_the_file(tmp_path: Path) -> None:
    memory = tmp_path / "fleet.json"

    def saving(key: str, at: float) -> FleetMemory:
        return FleetMemory(servers={key: RememberedServer(token_seconds=0.01, samples=3, measured_at=at)})

    _write_memory(memory, saving("a", 100.0))  # the balancer's own writer, as its background save calls it
    _write_memory(memory, saving("b", 50.0))  # another team, which had read the file before `a` was saved
    _write_memory(memory, saving("a", 10.0))  # an older figure for `a` does not replace the newer one
    servers = parse_memory(memory.read_text()).servers
    assert set(servers) == {"a", "b"} and servers["a"].measured_at == 100.0
