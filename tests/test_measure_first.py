"""Measure before the first plan (`balancer.measure_first`), through real actors against Ollama-API simulators
(teamorch.sim: loopback HTTP).

A fresh balancer has every server it knows nothing about answer one short speed probe before it grants
anything, so a team's first requests are placed by measured speeds, not blind in the servers' listed order.
The simulators' own request counters and the balancer's load table say what happened.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray

from teamorch import api
from teamorch.actors.balancer import _write_memory
from teamorch.messages import ServerLoad
from teamorch.policies.fleet import PROBE_TOKENS, FleetMemory, RememberedServer, memory_key, probe_prompt
from teamorch.sim import SimServer
from tests.helpers import fan, sim_team


def fleet(sims: Any) -> tuple[SimServer, SimServer]:
    # Listed slow first: a blind start gives the slow box the first request whatever it is.
    return (
        sims(name="slow", slots=1, tokens_per_second=60, ttft=0.01),
        sims(name="fast", slots=1, tokens_per_second=800, ttft=0.01),
    )


def loads(handle: Any) -> dict[str, ServerLoad]:
    """The balancer's load table, answered once it has started (and, with measure_first, probed)."""
    return {row.name: row for row in ray.get(handle.servers_load.remote())}


@pytest.mark.parametrize("measure", [True, False])
def test_a_fresh_team_measures_every_server_before_its_first_grant(sims, ray_cluster, measure: bool) -> None:
    slow, fast = fleet(sims)
    team = sim_team([(slow, 1), (fast, 1)], [{"name": "A"}], balancer={"measure_first": measure})
    handle = api.start_coordinator(team)
    try:
        rows = loads(handle)
        probed = (slow.stats()["requests"], fast.stats()["requests"])
        assert api.execute(handle, fan(2)).success
        after = (slow.stats()["requests"], fast.stats()["requests"])
    finally:
        api.stop_coordinator(handle)
    if measure:
        assert probed == (1, 1), "one speed probe per server, before any task"
        assert all(row.ewma_token_seconds is not None for row in rows.values())
        assert rows["fast"].ewma_token_seconds < rows["slow"].ewma_token_seconds
        # Measured, the slow box (~0.7 s per task against ~0.06 s) gets neither task.
        assert after == (1, 3)
    else:
        assert probed == (0, 0)
        assert all(row.ewma_token_seconds is None for row in rows.values())
        assert after == (1, 1), "blind: each server's first request is its probe"


def test_the_probe_is_short_and_tells_its_server_apart(sims, ray_cluster) -> None:
    slow, fast = fleet(sims)
    team = sim_team([(slow, 1), (fast, 1)], [{"name": "A"}])
    handle = api.start_coordinator(team)
    try:
        loads(handle)
        for sim in (slow, fast):
            (request,) = sim.stats()["requests_log"]
            assert request["prompt"] == probe_prompt(sim.config.name)
            assert sim.stats()["tokens"] == PROBE_TOKENS  # short: what it costs the run is one tiny request
    finally:
        api.stop_coordinator(handle)


def test_a_server_known_from_fleet_memory_is_not_probed(sims, ray_cluster, tmp_path: Path) -> None:
    slow, fast = fleet(sims)
    memory = tmp_path / "fleet.json"
    team = sim_team([(slow, 1), (fast, 1)], [{"name": "A"}], balancer={"fleet_memory": str(memory)})
    known = RememberedServer(token_seconds=1 / 800, ttft=0.01, samples=3, measured_at=time.time())
    _write_memory(memory, FleetMemory(servers={memory_key(team.servers[1]): known}))
    handle = api.start_coordinator(team)
    try:
        loads(handle)
        assert (slow.stats()["requests"], fast.stats()["requests"]) == (1, 0)
    finally:
        api.stop_coordinator(handle)


def test_a_server_down_at_start_is_not_probed_and_the_live_one_is(sims, ray_cluster) -> None:
    slow, fast = fleet(sims)
    team = sim_team([(slow, 1), (fast, 1)], [{"name": "A"}])
    slow.stop()  # unreachable from the start: the health poll marks it, the probe goes to the live one only
    handle = api.start_coordinator(team)
    try:
        rows = loads(handle)
        assert rows["slow"].failed == 0, "no probe was sent to the server the health poll found down"
        assert rows["fast"].ewma_token_seconds is not None  # the live one was measured
        report = api.execute(handle, fan(2))
        assert report.success
        assert {t.server for t in report.tasks} == {"fast"}
    finally:
        api.stop_coordinator(handle)
