"""Helpers tests import (pytest advises against importing from conftest: fixtures live there, functions here)."""

from __future__ import annotations

from typing import Any

from teamorch.config import TeamConfig
from teamorch.messages import OrchestrationPlan
from teamorch.sim import SimServer

# A team's `balancer` setting for tests that count requests on the simulators as tasks: no speed probe per server
# before the first plan (`measure_first`, tested in test_measure_first.py), so every request there is a task's.
NO_PROBES = {"measure_first": False}


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


def fan(n: int, tokens: int = 40) -> OrchestrationPlan:
    """n independent tasks of specialist A, each asking for `tokens` output tokens: the balancer's plain workload."""
    return OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [{"task_id": f"t{i}", "specialist": "A", "options": {"num_predict": tokens}} for i in range(n)],
        }
    )
