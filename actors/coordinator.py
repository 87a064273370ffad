"""The coordinator: starts the team's actors and runs plans through them.

A task is sent to its specialist the moment all of its dependencies have
succeeded (waves are the plan's shape, not a barrier), with the upstream
outputs it needs. A task whose dependency failed is `skipped`, never run on
half the evidence. Finished results are kept in a per-run journal that
clients can poll (`progress`), so a client that loses the coordinator still
has every result that finished.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import ray

from actors import await_ref
from actors.balancer import LoadBalancer
from actors.server import OllamaServer
from actors.specialist import Specialist
from policies.planning import check_limits, critical_path_priority
from policies.synthesis import compute_statistics, meets_criteria, resolve_strategy
from teamorch.config import TeamConfig
from teamorch.errors import TeamorchError, unwrap
from teamorch.messages import OrchestrationPlan, RunReport, Synthesis, Task, TaskResult


class Coordinator:
    def __init__(self, team: TeamConfig) -> None:
        self.team = team.resolved()
        self.servers: dict[str, Any] = {}
        self.balancer: Any = None
        self.specialists: dict[str, Any] = {}
        self.runs: dict[str, dict[str, TaskResult]] = {}
        self.history: list[RunReport] = []
        self._started = False

    async def start(self) -> list[str]:
        """Create server, balancer and specialist actors; returns the server names once all are ready."""
        if self._started:
            return list(self.servers)
        for cfg in self.team.servers:
            self.servers[cfg.name] = ray.remote(OllamaServer).options(num_cpus=0, max_concurrency=1000).remote(cfg)
        self.balancer = (
            ray.remote(LoadBalancer).options(num_cpus=0, max_concurrency=10000).remote(self.team, self.servers)
        )
        for spec in self.team.specialists:
            self.specialists[spec.name] = (
                ray.remote(Specialist)
                .options(num_cpus=0, max_concurrency=1000)
                .remote(spec, self.balancer, self.servers, self.team.retry)
            )
        names = await asyncio.gather(*(await_ref(h.ready.remote()) for h in self.servers.values()))
        await await_ref(self.balancer.start.remote())
        self._started = True
        return list(names)

    async def servers_load(self) -> list[Any]:
        return await await_ref(self.balancer.snapshot.remote())

    async def progress(self, run_id: str) -> list[TaskResult]:
        return list(self.runs.get(run_id, {}).values())

    async def statistics(self) -> dict[str, Any]:
        """Aggregate over every run this coordinator made (the seed's `get_statistics`)."""
        tasks = [t for r in self.history for t in r.tasks]
        wall = sum(r.duration for r in self.history)
        stats = compute_statistics(tasks, wall).model_dump()
        stats["runs"] = len(self.history)
        return stats

    async def run_plan(self, plan: OrchestrationPlan, run_id: str | None = None) -> RunReport:
        await self.start()
        check_limits(plan)
        run_id = run_id or uuid.uuid4().hex[:12]
        journal: dict[str, TaskResult] = {}
        self.runs[run_id] = journal
        waves = plan.wave_of()
        priority = critical_path_priority(plan)
        started = time.time()
        running: dict[asyncio.Task[TaskResult], Task] = {}
        pending = list(plan.tasks)
        error: str | None = None
        try:
            while pending or running:
                for task in list(pending):
                    deps = [journal.get(d) for d in task.depends_on]
                    if any(d is not None and d.status != "succeeded" for d in deps):
                        bad = next(d for d in deps if d is not None and d.status != "succeeded")
                        journal[task.task_id] = _unrun(
                            task, waves, "skipped", f"dependency {bad.task_id!r} {bad.status}"
                        )
                        pending.remove(task)
                    elif all(d is not None for d in deps):
                        pending.remove(task)
                        running[asyncio.create_task(self._run_task(plan, task, journal, waves, priority))] = task
                if not running:
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    task = running.pop(fut)
                    journal[task.task_id] = fut.result()
        except asyncio.CancelledError:
            error = "run cancelled"
            for fut, task in running.items():
                fut.cancel()
                journal[task.task_id] = _unrun(task, waves, "cancelled", "run cancelled")
            for task in pending:
                journal[task.task_id] = _unrun(task, waves, "cancelled", "run cancelled")
        report = self._report(plan, run_id, journal, started, error)
        self.history.append(report)
        return report

    async def _run_task(
        self,
        plan: OrchestrationPlan,
        task: Task,
        journal: dict[str, TaskResult],
        waves: dict[str, int],
        priority: dict[str, int],
    ) -> TaskResult:
        handle = self.specialists.get(task.specialist)
        if handle is None:
            return _unrun(task, waves, "failed", f"unknown specialist {task.specialist!r}")
        upstream = {d: {"specialist": journal[d].specialist, "output": journal[d].output} for d in task.depends_on}
        ref = handle.run.remote(task, plan.problem, plan.context, upstream, waves[task.task_id], priority[task.task_id])
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except Exception as exc:  # the specialist actor died or raised unexpectedly
            cause = unwrap(exc)
            return _unrun(task, waves, "failed", f"specialist {task.specialist!r} crashed: {cause}")

    def _report(
        self, plan: OrchestrationPlan, run_id: str, journal: dict[str, TaskResult], started: float, error: str | None
    ) -> RunReport:
        wall = time.time() - started
        results = [journal[t.task_id] for t in plan.tasks if t.task_id in journal]
        synthesis = Synthesis(strategy=plan.synthesis_strategy)
        try:
            synthesis.result = resolve_strategy(plan.synthesis_strategy)(results)
        except TeamorchError as exc:
            synthesis.error = str(exc)
        except Exception as exc:  # a user's custom strategy raised: keep the results, report the error
            synthesis.error = f"{type(exc).__name__}: {exc}"
        success = error is None and meets_criteria(plan.success_criteria, results) and synthesis.error is None
        return RunReport(
            run_id=run_id,
            problem=plan.problem,
            pattern=plan.pattern,
            plan_source=plan.plan_source,
            success=success,
            duration=wall,
            tasks=results,
            synthesis=synthesis,
            statistics=compute_statistics(results, wall),
            error=error,
        )

    async def shutdown(self) -> None:
        for handle in [*self.specialists.values(), self.balancer, *self.servers.values()]:
            if handle is not None:
                ray.kill(handle)
        self.specialists, self.servers, self.balancer, self._started = {}, {}, None, False


def _unrun(task: Task, waves: dict[str, int], status: str, error: str) -> TaskResult:
    return TaskResult(
        task_id=task.task_id,
        specialist=task.specialist,
        server=task.server,
        wave=waves.get(task.task_id, 0),
        status=status,  # type: ignore[arg-type]
        error=error,
    )
