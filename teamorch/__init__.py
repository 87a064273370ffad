"""teamorch: a team of LLM specialists on Ray, across Ollama servers.

The public surface is small on purpose; everything else is in modules users
rarely need to import.
"""

from teamorch.api import (
    TeamOrchestrator,
    connect,
    get_coordinator,
    load_plan,
    run_plan,
    start_coordinator,
    stop_coordinator,
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
    "connect",
    "get_coordinator",
    "load_plan",
    "load_team",
    "run_plan",
    "start_coordinator",
    "stop_coordinator",
]
