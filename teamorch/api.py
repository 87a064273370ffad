"""The Python API: connect to Ray, get a coordinator, run plans.

Agents in other processes share one long-lived coordinator by name
(`start_coordinator(team, name="teamorch", detached=True)` once, then
`get_coordinator("teamorch")` anywhere on the cluster). A detached
coordinator outlives the process that created it: stop it with
`stop_coordinator(name)`.

A run can be followed as it happens: `stream(coordinator, plan)` (or
`TeamOrchestrator.stream`) yields its events (`teamorch.journal`: run
started, task queued/started, tokens generated (throttled progress while a
server streams), attempt failed, task finished, run finished),
and `follow_run(coordinator, run_id)` lets another client watch a run it did
not start; both poll `Coordinator.events(run_id, since=last_seq)`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle

from teamorch.config import TeamConfig, load_team
from teamorch.errors import RunCancelled, RunInterrupted, TeamorchError, unwrap
from teamorch.journal import JournalEvent, RunFinished, TaskFinished
from teamorch.messages import (
    AutoSpec,
    ConsensusSpec,
    DivideAndConquerSpec,
    JournalSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    PipelineSpec,
    PriorityClass,
    RunReport,
    StageSpec,
    TaskResult,
)
from teamorch.plans import Runnable

NAMESPACE = "teamorch"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head advertises it (Ray Serve pins its controller so)
DEFAULT_NAME = "teamorch"


def connect(address: str | None = None, namespace: str = NAMESPACE, num_cpus: int | None = None) -> None:
    """Join a Ray cluster ('auto', 'HOST:PORT', 'ray://HOST:PORT'), or start a private local one (None).

    Token authentication is handled (see `teamorch.cluster.connect`): joining fails within seconds,
    saying what to set, when the cluster rejects this machine.
    """
    from teamorch.cluster import connect as join

    join(address, namespace, num_cpus)


def start_coordinator(
    team: TeamConfig, name: str | None = None, detached: bool = False, max_workers: int | None = None
) -> ActorHandle:
    """Create a coordinator actor for `team` and start its fleet; returns the handle when ready.

    `max_workers` caps how many tasks of one run are in flight at once (the
    seed's knob); the balancer's per-server `slots` still apply underneath.
    """
    from teamorch.actors.coordinator import Coordinator

    team = with_fleet_memory(team)
    # The coordinator lives on the head node: a cluster that loses its head is gone anyway, while losing a
    # worker node (the one next to an Ollama box) must cost only what was pinned there, never the team.
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    if name:
        options.update(name=name, namespace=NAMESPACE, get_if_exists=False)
    if detached:
        options["lifetime"] = "detached"
    handle = ray.remote(Coordinator).options(**options).remote(team, max_workers)
    ray.get(handle.start.remote())
    return handle


DEFAULT_FLEET_MEMORY = Path(".teamorch") / "fleet.json"


def with_fleet_memory(team: TeamConfig, runs_dir: Path | str | None = None) -> TeamConfig:
    """`team` with its fleet memory file as an absolute path (the balancer does not share this process's cwd).

    Unset, it is `fleet.json` next to `runs_dir` when one is given (what
    `teamorch run` passes) and none otherwise; `true` is `.teamorch/fleet.json`.
    """
    wanted = team.balancer.fleet_memory
    if wanted is None and runs_dir is not None:
        wanted = str(Path(runs_dir).absolute().parent / "fleet.json")
    if wanted is True:
        wanted = str(DEFAULT_FLEET_MEMORY)
    resolved = str(Path(wanted).expanduser().absolute()) if isinstance(wanted, str) else False
    return team.model_copy(update={"balancer": team.balancer.model_copy(update={"fleet_memory": resolved})})


def get_coordinator(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> ActorHandle:
    """A handle to a named coordinator started elsewhere on the cluster (a clear error if it is absent or dead)."""
    from teamorch.team import get_coordinator as lookup  # teamorch.team builds on this module

    return lookup(name, namespace)


def stop_coordinator(handle_or_name: ActorHandle | str = DEFAULT_NAME) -> None:
    handle = get_coordinator(handle_or_name) if isinstance(handle_or_name, str) else handle_or_name
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # already dead: the actors it created died with it (Ray fate-sharing)
    finally:
        ray.kill(handle)


def execute(
    coordinator: ActorHandle,
    runnable: Runnable,
    on_result: Callable[[TaskResult], None] | None = None,
    poll: float = 0.5,
    *,
    on_event: Callable[[JournalEvent], None] | None = None,
    run_id: str | None = None,
    journal: JournalSpec | None = None,
    priority_class: PriorityClass | None = None,
) -> RunReport:
    """Run a plan or pattern on `coordinator` from this driver, calling `on_event` with each of the run's
    events and `on_result` with each result as it arrives.

    `priority_class` overrides the runnable's (default interactive): on a team
    that several runs share, a `batch` run's requests wait for interactive
    ones at the balancer, with aging (`teamorch.policies.priority`).

    `journal` keeps the run on disk under its `runs_dir` (or resumes the run
    `run_id` there). If the coordinator dies mid-run, raises `RunInterrupted`
    carrying every result that had finished, so nothing already paid for is
    lost; Ctrl-C cancels the run (closing every in-flight request) and raises
    `RunCancelled` the same way.
    """
    if priority_class is not None:
        runnable = runnable.model_copy(update={"priority_class": priority_class})
    # Nobody to call back: the report carries every result, so the events left at the end are not fetched
    # (one round trip to the coordinator less per run; a one-task plan's latency is mostly such trips), and
    # those polled meanwhile are only the finished results (kept for RunInterrupted / RunCancelled).
    follow = _follow(coordinator, runnable, run_id, journal, poll, last_events=bool(on_event or on_result))
    seen: set[str] = set()
    try:
        while True:
            event = next(follow)
            if on_event:
                on_event(event)
            if isinstance(event, TaskFinished):
                seen.add(event.result.task_id)
                if on_result:
                    on_result(event.result)
    except StopIteration as stop:
        report: RunReport = stop.value
    except KeyboardInterrupt:
        follow.throw(KeyboardInterrupt())  # cancels the run and raises RunCancelled with what finished
        raise
    for result in report.tasks:  # a run whose events aged out of the coordinator before this client read them
        if result.task_id not in seen and on_result:
            on_result(result)
    return report


def stream(
    coordinator: ActorHandle,
    runnable: Runnable,
    *,
    run_id: str | None = None,
    journal: JournalSpec | None = None,
    poll: float = 0.2,
) -> Generator[JournalEvent, None, RunReport]:
    """Run a plan or pattern and yield its events as they happen, ending with `run_finished`; the
    generator returns the `RunReport`. Leaving the loop early stops watching, not the run."""
    return (yield from _follow(coordinator, runnable, run_id, journal, poll))


def follow_run(coordinator: ActorHandle, run_id: str, since: int = 0, poll: float = 0.2) -> Iterator[JournalEvent]:
    """Watch a run somebody else started on `coordinator` (another process, another agent) until its
    run_finished. `since` skips the events already seen; a run this coordinator does not know yields nothing
    and waits (it may not have started yet)."""
    while True:
        events: list[JournalEvent] = ray.get(coordinator.events.remote(run_id, since))
        for event in events:
            since = event.seq
            yield event
            if isinstance(event, RunFinished):
                return
        time.sleep(poll)


def _follow(
    coordinator: ActorHandle,
    runnable: Runnable,
    run_id: str | None,
    journal: JournalSpec | None,
    poll: float,
    last_events: bool = True,
) -> Generator[JournalEvent, None, RunReport]:
    """Submit the run, then yield its events from the coordinator's journal until the run returns (with
    `last_events`, also those not yet read when it returns; without, nobody listens: only task_finished
    events are polled, what an interrupted run hands back)."""
    run_id = run_id or uuid.uuid4().hex[:12]
    method = coordinator.run_plan if isinstance(runnable, OrchestrationPlan) else coordinator.run_pattern
    ref = method.remote(runnable, run_id, journal=journal)
    events = _Events(coordinator, run_id, None if last_events else ["task_finished"])
    try:
        while not ray.wait([ref], timeout=poll)[0]:
            yield from events.poll()
    except KeyboardInterrupt:
        # Cancel the run (every in-flight request is closed), then collect what had finished.
        ray.cancel(ref)
        ray.wait([ref], timeout=10)
        events.poll()
        raise RunCancelled("run interrupted by the user", list(events.results.values())) from None
    try:
        report: RunReport = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        events.poll()
        raise RunInterrupted(f"coordinator died mid-run: {exc}", list(events.results.values())) from exc
    except ray.exceptions.RayTaskError as exc:
        cause = unwrap(exc)
        if isinstance(cause, TeamorchError):
            raise cause from None
        raise
    if last_events:
        yield from events.poll()
    return report


class _Events:
    """One client's cursor over a run's events (those of `types`, None: all): the last seq read, and each
    task's latest result."""

    def __init__(self, coordinator: ActorHandle, run_id: str, types: list[str] | None = None) -> None:
        self.coordinator = coordinator
        self.run_id = run_id
        self.types = types
        self.seq = 0
        self.results: dict[str, TaskResult] = {}

    def poll(self) -> list[JournalEvent]:
        try:
            events: list[JournalEvent] = ray.get(
                self.coordinator.events.remote(self.run_id, self.seq, self.types), timeout=30
            )
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return []
        for event in events:
            self.seq = event.seq
            if isinstance(event, TaskFinished):
                self.results[event.result.task_id] = event.result
        return events


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

    def stream(self, runnable: Runnable) -> Generator[JournalEvent, None, RunReport]:
        """Run a plan or pattern, yielding its events (task queued, started, tokens generated, failed attempts,
        finished, ...) as they happen until `run_finished`; the generator's return value is the `RunReport`."""
        return (yield from stream(self.coordinator, runnable))

    def _run(self, runnable: Runnable) -> dict[str, Any]:
        report = execute(self.coordinator, runnable, on_result=self._log)
        out = report.model_dump()
        out["results"] = {t.task_id: t.output for t in report.tasks if t.status == "succeeded"}
        return out

    def create_orchestration_plan(self, problem: str, context: dict[str, Any] | None = None) -> OrchestrationPlan:
        """Ask the planner specialist (LLM) for a plan; falls back to a heuristic. See `plan.plan_source`."""
        return ray.get(self.coordinator.create_plan.remote(AutoSpec(problem=problem, context=context or {})))

    def execute_plan(self, plan: OrchestrationPlan, thread: Any = None) -> dict[str, Any]:
        """Run a plan. `thread` (the seed's conversation object) is passed to specialists as context."""
        if thread is not None:
            plan = plan.model_copy(update={"context": {**plan.context, "thread": thread}})
        return self._run(plan)

    # The four patterns, defined here only: the coordinator takes the spec (`run_pattern`), so a new
    # keyword is added to the spec model and to one signature below.

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

    def pipeline(self, problem: str, stages: list[StageSpec | dict[str, Any]], **kw: Any) -> dict[str, Any]:
        return self._run(PipelineSpec(problem=problem, stages=stages, **kw))

    def consensus(
        self, question: str, experts: list[str], synthesizer: str | None = None, rounds: int = 1, **kw: Any
    ) -> dict[str, Any]:
        return self._run(ConsensusSpec(problem=question, experts=experts, synthesizer=synthesizer, rounds=rounds, **kw))

    def get_statistics(self) -> dict[str, Any]:
        """Totals over every run of this orchestrator: runs, tasks, success rate, efficiency, utilization."""
        return ray.get(self.coordinator.statistics.remote()).model_dump()

    def close(self) -> None:
        stop_coordinator(self.coordinator)

    def __enter__(self) -> TeamOrchestrator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
