"""The coordinator: starts the team's actors and runs plans and patterns through them.

A task is sent to its specialist the moment all of its dependencies have
succeeded (waves are the plan's shape, not a barrier), with the upstream
outputs it needs. A task whose dependency failed is `skipped`, never run on
half the evidence. Finished results go into a per-run journal that clients
poll (`progress`), so a client that loses the coordinator still has every
result that finished.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ray

from actors import await_ref
from actors.balancer import LoadBalancer
from actors.server import OllamaServer
from actors.specialist import Specialist
from policies.planner_prompt import META_PROMPT, roster_text
from policies.planning import (
    build_plan,
    check_limits,
    consensus_judge,
    consensus_round,
    critical_path_priority,
    heuristic_spec,
    parse_llm_plan,
    plan_for,
    plan_schema,
)
from policies.synthesis import compute_statistics, meets_criteria, merge_statistics, resolve_strategy, vote
from teamorch.config import SpecialistConfig, TeamConfig
from teamorch.errors import PlanError, TeamorchError, unwrap
from teamorch.messages import (
    AutoSpec,
    ConsensusSpec,
    DivideAndConquerSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    PatternSpec,
    PipelineSpec,
    RunReport,
    StageSpec,
    Statistics,
    Synthesis,
    Task,
    TaskResult,
)

BUILTIN_PLANNER = "Planner"
KEEP_FINISHED_JOURNALS = 16
PLANNER_OPTIONS = {"num_predict": 512, "temperature": 0.2}

Journal = dict[str, TaskResult]


class Coordinator:
    def __init__(self, team: TeamConfig, max_workers: int | None = None) -> None:
        self.team = team.resolved()
        self.max_workers = max_workers
        self.servers: dict[str, Any] = {}
        self.balancer: Any = None
        self.specialists: dict[str, Any] = {}
        # Journals of runs in progress plus the last few finished ones (a client interrupted at the
        # end of a run still collects them), and running totals: a long-lived coordinator must not
        # grow with every task it ever ran.
        self.runs: dict[str, Journal] = {}
        self.finished: OrderedDict[str, Journal] = OrderedDict()
        self.totals: Statistics | None = None
        self.run_count = 0
        self._started = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Create server, balancer and specialist actors; returns the server names once all are ready."""
        if self._started:
            return list(self.servers)
        actor = {"num_cpus": 0, "max_concurrency": 1000}
        for cfg in self.team.servers:
            self.servers[cfg.name] = ray.remote(OllamaServer).options(**actor).remote(cfg)
        self.balancer = ray.remote(LoadBalancer).options(**actor).remote(self.team, self.servers)
        for spec in self._specialist_configs():
            self.specialists[spec.name] = (
                ray.remote(Specialist).options(**actor).remote(spec, self.balancer, self.servers, self.team.retry)
            )
        names = await asyncio.gather(*(await_ref(h.ready.remote()) for h in self.servers.values()))
        await await_ref(self.balancer.start.remote())
        self._started = True
        return list(names)

    def _specialist_configs(self) -> list[SpecialistConfig]:
        specs = list(self.team.specialists)
        if self.team.planner is None and self.team.specialists:
            model = self.team.default_model or self.team.specialists[0].model
            specs.append(
                SpecialistConfig(
                    name=BUILTIN_PLANNER, model=model, system_prompt=META_PROMPT, options=dict(PLANNER_OPTIONS)
                )
            )
        elif self.team.planner is not None:
            specs = [
                s.model_copy(update={"system_prompt": (s.system_prompt + "\n\n" + META_PROMPT).strip()})
                if s.name == self.team.planner
                else s
                for s in specs
            ]
        return specs

    async def shutdown(self) -> None:
        for handle in [*self.specialists.values(), self.balancer, *self.servers.values()]:
            if handle is not None:
                ray.kill(handle)
        self.specialists, self.servers, self.balancer, self._started = {}, {}, None, False

    # ---- observation ---------------------------------------------------------------------

    async def servers_load(self) -> list[Any]:
        await self.start()
        return await await_ref(self.balancer.snapshot.remote())

    async def progress(self, run_id: str) -> list[TaskResult]:
        return list((self.runs.get(run_id) or self.finished.get(run_id) or {}).values())

    async def statistics(self) -> dict[str, Any]:
        """Totals over every run this coordinator made (the seed's `get_statistics`)."""
        stats = (self.totals or Statistics()).model_dump()
        stats["runs"] = self.run_count
        return stats

    # ---- plans -----------------------------------------------------------------------------

    async def run_plan(
        self,
        plan: OrchestrationPlan,
        run_id: str | None = None,
        synthesis: Callable[[list[TaskResult]], Any] | None = None,
    ) -> RunReport:
        """Run a plan to the end; `synthesis` (a callable) overrides the plan's strategy."""
        await self.start()
        check_limits(plan)
        run_id = run_id or uuid.uuid4().hex[:12]
        journal: Journal = {}
        self.runs[run_id] = journal
        started = time.time()
        error = await self._execute(plan, journal, run_id)
        return self._finish(plan, run_id, journal, started, error, synthesis)

    async def run_pattern(self, spec: PatternSpec, run_id: str | None = None) -> RunReport:
        """Run one of the four coordination patterns (or `auto`: let the planner choose)."""
        if isinstance(spec, ConsensusSpec):
            return await self._run_consensus(spec, run_id or uuid.uuid4().hex[:12])
        if isinstance(spec, AutoSpec):
            plan = await self.create_plan(spec.problem, spec.context)
            return await self.run_plan(plan, run_id)
        return await self.run_plan(build_plan(spec), run_id)

    async def parallel_analysis(
        self, problem: str, specialists: list[str], synthesizer: str | None = None, **kw: Any
    ) -> RunReport:
        return await self.run_pattern(
            ParallelAnalysisSpec(problem=problem, specialists=specialists, synthesizer=synthesizer, **kw)
        )

    async def divide_and_conquer(
        self, problem: str, items: list[Any], specialists: list[str], reducer: str | None = None, **kw: Any
    ) -> RunReport:
        return await self.run_pattern(
            DivideAndConquerSpec(problem=problem, items=items, specialists=specialists, reducer=reducer, **kw)
        )

    async def pipeline(self, problem: str, stages: list[StageSpec | dict[str, Any]], **kw: Any) -> RunReport:
        return await self.run_pattern(PipelineSpec(problem=problem, stages=stages, **kw))

    async def consensus(
        self, question: str, experts: list[str], synthesizer: str | None = None, rounds: int = 1, **kw: Any
    ) -> RunReport:
        return await self.run_pattern(
            ConsensusSpec(problem=question, experts=experts, synthesizer=synthesizer, rounds=rounds, **kw)
        )

    # ---- execution -------------------------------------------------------------------------

    async def _execute(self, plan: OrchestrationPlan, journal: Journal, run_id: str) -> str | None:
        """Run every task of `plan` not yet in `journal`; returns an error text if the run was cut short.

        With `use_first_result` the run is hedged: the first successful work
        task wins and every other one is cancelled, which closes its HTTP
        request on the server side.
        """
        waves = plan.wave_of()
        priority = critical_path_priority(plan)
        hedged = plan.synthesis_strategy == "use_first_result"
        limit = self.max_workers or len(plan.tasks)
        running: dict[asyncio.Task[TaskResult], Task] = {}
        pending = [t for t in plan.tasks if t.task_id not in journal]
        try:
            while pending or running:
                for task in list(pending):
                    deps = [journal.get(d) for d in task.depends_on]
                    bad = next((d for d in deps if d is not None and d.status != "succeeded"), None)
                    if bad is not None:
                        journal[task.task_id] = _unrun(
                            task, waves, "skipped", f"dependency {bad.task_id!r} {bad.status}"
                        )
                        pending.remove(task)
                    elif all(d is not None for d in deps) and len(running) < limit:
                        pending.remove(task)
                        job = self._run_task(plan, task, journal, waves[task.task_id], priority[task.task_id], run_id)
                        running[asyncio.create_task(job)] = task
                if not running:
                    if pending:  # only reachable if a dependency can never finish
                        for task in pending:
                            journal[task.task_id] = _unrun(task, waves, "skipped", "dependencies never finished")
                        pending.clear()
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    task = running.pop(fut)
                    journal[task.task_id] = fut.result()
                    if hedged and task.kind == "work" and journal[task.task_id].status == "succeeded":
                        await self._cancel(running, pending, journal, waves, f"hedged: {task.task_id!r} finished first")
        except asyncio.CancelledError:
            await self._cancel(running, pending, journal, waves, "run cancelled")
            return "run cancelled"
        return None

    async def _cancel(
        self,
        running: dict[asyncio.Task[TaskResult], Task],
        pending: list[Task],
        journal: Journal,
        waves: dict[str, int],
        reason: str,
    ) -> None:
        for fut, task in list(running.items()):
            if task.kind != "work" and reason.startswith("hedged"):
                continue
            fut.cancel()
            running.pop(fut)
            journal[task.task_id] = _unrun(task, waves, "cancelled", f"{reason}; its request was closed")
        await asyncio.sleep(0)
        for task in list(pending):
            if task.kind == "work" or not reason.startswith("hedged"):
                journal[task.task_id] = _unrun(task, waves, "cancelled", reason)
                pending.remove(task)

    async def _run_task(
        self, plan: OrchestrationPlan, task: Task, journal: Journal, wave: int, priority: int, run_id: str
    ) -> TaskResult:
        handle = self.specialists.get(task.specialist)
        if handle is None:
            return _unrun(task, {task.task_id: wave}, "failed", f"unknown specialist {task.specialist!r}")
        upstream = {d: {"specialist": journal[d].specialist, "output": journal[d].output} for d in task.depends_on}
        # Consensus experts of one round ask for distinct servers: diversity is the point of voting.
        group = f"{run_id}-r{task.round}" if plan.pattern == "consensus" and task.kind == "work" else None
        ref = handle.run.remote(task, plan.problem, plan.context, upstream, wave, priority, group=group)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except Exception as exc:  # the specialist actor died or raised unexpectedly
            return _unrun(
                task, {task.task_id: wave}, "failed", f"specialist {task.specialist!r} crashed: {unwrap(exc)}"
            )

    async def _run_consensus(self, spec: ConsensusSpec, run_id: str) -> RunReport:
        await self.start()
        journal: Journal = {}
        self.runs[run_id] = journal
        started = time.time()
        tasks: list[Task] = []
        error = None
        for round_no in range(1, spec.rounds + 1):
            tasks += consensus_round(spec, round_no)
            error = await self._execute(plan_for(spec, "consensus", tasks), journal, run_id)
            result = vote([journal[t.task_id] for t in tasks if t.round == round_no])
            if error or result["agreement"] >= spec.agreement_threshold:
                break
        if spec.synthesizer and not error:
            tasks.append(consensus_judge(spec, round_no, _vote_summary(result)))
            error = await self._execute(plan_for(spec, "consensus", tasks), journal, run_id)
        return self._finish(plan_for(spec, "consensus", tasks), run_id, journal, started, error, None)

    # ---- LLM-made plans ------------------------------------------------------------------

    async def create_plan(self, problem: str, context: dict[str, Any] | None = None) -> OrchestrationPlan:
        """Ask the planner for a plan; one repair attempt; then a deterministic heuristic.

        The planner's JSON is constrained by the plan schema (Ollama `format`,
        specialist names as an enum) and validated again here: an LLM must
        never route work to servers or specialists that do not exist.
        """
        await self.start()
        context = context or {}
        planner = self.team.planner or BUILTIN_PLANNER
        roster = [s for s in self.team.specialists if s.name != BUILTIN_PLANNER]
        names = [s.name for s in roster]
        if not names:
            raise PlanError("the team has no specialists for the planner to choose from", field="specialists")
        schema = plan_schema(names)
        ask = roster_text([(s.name, s.capabilities, s.system_prompt) for s in roster])
        notes: list[str] = []
        handle = self.specialists[planner]
        task = Task(
            task_id="plan",
            specialist=planner,
            input_data={"instruction": ask + "\n\nWrite the plan as JSON."},
            max_retries=1,
        )
        result: TaskResult = await handle.run.remote(task, problem, context, response_format=schema)
        if result.status == "succeeded":
            try:
                plan = parse_llm_plan(result.output or "", names, problem, context, source="llm")
                return plan.model_copy(update={"plan_notes": ["plan written by the planner"]})
            except PlanError as exc:
                notes.append(f"planner output rejected: {exc}")
                repair = task.model_copy(
                    update={
                        "task_id": "plan_repair",
                        "input_data": {
                            "instruction": f"{ask}\n\nYour previous plan (above) was rejected: {exc}. "
                            "Write a corrected plan as JSON."
                        },
                    }
                )
                upstream = {"plan": {"specialist": planner, "output": result.output}}
                again: TaskResult = await handle.run.remote(repair, problem, context, upstream, response_format=schema)
                if again.status == "succeeded":
                    try:
                        plan = parse_llm_plan(again.output or "", names, problem, context, source="llm-repaired")
                        return plan.model_copy(update={"plan_notes": [*notes, "repaired plan accepted"]})
                    except PlanError as exc2:
                        notes.append(f"repaired output rejected: {exc2}")
                else:
                    notes.append(f"planner repair call failed: {again.error}")
        else:
            notes.append(f"planner call failed: {result.error}")
        spec = heuristic_spec(problem, context, [(s.name, s.capabilities) for s in roster])
        plan = build_plan(spec)  # a heuristic consensus has the default single round
        notes.append(f"heuristic fallback chose {spec.pattern}")
        return plan.model_copy(update={"plan_source": "heuristic", "plan_notes": notes})

    # ---- reporting -------------------------------------------------------------------------

    def _finish(
        self,
        plan: OrchestrationPlan,
        run_id: str,
        journal: Journal,
        started: float,
        error: str | None,
        synthesis: Callable[[list[TaskResult]], Any] | None,
    ) -> RunReport:
        wall = time.time() - started
        results = [journal[t.task_id] for t in plan.tasks if t.task_id in journal]
        strategy = "custom" if synthesis is not None else plan.synthesis_strategy
        out = Synthesis(strategy=strategy)
        try:
            out.result = (synthesis or resolve_strategy(plan.synthesis_strategy))(results)
        except TeamorchError as exc:
            out.error = str(exc)
        except Exception as exc:  # a user's custom strategy raised: keep the results, report the error
            out.error = f"{type(exc).__name__}: {exc}"
        success = error is None and out.error is None and meets_criteria(plan.success_criteria, results)
        report = RunReport(
            run_id=run_id,
            problem=plan.problem,
            pattern=plan.pattern,
            plan_source=plan.plan_source,
            plan_notes=plan.plan_notes,
            success=success,
            duration=wall,
            tasks=results,
            synthesis=out,
            statistics=compute_statistics(results, wall),
            error=error,
        )
        self.finished[run_id] = self.runs.pop(run_id, journal)
        while len(self.finished) > KEEP_FINISHED_JOURNALS:
            self.finished.popitem(last=False)
        self.totals = report.statistics if self.totals is None else merge_statistics(self.totals, report.statistics)
        self.run_count += 1
        return report


def _vote_summary(result: dict[str, Any]) -> str:
    votes = "; ".join(f"{answer!r}: {', '.join(voters)}" for answer, voters in result["votes"].items())
    return f"{votes} (agreement {result['agreement']:.0%}{', tie' if result['tie'] else ''})"


def _unrun(task: Task, waves: dict[str, int], status: str, error: str) -> TaskResult:
    return TaskResult(
        task_id=task.task_id,
        specialist=task.specialist,
        server=task.server,
        wave=waves.get(task.task_id, 0),
        status=status,  # type: ignore[arg-type]
        error=error,
        kind=task.kind,
        round=task.round,
    )
