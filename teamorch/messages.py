"""The messages actors exchange and users read: plans in, reports out.

Everything that crosses an actor boundary is one of these pydantic models, so a
plan is validated once, at the edge (YAML file, Python API or an LLM's JSON), and
every actor downstream can trust it. Names follow the seed write-up (`Task`,
`ExecutionWave`, `OrchestrationPlan`) because users come from it.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teamorch.errors import PlanError

TaskStatus = Literal["succeeded", "failed", "cancelled", "skipped"]
# "work" tasks produce findings; "synthesis" tasks (synthesizer, reducer, judge) combine them.
TaskKind = Literal["work", "synthesis"]

# Which run goes first when several share one fleet (`teamorch.policies.priority`): someone is waiting on an
# interactive run's answer, nobody on a batch run's; batch requests yield to interactive ones, with aging.
PriorityClass = Literal["interactive", "batch"]

_CRITERIA = re.compile(r"^(all_tasks_complete|majority|any|at_least:\s*[1-9]\d*)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(_Model):
    """One unit of work for one specialist.

    `server` pins the task to a named server (the seed's behaviour); leave it
    empty to let the balancer choose, which is almost always better.
    `options` override the specialist's generation options for this task
    only (e.g. a larger `num_predict` for the one long report).
    """

    task_id: str = Field(min_length=1)
    specialist: str = Field(min_length=1)
    server: str | None = None
    input_data: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    timeout: float = 300.0
    max_retries: int = Field(default=2, ge=0)
    kind: TaskKind = "work"
    round: int = Field(default=1, ge=1)

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {value}")
        return value


class ExecutionWave(_Model):
    """Tasks that may run at the same time (a topological level of the plan)."""

    wave_number: int = Field(ge=1)
    tasks: list[Task]


class OrchestrationPlan(_Model):
    """A problem, the tasks that attack it, and how to combine what they find.

    Give either `waves` (the seed's form: wave N starts after wave N-1; a task
    without `depends_on` implicitly depends on every task of the previous wave)
    or a flat `tasks` list with `depends_on` edges, from which waves are derived
    as topological levels. After validation both fields are filled in and
    `tasks` carries the complete dependency edges, so the coordinator can start
    each task the moment its own inputs are ready instead of waiting for a
    whole wave.
    """

    problem: str
    waves: list[ExecutionWave] = Field(default_factory=list)
    tasks: list[Task] = Field(default_factory=list)
    synthesis_strategy: str = "merge_all"
    success_criteria: str = "all_tasks_complete"
    context: dict[str, Any] = Field(default_factory=dict)
    pattern: str | None = None
    plan_source: str = "user"
    plan_notes: list[str] = Field(default_factory=list)
    priority_class: PriorityClass | None = None  # None: interactive (`teamorch run --priority-class` overrides)

    @field_validator("success_criteria")
    @classmethod
    def _known_criteria(cls, value: str) -> str:
        if not _CRITERIA.match(value.strip()):
            raise ValueError(
                f"unknown success_criteria {value!r}; use all_tasks_complete, majority, any or 'at_least: N'"
            )
        return value.strip()

    @model_validator(mode="after")
    def _normalise(self) -> OrchestrationPlan:
        if self.synthesis_strategy == "use_first_result" and "success_criteria" not in self.model_fields_set:
            # Hedged runs cancel the losers on purpose: one success is the goal.
            self.success_criteria = "any"
        if self.waves and self.tasks:
            # A normalised plan carries both, and pydantic re-runs this validator on it (a plan inside another
            # model, a dumped plan loaded again): its waves are then exactly the levels of its tasks.
            derived = derive_waves(self.tasks)
            if self.waves != derived:
                raise PlanError("give either 'waves' or 'tasks', not both", field="tasks")
            self.waves = derived
            return self
        if self.waves:
            self.tasks = _tasks_from_waves(self.waves)
        if not self.tasks:
            raise PlanError("the plan has no tasks", field="tasks")
        self.waves = derive_waves(self.tasks)
        return self

    def task(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.task_id == task_id:
                return task
        raise KeyError(task_id)

    def wave_of(self) -> dict[str, int]:
        return {t.task_id: w.wave_number for w in self.waves for t in w.tasks}


def _tasks_from_waves(waves: list[ExecutionWave]) -> list[Task]:
    """Turn the seed's barrier semantics into explicit edges."""
    ordered = sorted(waves, key=lambda w: w.wave_number)
    numbers = [w.wave_number for w in ordered]
    if len(set(numbers)) != len(numbers):
        raise PlanError(f"duplicate wave_number in {numbers}", field="waves")
    tasks: list[Task] = []
    previous: list[str] = []
    for wave in ordered:
        for task in wave.tasks:
            if not task.depends_on and previous:
                task = task.model_copy(update={"depends_on": list(previous)})
            tasks.append(task)
        previous = [t.task_id for t in wave.tasks]
    return tasks


def derive_waves(tasks: list[Task]) -> list[ExecutionWave]:
    """Topological levels: wave 1 has no dependencies, wave N depends on < N.

    Raises `PlanError` naming the offending task for duplicate ids, unknown
    dependencies and cycles (with the cycle spelled out), because those are the
    mistakes people make when writing plans by hand or when an LLM writes them.
    """
    ids: dict[str, Task] = {}
    for index, task in enumerate(tasks):
        if task.task_id in ids:
            raise PlanError(f"duplicate task_id {task.task_id!r}", field=f"tasks[{index}].task_id")
        ids[task.task_id] = task
    for index, task in enumerate(tasks):
        for dep in task.depends_on:
            if dep not in ids:
                raise PlanError(
                    f"task {task.task_id!r} depends on unknown task {dep!r}",
                    field=f"tasks[{index}].depends_on",
                )
            if dep == task.task_id:
                raise PlanError(f"task {task.task_id!r} depends on itself", field=f"tasks[{index}].depends_on")
    level: dict[str, int] = {}
    visiting: list[str] = []

    def visit(task_id: str) -> int:
        if task_id in level:
            return level[task_id]
        if task_id in visiting:
            cycle = [*visiting[visiting.index(task_id) :], task_id]
            raise PlanError("dependency cycle: " + " -> ".join(cycle), field="depends_on")
        visiting.append(task_id)
        deps = ids[task_id].depends_on
        value = 1 + max((visit(d) for d in deps), default=0)
        visiting.pop()
        level[task_id] = value
        return value

    for task_id in ids:
        visit(task_id)
    count = max(level.values())
    return [
        ExecutionWave(wave_number=n, tasks=[t for t in tasks if level[t.task_id] == n]) for n in range(1, count + 1)
    ]


class ChatRequest(_Model):
    """What a specialist asks a server for; backends translate it per protocol."""

    model: str
    messages: list[dict[str, str]]
    options: dict[str, Any] = Field(default_factory=dict)
    format: dict[str, Any] | str | None = None
    role: str = ""


class ChatResponse(_Model):
    """Text plus the timing fields Ollama reports (converted to seconds)."""

    text: str
    model: str
    server: str
    prompt_tokens: int = 0
    tokens: int = 0
    ttft: float | None = None
    eval_seconds: float | None = None
    total_seconds: float = 0.0
    load_seconds: float | None = None
    # Prefix caching, as the server reports it (Ollama's prompt_eval_cached_count / prompt_eval_duration):
    # `prompt_tokens` above counts every prompt token (Ollama's prompt_eval_count), cached ones included.
    prompt_cached_tokens: int | None = None  # None: the server does not say
    prompt_eval_seconds: float | None = None


class Attempt(_Model):
    """One try of a task on one server, kept even when it failed."""

    server: str | None
    started_at: float
    ended_at: float
    outcome: str
    error: str | None = None
    hedge: bool = False  # a duplicate started because the task's attempt ran past its server's tail (hedging)
    wasted_tokens: int = 0  # a cancelled hedge race loser: output tokens its slot could have made (estimated)


class TaskResult(_Model):
    """A task's final state. `duration` is time spent on servers (all attempts);
    `waited` is time queued at the balancer for a free slot. Keeping them apart
    keeps `sequential_duration` honest: it sums work, not waiting."""

    task_id: str
    specialist: str
    server: str | None = None
    wave: int = 0
    status: TaskStatus
    attempts: list[Attempt] = Field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    duration: float = 0.0
    waited: float = 0.0
    output: str | None = None
    error: str | None = None
    tokens: int = 0
    kind: TaskKind = "work"
    round: int = 1
    # The answering call's prompt as the server counted it: how much of it came from the server's prefix cache
    # (None: the server does not say) and how long evaluating the rest took; what prefix-aware routing buys, per task.
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    prompt_eval_seconds: float | None = None
    hedged: bool = False  # a hedge ran for one of its attempts (see `attempts[].hedge`)


class Synthesis(_Model):
    """What the plan's `synthesis_strategy` made of the results.

    A strategy that raises leaves `result` empty and says why in `error`
    (the run is then failed) instead of losing the results already paid for.
    """

    strategy: str  # the strategy's name as the plan gave it, or "custom" for a callable passed from Python
    result: Any = None  # whatever the strategy returned (JSON-serialisable)
    error: str | None = None


class Statistics(_Model):
    """The seed's run metrics, measured from task and attempt intervals (see `policies.synthesis`).

    Durations are seconds. `sequential_duration` sums time on servers (not
    time queued at the balancer), so `parallel_efficiency` = sequential /
    wall says how much the team's parallelism bought; `parallelism_factor` is
    the peak number of requests on servers at once over the task count;
    `server_utilization` is each server's busy fraction of the wall time.
    """

    total_tasks: int = 0
    successful_tasks: int = 0
    failed_tasks: int = 0  # skipped and cancelled tasks are neither successful nor failed
    success_rate: float = 0.0  # successful / total
    total_duration: float = 0.0  # wall time
    sequential_duration: float = 0.0
    parallel_efficiency: float = 0.0
    parallelism_factor: float = 0.0
    server_utilization: dict[str, float] = Field(default_factory=dict)
    tokens: int = 0  # output tokens generated
    prompt_tokens: int = 0  # prompt tokens of the answering calls, as the servers counted them
    cached_tokens: int = 0  # of which the servers took from their prefix caches (where they say)
    hedges: int = 0  # duplicates started by hedging (`balancer.hedge`)
    hedge_wins: int = 0  # tasks whose answer came from the hedge, not the attempt it duplicated
    wasted_tokens: int = 0  # estimated output tokens of cancelled race losers (capacity hedging spent)


class RunTotals(Statistics):
    """`Statistics` summed over every run a coordinator made (`Coordinator.statistics`, the seed's
    `get_statistics`); `runs` counts them, because rates alone do not say how much was run."""

    runs: int = 0


class SessionSpan(_Model):
    """One process lifetime of a journaled run: the first session, then one per `teamorch resume`."""

    session: int
    started_at: float  # epoch seconds
    ended_at: float  # its run_finished, or the last event it wrote before it died
    tasks: list[str] = Field(default_factory=list)  # task ids whose result this session recorded


class RunReport(_Model):
    """Everything one run produced; `teamorch run --json` writes it, clients get it back from the coordinator.

    `plan_source` says who wrote the plan (`user`, `llm`, `llm-repaired`,
    `heuristic`) and `plan_notes` why, so an LLM-made plan can be audited.
    `success` applies the plan's `success_criteria` to the task statuses, and
    is false if synthesis failed or the run was cut short (`error` says why,
    e.g. "run cancelled"). `duration` is wall seconds;
    `tasks` are in plan order, including skipped and cancelled ones.
    """

    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    problem: str
    pattern: str | None = None  # the coordination pattern, None for a hand-written plan
    plan_source: str = "user"
    plan_notes: list[str] = Field(default_factory=list)
    success: bool
    duration: float
    tasks: list[TaskResult]
    synthesis: Synthesis
    statistics: Statistics
    error: str | None = None
    sessions: list[SessionSpan] = Field(default_factory=list)  # which session ran which tasks (the journal's view)
    resumed_at: list[float] = Field(default_factory=list)  # epoch seconds of each `teamorch resume`


class ServerLoad(_Model):
    """One row of the balancer's live load table (a snapshot, safe to hand to policies)."""

    name: str
    slots: int
    effective_slots: int
    in_flight: int = 0
    waiting: int = 0
    healthy: bool = True
    circuit: Literal["closed", "open", "half_open"] = "closed"
    models_present: list[str] | None = None
    models_loaded: list[str] | None = None
    tags: list[str] = Field(default_factory=list)
    ewma_token_seconds: float | None = None
    ewma_ttft: float | None = None
    ewma_latency: float | None = None
    error_rate: float = 0.0
    completed: int = 0
    failed: int = 0
    last_check: float | None = None
    last_error: str | None = None
    ewma_prefill_seconds: float | None = None  # seconds per uncached prompt token (teamorch's token count)
    ewma_load_seconds: float | None = None  # seconds a model load took here
    resident_limit: int = 1  # most models seen resident at once: loading one more evicts the least recently used
    loading_model: str | None = None  # a model being loaded for a granted request
    load_remaining: float = 0.0  # expected seconds until `loading_model` is ready


# ---- balancer, specialist and server messages: one small type per call --------------------------

Policy = Literal["round_robin", "least_loaded", "capability", "peak_ewma"]
# The one list of policy names: config validation, the balancer and the benchmarks all read it.
POLICIES: tuple[Policy, ...] = get_args(Policy)
# Why one request to a server failed (`teamorch.errors.ServerError.error_class`); decides retry and failover.
ErrorClass = Literal["busy", "model_not_found", "unreachable", "error", "timeout", "malformed"]
# How a lease ended: fine, one of the error classes, or cancelled by the caller (says nothing about the server).
Outcome = Literal["ok", "cancelled", "busy", "model_not_found", "unreachable", "error", "timeout", "malformed"]


class Lease(_Model):
    """A slot on one server, granted by the balancer; hand it back with `LeaseOutcome`."""

    lease_id: str  # unique per grant; releasing twice is harmless
    server: str  # the server actor to call
    # Hedging (`balancer.hedge`): seconds into the call after which it is a straggler and the caller may ask
    # for a hedge (`HedgeAsk`); None: do not ask. `expected_seconds`: what the balancer expects the call to take.
    hedge_after: float | None = None
    expected_seconds: float | None = None


class LeaseOutcome(_Model):
    """What happened on a lease: the balancer learns the fleet's speed and health from these."""

    lease_id: str
    outcome: Outcome
    model: str  # the model the request ran (it is resident on the server afterwards)
    latency: float | None = None  # seconds from sending the request to its last byte, client side
    ttft: float | None = None  # seconds to the first streamed token, client side
    tokens: int = 0  # output tokens generated
    eval_seconds: float | None = None  # the server's own generation time (Ollama's eval_duration)
    error: str | None = None  # the failure as the user will read it
    prompt_tokens: int = 0  # prompt tokens as the server counts them (Ollama's prompt_eval_count), cached included
    cached_tokens: int | None = None  # of which the server found in its cache; None: it does not say
    prompt_eval_seconds: float | None = None  # the server's prompt evaluation time (prompt_eval_duration)
    load_seconds: float | None = None  # time the server spent loading the model for this request
    sent: bool = True  # False: the lease went back unused (granted after its caller gave up), no request was sent

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class ProbeResult(_Model):
    """One health check of a server, for the balancer's poll loop."""

    healthy: bool
    checked_at: float  # epoch seconds
    models_present: list[str] | None = None  # None: the protocol cannot tell
    models_loaded: list[str] | None = None  # None: the protocol cannot tell
    latency: float | None = None  # seconds the probe took
    error: str | None = None  # why it is unhealthy


class LeaseRequest(_Model):
    """What a specialist needs from a server.

    `group` asks for diversity: requests sharing a group (the experts of one
    consensus round) are spread over distinct servers when the fleet allows.
    """

    model: str
    requires: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    server: str | None = None
    priority: int = 0
    avoid: list[str] = Field(default_factory=list)
    group: str | None = None
    expected_tokens: int | None = None
    # The prompt's prefix signature (`teamorch.policies.prefix`): cumulative hashes of its blocks in
    # stable-first order, the token count at the end of each block, and the whole prompt's tokens.
    prefix: list[str] = Field(default_factory=list)
    prefix_tokens: list[int] = Field(default_factory=list)
    prompt_tokens: int = 0
    priority_class: PriorityClass = "interactive"  # the run's class: ranks above `priority` at the balancer


class HedgeAsk(_Model):
    """A call on `lease_id` has run `elapsed` seconds past its `hedge_after`: may a duplicate start elsewhere?

    `key` is the duplicate's own dispatch key (never the primary's: server actors and the balancer dedup by
    key, and the two calls must not be mistaken for one)."""

    lease_id: str
    req: LeaseRequest
    elapsed: float
    key: str | None = None


class HedgeGrant(_Model):
    """The balancer's answer to a `HedgeAsk`: a lease for the duplicate, or when to ask again (None: never)."""

    lease: Lease | None = None
    check_after: float | None = None
    reason: str = ""


class LeaseAsk(_Model):
    """One lease asked on the batched path (`teamorch.actors.leases.LeaseClient`): `acquire`'s arguments, named by
    `ask_id` (unique per client), under which its grant comes back and by which a re-sent ask is recognised."""

    ask_id: str
    req: LeaseRequest
    capabilities: list[str] = Field(default_factory=list)
    key: str | None = None  # the dispatch key, as `acquire`'s: asked again for it, the lease held for it comes back


class LeaseCalls(_Model):
    """All one client tells the balancer in one loop turn, as one one-way call: new asks, the asks it no longer
    waits for (timed out, cancelled), and releases."""

    client: str
    asks: list[LeaseAsk] = Field(default_factory=list)
    withdrawn: list[str] = Field(default_factory=list)  # ask ids
    released: list[LeaseOutcome] = Field(default_factory=list)


class LeaseGrant(_Model):
    """The answer to one `LeaseAsk`: its lease, or why none will come (`NoServerAvailable`'s message)."""

    ask_id: str
    lease: Lease | None = None
    refused: str | None = None


class LeaseGrants(_Model):
    """A long poll's answer: every grant and refusal for the client since its last poll, and the balancer's
    incarnation (`epoch`): a new one has never seen the client's open asks, so the client sends them again."""

    epoch: str
    grants: list[LeaseGrant] = Field(default_factory=list)


class LeaseCounters(_Model):
    """How the balancer was asked for leases since it started (this incarnation): Ray calls and planning rounds
    against leases, which is what the batched path saves."""

    acquire_calls: int = 0  # single `acquire` calls (one lease each)
    lease_calls: int = 0  # batched `lease_calls` calls
    asks: int = 0  # asks those carried (re-sent duplicates included)
    polls: int = 0  # `granted` long polls answered
    delivered: int = 0  # grants and refusals those polls carried
    rounds: int = 0  # planning rounds run (for any reason: arrivals, releases, timers)


class Assignment(_Model):
    """One task handed to a specialist, with everything it needs to run it (the coordinator -> specialist call).

    The coordinator's executor and its planner dialogue build these; the
    specialist turns them into a prompt and a `LeaseRequest`.
    """

    task: Task
    problem: str  # the plan's problem, shown to every specialist
    context: dict[str, Any] = Field(default_factory=dict)  # the plan's context (files, notes, the seed's thread)
    upstream: dict[str, dict[str, Any]] = Field(default_factory=dict)  # dependency id -> {specialist, output}
    wave: int = 0  # for the report: the plan's topological level of the task
    priority: int = 0  # critical-path length: the balancer serves longer chains first
    group: str | None = None  # requests sharing a group go to distinct servers (the experts of a consensus round)
    response_format: dict[str, Any] | str | None = None  # a JSON schema (or "json") constraining the output
    run_id: str | None = None  # the run the task belongs to: live events (`Coordinator.task_event`) name it
    priority_class: PriorityClass = "interactive"  # the run's class, passed on in the task's LeaseRequest


class Dispatch(_Model):
    """One task of a batch handed to a specialist at once (`Specialist.run_many`): the assignment and the
    dispatch key `Specialist.run` takes, which names this hand-out at the balancer and the server."""

    assignment: Assignment
    key: str


class JournalSpec(_Model):
    """Where and how the coordinator journals a run (`teamorch.journal`); the CLI builds it.

    `runs_dir` is absolute (the coordinator actor has its own working directory).
    A new run gets `plan_raw`/`team_raw`, the files' mappings with `${ENV}`
    unexpanded; `resume` continues the run already in `runs_dir` instead.
    `secrets` are the values header `${ENV}` references expand to: scrubbed
    from every event before it is written.
    """

    runs_dir: str
    plan_raw: dict[str, Any] | None = None
    team_raw: dict[str, Any] | None = None
    secrets: list[str] = Field(default_factory=list)
    resume: bool = False

    @model_validator(mode="after")
    def _new_runs_have_a_plan(self) -> JournalSpec:
        if not self.resume and self.plan_raw is None:
            raise ValueError("a new journaled run needs plan_raw")
        return self


# ---- coordination patterns: what users write under `pattern:` -----------------------------


class _PatternBase(_Model):
    problem: str
    context: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(default=300.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    synthesis_strategy: str | None = None
    success_criteria: str | None = None
    priority_class: PriorityClass | None = None  # None: interactive


class ParallelAnalysisSpec(_PatternBase):
    """Every specialist looks at the same input at once; an optional synthesizer merges."""

    pattern: Literal["parallel_analysis"] = "parallel_analysis"
    specialists: list[str] = Field(min_length=1)
    synthesizer: str | None = None
    instruction: str | None = None


class ChunkRule(_Model):
    """How one long input is split: by items (as given), lines, paragraphs or characters."""

    by: Literal["items", "lines", "paragraphs", "chars"] = "items"
    size: int = Field(default=1, ge=1)


class DivideAndConquerSpec(_PatternBase):
    """Split a large input into independent parts, fan out, reduce.

    Parts come from `items` (strings or mappings), from `item_files` (globs
    relative to the plan file; each file is one item named by its path) or
    from one long `text` cut by `chunk`. Parts are dealt round-robin to
    `specialists`; the `reducer` receives every part's findings.
    """

    pattern: Literal["divide_and_conquer"] = "divide_and_conquer"
    items: list[Any] = Field(default_factory=list)
    item_files: list[str] = Field(default_factory=list)
    text: str | None = None
    chunk: ChunkRule = Field(default_factory=ChunkRule)
    specialists: list[str] = Field(min_length=1)
    reducer: str | None = None
    instruction: str | None = None
    reducer_instruction: str | None = None


class StageSpec(_Model):
    name: str
    specialists: list[str] = Field(min_length=1)
    instruction: str | None = None


class PipelineSpec(_PatternBase):
    """Sequential stages; a stage may fan out; stage N receives every output of stage N-1."""

    pattern: Literal["pipeline"] = "pipeline"
    stages: list[StageSpec] = Field(min_length=1)


class ConsensusSpec(_PatternBase):
    """Independent expert answers, a vote, optional debate rounds, optional judge.

    Round 1 experts answer alone. While agreement is below
    `agreement_threshold` and rounds remain, each expert sees the others'
    answers and may revise. Experts of a round are spread over distinct
    servers when the fleet allows (diversity is the point of consensus).
    """

    pattern: Literal["consensus"] = "consensus"
    experts: list[str] = Field(min_length=2)
    synthesizer: str | None = None
    rounds: int = Field(default=1, ge=1, le=5)
    agreement_threshold: float = Field(default=0.67, gt=0, le=1)
    instruction: str | None = None


class AutoSpec(_PatternBase):
    """Let the planner specialist write the plan (LLM-made plan, validated, with fallbacks)."""

    pattern: Literal["auto"] = "auto"


PatternSpec = ParallelAnalysisSpec | DivideAndConquerSpec | PipelineSpec | ConsensusSpec | AutoSpec
PATTERN_SPECS: dict[str, type[_PatternBase]] = {
    "parallel_analysis": ParallelAnalysisSpec,
    "divide_and_conquer": DivideAndConquerSpec,
    "pipeline": PipelineSpec,
    "consensus": ConsensusSpec,
    "auto": AutoSpec,
}
