"""The coordinator: starts the team's actors, runs plans and patterns through them, keeps the journals.

Its jobs are lifecycle and bookkeeping. The DAG loop is `actors.executor`;
what to start, skip or cancel is `policies.dag`; the planner conversation is
`policies.planner_dialogue`. Every run has a journal (`teamorch.journal`: on
disk for `teamorch run`, in memory for the Python API): its events are what
`events()` serves to clients following the run, and the report is rebuilt
from it (`policies.reporting.build_report` over the journaled results).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Literal

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from teamorch.actors import await_ref, settle_heap
from teamorch.actors.balancer import LoadBalancer
from teamorch.actors.executor import PlanExecutor, RunRecorder, run_consensus
from teamorch.actors.metrics import fleet_metrics
from teamorch.actors.server import ModelServer
from teamorch.actors.specialist import Specialist
from teamorch.config import TeamConfig
from teamorch.errors import ConfigError
from teamorch.journal import MIN_SECRET_LENGTH, REDACTED, JournalEvent, LiveEvent, RunJournal, RunState
from teamorch.messages import (
    Assignment,
    AutoSpec,
    ConsensusSpec,
    JournalSpec,
    OrchestrationPlan,
    PatternSpec,
    RunReport,
    RunTotals,
    ServerLoad,
    Statistics,
    TaskResult,
)
from teamorch.plans import Runnable
from teamorch.policies.planner_dialogue import BUILTIN_PLANNER, PlannerDialogue, PlannerRequest, specialist_roles
from teamorch.policies.planning import build_plan, check_limits
from teamorch.policies.synthesis import Strategy, merge_statistics, resolve_strategy

KEEP_FINISHED_JOURNALS = 16
ACTOR_OPTIONS = {"num_cpus": 0, "max_concurrency": 1000}  # they wait on the network, not the CPU
# Server, balancer and specialist actors are restarted by Ray when their process dies, and the calls that were
# running on them are sent again to the new incarnation: each call is safe to repeat (a chat or a lease names its
# dispatch key, a release is idempotent, a probe reads). Bounded, so an actor that crashes on start-up fails the
# run instead of looping.
SUPERVISED = {"max_restarts": 5, "max_task_retries": 3}
DRAIN_SECONDS = 2.0  # `shutdown` waits this long at most for specialists' releases in flight
ActorKind = Literal["server", "balancer", "specialist"]


def _placed(resources: dict[str, float], here: NodeAffinitySchedulingStrategy) -> dict[str, Any]:
    """Options of an actor the coordinator starts: where its Ray `resources` say (a server next to its
    Ollama box), else on the coordinator's node, so that losing another node costs only the actors
    pinned there, never the balancer or a specialist. Hard affinity: a soft one spills to other nodes
    whenever this one is slow to start workers (measured), and the node cannot be gone while the
    coordinator runs on it."""
    if resources:
        return {**ACTOR_OPTIONS, "resources": resources}
    return {**ACTOR_OPTIONS, "scheduling_strategy": here}


class Coordinator:
    """The team's front door (a Ray actor): one per team, shared by every client that runs plans on it.

    `team` is the resolved team (default servers filled in, every model
    named). `max_workers` caps the tasks of one run in flight at once (the
    seed's knob; None means no cap beyond the balancer's per-server slots).
    `servers`, `balancer` and `specialists` are the actor handles `start()`
    creates, by name. `runs` holds each run in progress (its results and its
    journal: on disk when the caller passed a `JournalSpec`, else in memory)
    and `finished` the last `KEEP_FINISHED_JOURNALS` finished ones, so a
    client interrupted at the end of a run still collects its results and
    events; `totals` and `run_count` are running sums, because a long-lived
    coordinator must not grow with every task it ever ran.
    """

    def __init__(self, team: TeamConfig, max_workers: int | None = None) -> None:
        self.team = team.resolved()
        self.max_workers = max_workers
        self.servers: dict[str, ActorHandle] = {}
        self.balancer: ActorHandle | None = None
        self.specialists: dict[str, ActorHandle] = {}
        self.runs: dict[str, RunRecorder] = {}
        self.finished: OrderedDict[str, RunRecorder] = OrderedDict()
        self.totals: Statistics | None = None
        self.run_count = 0
        self._started = False
        # Header values are credentials (the expanded `${ENV}`): scrubbed from every journal, on disk or not.
        self._secrets = [v for s in self.team.servers for v in s.headers.values() if len(v) >= MIN_SECRET_LENGTH]
        settle_heap()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Create server, balancer and specialist actors; returns the server names once all are ready."""
        if self._started:
            return list(self.servers)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self_handle = ray.get_runtime_context().current_actor
        for cfg in self.team.servers:
            # A request to a server that died is failed over by its specialist (to another server, within the
            # task deadline), never retried by Ray: a server pinned to a lost node would never come back.
            placed = {**_placed(cfg.ray_resources, here), **SUPERVISED, "max_task_retries": 0}
            self.servers[cfg.name] = ray.remote(ModelServer).options(**placed).remote(cfg, self_handle)
        self.balancer = (
            ray.remote(LoadBalancer).options(**_placed({}, here), **SUPERVISED).remote(self.team, self.servers)
        )
        for spec in specialist_roles(self.team):
            self.specialists[spec.name] = (
                ray.remote(Specialist)
                .options(**_placed(spec.ray_resources, here), **SUPERVISED)
                .remote(spec, self.balancer, self.servers, self.team.retry, self_handle)
            )
        names = await asyncio.gather(*(await_ref(h.ready.remote()) for h in self.servers.values()))
        # Specialists too: each is a worker process (~0.4 s to start on 2 cores), and a first wave whose
        # specialists came up one by one reached the cold balancer in bursts, so its first plan gave every slot
        # to the first specialist's prompt (prefix fleet B: 1.6-1.8x the bound, 1.3x with the wave whole).
        await asyncio.gather(*(await_ref(h.__ray_ready__.remote()) for h in self.specialists.values()))
        await await_ref(self.balancer.start.remote())
        self._started = True
        return list(names)

    async def shutdown(self) -> None:
        """Stop the team: specialists first, once their releases have reached the balancer (`drain`, 2 s at
        most: a specialist that does not answer is killed all the same)."""
        drains = asyncio.gather(*(h.drain.remote() for h in self.specialists.values()), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drains, DRAIN_SECONDS)
        for handle in [*self.specialists.values(), self.balancer, *self.servers.values()]:
            if handle is not None:
                ray.kill(handle)
        self.specialists, self.servers, self.balancer, self._started = {}, {}, None, False

    async def crash(self, kind: ActorKind, name: str = "") -> str:
        """Fault drill: kill one of the team's actors as a crash would (Ray restarts it); returns what was killed.

        The coordinator holds the only handles, so a drill (the fault suite, a
        test) goes through it. `name` is the server's or specialist's name.
        """
        await self.start()
        actors: dict[str, ActorHandle | None] = {
            "server": self.servers.get(name),
            "specialist": self.specialists.get(name),
            "balancer": self.balancer,
        }
        handle = actors[kind]
        if handle is None:
            raise ConfigError(f"no {kind} named {name!r} in this team", field=kind)
        ray.kill(handle, no_restart=False)
        return f"{kind} {name}".strip()

    # ---- observation ---------------------------------------------------------------------

    async def config(self) -> TeamConfig:
        """The team as this coordinator runs it (resolved), so a client checks a plan against the team that is
        up, not against a file of its own. Header values are credentials: a client gets their names only."""
        servers = [s.model_copy(update={"headers": dict.fromkeys(s.headers, REDACTED)}) for s in self.team.servers]
        return self.team.model_copy(update={"servers": servers})

    async def servers_load(self) -> list[ServerLoad]:
        await self.start()
        return await await_ref(self.balancer.snapshot.remote())

    async def progress(self, run_id: str) -> list[TaskResult]:
        """Results of `run_id` finished so far (clients poll this to show progress and to keep what finished)."""
        run = self.runs.get(run_id) or self.finished.get(run_id)
        return list(run.results.values()) if run else []

    async def events(self, run_id: str, since: int = 0, types: list[str] | None = None) -> list[JournalEvent]:
        """The events of `run_id` after seq `since`, in order ([] for a run not (yet) known here).

        Any client may follow any run by polling with the last seq it saw: the
        events are the run's journal, so seq has no gaps and ends with run_finished.
        `types` keeps only events of those types: a client that only keeps
        what finished (`api.execute` with no callback) asks for `task_finished`,
        a third of a run's events to pickle here and unpickle there.
        """
        run = self.runs.get(run_id) or self.finished.get(run_id)
        events = run.journal.since(since) if run else []
        return events if types is None else [e for e in events if e.type in types]

    async def task_event(self, run_id: str, event: LiveEvent) -> None:
        """A specialist reports a task's attempt as it happens (`Assignment.run_id` names the run), and a
        server actor the tokens it has streamed for one (`tokens_generated`, throttled at the server).

        The same facts are journaled from the result's attempts when it arrives
        (keyed by session, task and attempt, so written once): a report lost or
        late costs liveness, never the record. Progress has no such copy: the
        journal drops it once its attempt is no longer running.
        """
        await self.task_events(run_id, [event])

    async def task_events(self, run_id: str, events: list[LiveEvent]) -> None:
        """`task_event` for several reports of one run at once: a specialist sends those of one loop turn
        together (`actors.TurnBatch`), in the order they happened."""
        run = self.runs.get(run_id)
        if run is not None:
            with run.journal.group():
                for event in events:
                    run.live(event)

    async def runs(self) -> list[RunState]:
        """Runs in progress on this coordinator, then the last finished ones it keeps (`teamorch status`)."""
        return [run.journal.state() for run in [*self.runs.values(), *self.finished.values()]]

    async def statistics(self) -> RunTotals:
        """Totals over every run this coordinator made (the seed's `get_statistics`)."""
        return RunTotals(runs=self.run_count, **(self.totals or Statistics()).model_dump())

    # ---- runs ----------------------------------------------------------------------------

    async def run_plan(
        self,
        plan: OrchestrationPlan,
        run_id: str | None = None,
        synthesis: Strategy | None = None,
        journal: JournalSpec | None = None,
    ) -> RunReport:
        """Run a plan to the end; `synthesis` (a callable) overrides the plan's strategy; `journal` keeps
        the run on disk (or resumes the one there), else its journal lives in memory."""
        _check(plan, synthesis)
        run = await self._open(run_id, plan, journal)
        return await self._drive(run, self._execute(plan, run), synthesis)

    async def run_pattern(
        self, spec: PatternSpec, run_id: str | None = None, journal: JournalSpec | None = None
    ) -> RunReport:
        """Run one of the four coordination patterns (or `auto`: let the planner choose)."""
        if not isinstance(spec, AutoSpec):
            _check(build_plan(spec), None)  # a bad strategy or too many tasks fails before any model call
        run = await self._open(run_id, spec, journal)
        return await self._drive(run, self._pattern(spec, run), None)

    async def _pattern(self, spec: PatternSpec, run: RunRecorder) -> str | None:
        if isinstance(spec, ConsensusSpec):
            return await run_consensus(spec, run.results, lambda p: self._execute(p, run))
        if isinstance(spec, AutoSpec):
            plan = run.journal.plan() or await self.create_plan(spec)  # a resumed run never asks the planner again
            _check(plan, None)
        else:
            plan = build_plan(spec)
        return await self._execute(plan, run)

    async def create_plan(self, spec: AutoSpec) -> OrchestrationPlan:
        """Ask the planner specialist for a plan for `spec.problem`; one repair attempt; then a heuristic."""
        await self.start()
        planner = self.team.planner or BUILTIN_PLANNER
        dialogue = PlannerDialogue(spec, self.team.specialists, planner)
        step: PlannerRequest | OrchestrationPlan = dialogue.opening()
        while isinstance(step, PlannerRequest):
            result = await self.specialists[planner].run.remote(
                Assignment(
                    task=step.task,
                    problem=spec.problem,
                    context=spec.context,
                    upstream=step.upstream,
                    response_format=dialogue.schema,
                )
            )
            step = dialogue.hear(result)
        return step

    async def _open(self, run_id: str | None, runnable: Runnable, spec: JournalSpec | None) -> RunRecorder:
        """The run's recorder over a new journal, or over the journal it resumes (its finished results seeded)."""
        await self.start()
        run_id = run_id or uuid.uuid4().hex[:12]
        if run_id in self.runs:
            raise ConfigError(f"run {run_id!r} is already running on this coordinator", field="run_id")
        secrets = [*self._secrets, *(spec.secrets if spec else [])]
        if spec is None:
            raw = runnable.model_dump(mode="json", fallback=repr)
            journal = RunJournal.in_memory(run_id, raw, secrets=secrets)
        elif spec.resume:
            journal = RunJournal.open(Path(spec.runs_dir), run_id, secrets=secrets)
            journal.resume()
        else:
            journal = RunJournal.create(
                Path(spec.runs_dir), run_id, spec.plan_raw or {}, spec.team_raw, secrets=secrets
            )
        run = RunRecorder(journal, runnable.priority_class or "interactive")
        self.runs[run_id] = run
        return run

    async def _execute(self, plan: OrchestrationPlan, run: RunRecorder) -> str | None:
        run.resolved(plan)  # journaled before the first task: a resume runs this plan, never a new one
        return await PlanExecutor(plan, run, self.specialists, self.max_workers).run()

    async def _drive(self, run: RunRecorder, work: Awaitable[str | None], synthesis: Strategy | None) -> RunReport:
        """Await the run's work, then report it; a run that raised keeps its journal resumable."""
        try:
            error = await work
        except BaseException:
            run.journal.close()
            self._retire(run)
            raise
        report = run.finish(error, synthesis)
        fleet_metrics().run_finished(report)
        self._retire(run)
        self.totals = report.statistics if self.totals is None else merge_statistics(self.totals, report.statistics)
        self.run_count += 1
        return report

    def _retire(self, run: RunRecorder) -> None:
        self.finished[run.run_id] = self.runs.pop(run.run_id, run)
        while len(self.finished) > KEEP_FINISHED_JOURNALS:
            self.finished.popitem(last=False)


def _check(plan: OrchestrationPlan, synthesis: Strategy | None) -> None:
    """Refuse a plan before any model call: too many tasks, or a strategy that does not resolve."""
    check_limits(plan)
    if synthesis is None:
        resolve_strategy(plan.synthesis_strategy)
