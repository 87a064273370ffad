"""teamorch: a team of LLM specialists on Ray, across Ollama servers.

The public surface is small on purpose; everything else is in modules users
rarely need to import.

Names load lazily (PEP 562): `teamorch.api` pulls in Ray (~1.5 s), and the
leaf modules (`teamorch.messages`, `teamorch.config`, `teamorch.errors`) and
`teamorch.policies` must stay importable without it, so that the pure layer
can be used and tested without a cluster.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "api": (
        "TeamOrchestrator",
        "connect",
        "execute",
        "follow_run",
        "follow_run",
        "stream",
        "get_coordinator",
        "start_coordinator",
        "stop_coordinator",
    ),
    "plans": ("load_plan",),
    "team": ("attach", "down", "up"),
    "config": ("ServerConfig", "SpecialistConfig", "TeamConfig", "load_team"),
    "errors": (
        "ConfigError",
        "ModelNotFound",
        "NoServerAvailable",
        "PlanError",
        "RunInterrupted",
        "ServerBusy",
        "ServerError",
        "ServerUnreachable",
        "TeamorchError",
    ),
    "messages": (
        "ConsensusSpec",
        "DivideAndConquerSpec",
        "ExecutionWave",
        "OrchestrationPlan",
        "ParallelAnalysisSpec",
        "PipelineSpec",
        "RunReport",
        "Task",
        "TaskResult",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ConfigError",
    "ConsensusSpec",
    "DivideAndConquerSpec",
    "ExecutionWave",
    "ModelNotFound",
    "NoServerAvailable",
    "OrchestrationPlan",
    "ParallelAnalysisSpec",
    "PipelineSpec",
    "PlanError",
    "RunInterrupted",
    "RunReport",
    "ServerBusy",
    "ServerConfig",
    "ServerError",
    "ServerUnreachable",
    "SpecialistConfig",
    "Task",
    "TaskResult",
    "TeamConfig",
    "TeamOrchestrator",
    "TeamorchError",
    "attach",
    "connect",
    "down",
    "execute",
    "follow_run",
    "get_coordinator",
    "load_plan",
    "load_team",
    "start_coordinator",
    "stop_coordinator",
    "stream",
    "up",
]  # the same names as _EXPORTS (a test checks)

if TYPE_CHECKING:
    from teamorch.api import (
        TeamOrchestrator,
        connect,
        execute,
        follow_run,
        get_coordinator,
        start_coordinator,
        stop_coordinator,
        stream,
    )
    from teamorch.config import ServerConfig, SpecialistConfig, TeamConfig, load_team
    from teamorch.errors import (
        ConfigError,
        ModelNotFound,
        NoServerAvailable,
        PlanError,
        RunInterrupted,
        ServerBusy,
        ServerError,
        ServerUnreachable,
        TeamorchError,
    )
    from teamorch.messages import (
        ConsensusSpec,
        DivideAndConquerSpec,
        ExecutionWave,
        OrchestrationPlan,
        ParallelAnalysisSpec,
        PipelineSpec,
        RunReport,
        Task,
        TaskResult,
    )
    from teamorch.plans import load_plan
    from teamorch.team import attach, down, up


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'teamorch' has no attribute {name!r}")
    value = getattr(import_module(f"teamorch.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
