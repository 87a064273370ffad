"""The Python API: connect to Ray, get a coordinator, run plans.

Agents in other processes share one long-lived coordinator by name
(`start_coordinator(team, name="teamorch", detached=True)` once, then
`get_coordinator("teamorch")` anywhere on the cluster). A detached
coordinator outlives the process that created it: stop it with
`stop_coordinator(name)`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from policies.planning import build_plan
from teamorch.config import TeamConfig, check_plan_against_team, load_team, parse_pattern, parse_plan, split_plan_file
from teamorch.errors import ConfigError, RunCancelled, RunInterrupted, TeamorchError, unwrap
from teamorch.messages import (
    AutoSpec,
    ConsensusSpec,
    DivideAndConquerSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    PatternSpec,
    PipelineSpec,
    RunReport,
    TaskResult,
)

NAMESPACE = "teamorch"
DEFAULT_NAME = "teamorch"


def connect(address: str | None = None, namespace: str = NAMESPACE, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (`address="auto"` for one started with `ray start`), or start a private local one.

    `address=None` always starts a fresh local instance, even if RAY_ADDRESS is set,
    so a plain `teamorch run` never lands on somebody else's cluster by accident.
    """
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": False, "logging_level": "ERROR"}
    if address is None:
        kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus or os.cpu_count() or 1)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"join the Ray cluster at {address!r}" if address else "start a local Ray instance"
        raise TeamorchError(f"cannot {where}: {exc}") from exc


def start_coordinator(
    team: TeamConfig, name: str | None = None, detached: bool = False, max_workers: int | None = None
) -> Any:
    """Create a coordinator actor for `team` and start its fleet; returns the handle when ready.

    `max_workers` caps how many tasks of one run are in flight at once (the
    seed's knob); the balancer's per-server `slots` still apply underneath.
    """
    from actors.coordinator import Coordinator

    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000}
    if name:
        options.update(name=name, get_if_exists=False)
    if detached:
        options["lifetime"] = "detached"
    handle = ray.remote(Coordinator).options(**options).remote(team, max_workers)
    ray.get(handle.start.remote())
    return handle


def get_coordinator(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> Any:
    """A handle to a named coordinator started elsewhere on the cluster."""
    return ray.get_actor(name, namespace=namespace)


def stop_coordinator(handle_or_name: Any = DEFAULT_NAME) -> None:
    handle = get_coordinator(handle_or_name) if isinstance(handle_or_name, str) else handle_or_name
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # already dead: the actors it created died with it (Ray fate-sharing)
    finally:
        ray.kill(handle)


Runnable = OrchestrationPlan | PatternSpec


def load_plan(path: str | Path, team_path: str | Path | None = None) -> tuple[Runnable, TeamConfig]:
    """Read and fully validate a plan file (and optional team file) without starting anything.

    Returns an `OrchestrationPlan` (explicit tasks/waves) or a pattern spec
    (`pattern:` files), and the resolved team.
    """
    file = str(path)
    data, team = split_plan_file(path, team_path)
    _inline_context_files(data, Path(path))
    if "pattern" not in data:
        plan = parse_plan(data, file)
        return plan, check_plan_against_team(plan, team, file)
    _inline_item_files(data, Path(path))
    spec = parse_pattern(data, file)
    if isinstance(spec, AutoSpec):
        return spec, check_plan_against_team(None, team, file)
    try:
        shape = build_plan(spec)
    except ConfigError as exc:
        raise exc.located(file) from None
    return spec, check_plan_against_team(shape, team, file)


def expand(runnable: Runnable) -> OrchestrationPlan | None:
    """The plan a runnable stands for (None for `auto`, which the planner writes at run time)."""
    if isinstance(runnable, OrchestrationPlan):
        return runnable
    return None if isinstance(runnable, AutoSpec) else build_plan(runnable)


def _inline_item_files(data: dict[str, Any], plan_path: Path) -> None:
    """`item_files: [glob, ...]` (relative to the plan file) become items {name, content}, sorted by path."""
    patterns = data.get("item_files") or []
    if not isinstance(patterns, list):
        raise ConfigError("expected a list of glob patterns", field="item_files", file=str(plan_path))
    items = list(data.get("items") or [])
    for index, pattern in enumerate(patterns):
        matches = sorted(p for p in plan_path.parent.glob(str(pattern)) if p.is_file())
        if not matches:
            raise ConfigError(f"no file matches {pattern!r}", field=f"item_files[{index}]", file=str(plan_path))
        for match in matches:
            rel = match.relative_to(plan_path.parent).as_posix()
            items.append({"name": rel, "content": match.read_text(encoding="utf-8")})
    if patterns:
        data["items"] = items


def _inline_context_files(data: dict[str, Any], plan_path: Path) -> None:
    """`context_files: {name: relative/path}` puts each file's text into `context[name]`."""
    files = data.pop("context_files", None) or {}
    if not isinstance(files, dict):
        raise ConfigError("expected a mapping of name: path", field="context_files", file=str(plan_path))
    context = data.setdefault("context", {})
    for name, rel in files.items():
        target = (plan_path.parent / str(rel)).resolve()
        try:
            context[name] = target.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read {target}: {exc.strerror}", field=f"context_files.{name}", file=str(plan_path)
            ) from exc


def run_plan(
    coordinator: Any,
    plan: Runnable,
    on_result: Callable[[TaskResult], None] | None = None,
    poll: float = 0.5,
) -> RunReport:
    """Run a plan or pattern on `coordinator`, calling `on_result` as each task finishes.

    If the coordinator dies mid-run, raises `RunInterrupted` carrying every
    result that had finished, so nothing already paid for is lost.
    """
    run_id = uuid.uuid4().hex[:12]
    if isinstance(plan, OrchestrationPlan):
        ref = coordinator.run_plan.remote(plan, run_id)
    else:
        ref = coordinator.run_pattern.remote(plan, run_id)
    seen: dict[str, TaskResult] = {}

    def drain() -> None:
        try:
            for result in ray.get(coordinator.progress.remote(run_id), timeout=30):
                if result.task_id not in seen:
                    seen[result.task_id] = result
                    if on_result:
                        on_result(result)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass

    try:
        while not ray.wait([ref], timeout=poll)[0]:
            drain()
    except KeyboardInterrupt:
        # Cancel the run (every in-flight request is closed), then collect what had finished.
        ray.cancel(ref)
        ray.wait([ref], timeout=10)
        drain()
        raise RunCancelled("run interrupted by the user", list(seen.values())) from None
    try:
        report: RunReport = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        drain()
        raise RunInterrupted(f"coordinator died mid-run: {exc}", list(seen.values())) from exc
    except ray.exceptions.RayTaskError as exc:
        cause = unwrap(exc)
        if isinstance(cause, TeamorchError):
            raise cause from None
        raise
    if on_result:
        for result in report.tasks:
            if result.task_id not in seen:
                on_result(result)
    return report


class TeamOrchestrator:
    """The seed's API, for code written against it: plan, execute, statistics.

    >>> orch = TeamOrchestrator("team.yaml", max_workers=4)
    >>> plan = orch.create_orchestration_plan("Fix complex error", {"file": "main.py"})
    >>> results = orch.execute_plan(plan)
    >>> results["success"], results["duration"], results["statistics"]["parallel_efficiency"]

    Results are plain dicts shaped like the seed's (a `RunReport` dumped, plus
    `results`: task_id -> output). `team` may be a TeamConfig, a path to a
    team YAML, a mapping, or None for the embedded default fleet.
    """

    def __init__(
        self,
        team: TeamConfig | str | Path | dict[str, Any] | None = None,
        max_workers: int | None = None,
        *,
        address: str | None = None,
        name: str | None = None,
        logger: Any = None,
    ) -> None:
        if isinstance(team, (str, Path)):
            team = load_team(team)
        elif isinstance(team, dict):
            team = TeamConfig.model_validate(team)
        self.team = (team or TeamConfig()).resolved()
        self.logger = logger
        connect(address)
        self.coordinator = start_coordinator(self.team, name=name, max_workers=max_workers)

    def _log(self, result: TaskResult) -> None:
        if self.logger is not None:
            self.logger.info(
                "task %s (%s) on %s: %s in %.1fs",
                result.task_id,
                result.specialist,
                result.server,
                result.status,
                result.duration,
            )

    def _run(self, runnable: Runnable) -> dict[str, Any]:
        report = run_plan(self.coordinator, runnable, on_result=self._log)
        out = report.model_dump()
        out["results"] = {t.task_id: t.output for t in report.tasks if t.status == "succeeded"}
        return out

    def create_orchestration_plan(self, problem: str, context: dict[str, Any] | None = None) -> OrchestrationPlan:
        """Ask the planner specialist (LLM) for a plan; falls back to a heuristic. See `plan.plan_source`."""
        return ray.get(self.coordinator.create_plan.remote(problem, context or {}))

    def execute_plan(self, plan: OrchestrationPlan, thread: Any = None) -> dict[str, Any]:
        """Run a plan. `thread` (the seed's conversation object) is passed to specialists as context."""
        if thread is not None:
            plan = plan.model_copy(update={"context": {**plan.context, "thread": thread}})
        return self._run(plan)

    def parallel_analysis(
        self, problem: str, specialists: list[str], synthesizer: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        return self._run(ParallelAnalysisSpec(problem=problem, specialists=specialists, synthesizer=synthesizer, **kw))

    def divide_and_conquer(
        self, problem: str, items: list[Any], specialists: list[str], reducer: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        return self._run(
            DivideAndConquerSpec(problem=problem, items=items, specialists=specialists, reducer=reducer, **kw)
        )

    def pipeline(self, problem: str, stages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        return self._run(PipelineSpec(problem=problem, stages=stages, **kw))

    def consensus(
        self, question: str, experts: list[str], synthesizer: str | None = None, rounds: int = 1, **kw: Any
    ) -> dict[str, Any]:
        return self._run(ConsensusSpec(problem=question, experts=experts, synthesizer=synthesizer, rounds=rounds, **kw))

    def get_statistics(self) -> dict[str, Any]:
        """Totals over every run of this orchestrator: tasks, success rate, efficiency, utilization."""
        return ray.get(self.coordinator.statistics.remote())

    def close(self) -> None:
        stop_coordinator(self.coordinator)

    def __enter__(self) -> TeamOrchestrator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
