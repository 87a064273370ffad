"""Plan shape: patterns -> plans, LLM plan validation, heuristics, critical path, limits.

Waves themselves are derived in `teamorch.messages.derive_waves` (a plan is
validated where it is parsed); this module holds the judgements made to build
a plan and to schedule a valid one. No I/O: files named by a pattern are read
by the caller and arrive here as items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teamorch.errors import PlanError
from teamorch.messages import (
    ConsensusSpec,
    DivideAndConquerSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    PatternSpec,
    PipelineSpec,
    Task,
)

MAX_TASKS = 500
MAX_LLM_TASKS = 12
ANSWER_INSTRUCTION = "Give your reasoning briefly, then end with one line 'ANSWER: <your choice in a few words>'."
SYNTH_HINTS = ("synthesis", "synthesizer", "architect", "judge", "reducer", "planning", "merge")
DECISION_WORDS = re.compile(r"\b(choose|decide|decision|which|best|compare|versus|vs\.?|should we|pick|prefer)\b", re.I)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "task"


def _unique(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for task_id in ids:
        seen[task_id] = seen.get(task_id, 0) + 1
        out.append(task_id if seen[task_id] == 1 else f"{task_id}_{seen[task_id]}")
    return out


def plan_for(spec: PatternSpec, default_strategy: str, tasks: list[Task]) -> OrchestrationPlan:
    """Wrap a pattern's tasks in a plan carrying the spec's problem, context and synthesis settings."""
    fields: dict[str, Any] = {
        "problem": spec.problem,
        "tasks": tasks,
        "context": spec.context,
        "pattern": spec.pattern,
        "synthesis_strategy": spec.synthesis_strategy or default_strategy,
    }
    if spec.success_criteria:
        fields["success_criteria"] = spec.success_criteria
    return OrchestrationPlan.model_validate(fields)


def _task(spec: PatternSpec, task_id: str, specialist: str, instruction: str | None, **kw: Any) -> Task:
    data = dict(kw.pop("input_data", {}))
    if instruction:
        data["instruction"] = instruction
    return Task(
        task_id=task_id, specialist=specialist, input_data=data, timeout=spec.timeout, options=spec.options, **kw
    )


def parallel_analysis_plan(spec: ParallelAnalysisSpec) -> OrchestrationPlan:
    ids = _unique([slug(s) for s in spec.specialists])
    tasks = [_task(spec, i, s, spec.instruction) for i, s in zip(ids, spec.specialists, strict=True)]
    if spec.synthesizer:
        tasks.append(
            _task(
                spec,
                "synthesis",
                spec.synthesizer,
                "Merge the findings above into one answer; resolve disagreements by weighing evidence.",
                depends_on=ids,
                kind="synthesis",
            )
        )
    return plan_for(spec, "merge_all", tasks)


def split_parts(spec: DivideAndConquerSpec) -> list[tuple[str, Any]]:
    """(name, content) per part, by the spec's chunk rule."""
    if spec.items:
        parts = [(_item_name(item, i), item) for i, item in enumerate(spec.items, 1)]
        if spec.chunk.size > 1:
            groups = [parts[i : i + spec.chunk.size] for i in range(0, len(parts), spec.chunk.size)]
            return [(" + ".join(n for n, _ in g), [c for _, c in g]) for g in groups]
        return parts
    if spec.text is None:
        raise PlanError("divide_and_conquer needs items, item_files or text", field="items")
    text, size = spec.text, spec.chunk.size
    if spec.chunk.by == "chars":
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
    else:
        units = (
            text.splitlines()
            if spec.chunk.by in ("lines", "items")
            else [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        )
        joiner = "\n" if spec.chunk.by in ("lines", "items") else "\n\n"
        pieces = [joiner.join(units[i : i + size]) for i in range(0, len(units), size)]
    return [(f"part {i}", p) for i, p in enumerate(pieces, 1) if p.strip()]


def _item_name(item: Any, index: int) -> str:
    if isinstance(item, dict):
        return str(item.get("name") or item.get("path") or f"item {index}")
    return f"item {index}"


def divide_and_conquer_plan(spec: DivideAndConquerSpec) -> OrchestrationPlan:
    parts = split_parts(spec)
    if not parts:
        raise PlanError("divide_and_conquer produced no parts (empty input?)", field="items")
    tasks = []
    for i, (name, content) in enumerate(parts, 1):
        specialist = spec.specialists[(i - 1) % len(spec.specialists)]
        instruction = spec.instruction or f"Analyse {name} (part {i} of {len(parts)})."
        tasks.append(_task(spec, f"part_{i}", specialist, instruction, input_data={"part_name": name, "part": content}))
    if spec.reducer:
        tasks.append(
            _task(
                spec,
                "reduce",
                spec.reducer,
                spec.reducer_instruction or "Combine the findings for every part above into one result.",
                depends_on=[t.task_id for t in tasks],
                kind="synthesis",
            )
        )
    return plan_for(spec, "merge_all", tasks)


def pipeline_plan(spec: PipelineSpec) -> OrchestrationPlan:
    tasks: list[Task] = []
    previous: list[str] = []
    for stage in spec.stages:
        ids = _unique(
            [
                f"{slug(stage.name)}_{slug(s)}" if len(stage.specialists) > 1 else slug(stage.name)
                for s in stage.specialists
            ]
        )
        for task_id, specialist in zip(ids, stage.specialists, strict=True):
            instruction = stage.instruction or f"Stage '{stage.name}': do your part using the previous stage's output."
            tasks.append(_task(spec, task_id, specialist, instruction, depends_on=list(previous)))
        previous = ids
    return plan_for(spec, "merge_all", tasks)


def consensus_round(spec: ConsensusSpec, round_no: int) -> list[Task]:
    """Round 1: independent answers. Round k: each expert sees every round k-1 answer and may revise."""
    tasks = []
    for expert in spec.experts:
        if round_no == 1:
            instruction = (spec.instruction or "Answer the question above.") + " " + ANSWER_INSTRUCTION
            deps: list[str] = []
        else:
            instruction = (
                "Other experts answered as shown above. Revise your answer if their arguments are better, "
                "or defend it. " + ANSWER_INSTRUCTION
            )
            deps = [f"{slug(e)}_r{round_no - 1}" for e in spec.experts]
        tasks.append(_task(spec, f"{slug(expert)}_r{round_no}", expert, instruction, depends_on=deps, round=round_no))
    return tasks


def consensus_judge(spec: ConsensusSpec, final_round: int, vote_summary: str) -> Task:
    assert spec.synthesizer
    return _task(
        spec,
        "consensus_synthesis",
        spec.synthesizer,
        f"Build the consensus from the expert answers above. The vote was: {vote_summary}. "
        "State the agreed approach, what it takes from the other proposals, and your confidence.",
        depends_on=[f"{slug(e)}_r{final_round}" for e in spec.experts],
        kind="synthesis",
        round=final_round,
    )


def consensus_plan(spec: ConsensusSpec) -> OrchestrationPlan:
    """The static shape of a consensus run with all its rounds (the coordinator stops early on agreement)."""
    tasks = [t for r in range(1, spec.rounds + 1) for t in consensus_round(spec, r)]
    if spec.synthesizer:
        tasks.append(consensus_judge(spec, spec.rounds, "(decided at run time)"))
    return plan_for(spec, "consensus", tasks)


def build_plan(spec: PatternSpec) -> OrchestrationPlan:
    """A pattern spec -> the plan it stands for (consensus: all rounds, for display and validation)."""
    if isinstance(spec, ParallelAnalysisSpec):
        return parallel_analysis_plan(spec)
    if isinstance(spec, DivideAndConquerSpec):
        return divide_and_conquer_plan(spec)
    if isinstance(spec, PipelineSpec):
        return pipeline_plan(spec)
    if isinstance(spec, ConsensusSpec):
        return consensus_plan(spec)
    raise PlanError(f"pattern {spec.pattern!r} is planned at run time by the planner", field="pattern")


# ---- LLM-made plans --------------------------------------------------------------------------


class DraftTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: str = Field(min_length=1, max_length=64)
    specialist: str
    instruction: str
    depends_on: list[str] = Field(default_factory=list)


class PlanDraft(BaseModel):
    """What the planner may say. No server, url or model fields exist: it cannot route work."""

    model_config = ConfigDict(extra="forbid")
    pattern: Literal["parallel_analysis", "divide_and_conquer", "pipeline", "consensus"]
    tasks: list[DraftTask] = Field(min_length=1, max_length=MAX_LLM_TASKS)
    synthesis_strategy: Literal["merge_all", "use_first_result", "consensus"] = "merge_all"
    success_criteria: Literal["all_tasks_complete", "majority", "any"] = "all_tasks_complete"


def plan_schema(roster: Sequence[str]) -> dict[str, Any]:
    """JSON schema for Ollama's `format`: specialist names constrained to the roster."""
    schema = PlanDraft.model_json_schema()
    schema["$defs"]["DraftTask"]["properties"]["specialist"] = {"type": "string", "enum": list(roster)}
    return schema


_FORBIDDEN_KEYS = {"server", "servers", "url", "urls", "host", "base_url", "api_base", "endpoint"}


def _find_forbidden(value: Any, path: str = "") -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).lower() in _FORBIDDEN_KEYS:
                return where
            found = _find_forbidden(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_forbidden(item, f"{path}[{i}]")
            if found:
                return found
    return None


def parse_llm_plan(
    text: str, roster: Sequence[str], problem: str, context: dict[str, Any] | None = None, source: str = "llm"
) -> OrchestrationPlan:
    """Validate a planner's JSON; every rejection says exactly what was wrong (it is fed back for repair)."""
    match = re.search(r"\{.*\}", text, re.S)
    if not match:
        raise PlanError("the planner's answer contains no JSON object", field="plan")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise PlanError(f"the planner's JSON is invalid: {exc.msg} at char {exc.pos}", field="plan") from exc
    forbidden = _find_forbidden(data)
    if forbidden:
        raise PlanError(
            f"the plan names a server or URL at '{forbidden}'; plans may name only specialists — servers are assigned by the balancer",
            field=forbidden,
        )
    try:
        draft = PlanDraft.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"{first['msg']}", field=loc or "plan") from exc
    for i, task in enumerate(draft.tasks):
        if task.specialist not in roster:
            raise PlanError(
                f"unknown specialist {task.specialist!r}; the roster is: {', '.join(roster)}",
                field=f"tasks[{i}].specialist",
            )
    tasks = [
        Task(
            task_id=slug(t.task_id),
            specialist=t.specialist,
            input_data={"instruction": t.instruction},
            depends_on=[slug(d) for d in t.depends_on],
        )
        for t in draft.tasks
    ]
    return OrchestrationPlan(
        problem=problem,
        tasks=tasks,
        context=context or {},
        pattern=draft.pattern,
        synthesis_strategy=draft.synthesis_strategy,
        success_criteria=draft.success_criteria,
        plan_source=source,
    )


def heuristic_spec(problem: str, context: dict[str, Any], roster: Sequence[tuple[str, Sequence[str]]]) -> PatternSpec:
    """The deterministic fallback when the planner cannot produce a valid plan.

    Many parts in the context -> divide and conquer; a decision question ->
    consensus; otherwise parallel analysis. A specialist whose name or
    capabilities say synthesis/architect/judge becomes the synthesizer.
    """

    def is_synth(name: str, caps: Sequence[str]) -> bool:
        text = " ".join([name, *caps]).lower()
        return any(h in text for h in SYNTH_HINTS)

    synth = next((n for n, c in roster if is_synth(n, c)), None)
    workers = [n for n, c in roster if n != synth] or [n for n, _ in roster]
    parts = next((v for k, v in context.items() if k in ("files", "items", "parts") and isinstance(v, list)), None)
    if parts and len(parts) > 1:
        return DivideAndConquerSpec(
            problem=problem,
            context={k: v for k, v in context.items() if v is not parts},
            items=parts,
            specialists=workers,
            reducer=synth,
        )
    if DECISION_WORDS.search(problem) and len(workers) >= 2:
        return ConsensusSpec(problem=problem, context=context, experts=workers[:5], synthesizer=synth)
    return ParallelAnalysisSpec(problem=problem, context=context, specialists=workers, synthesizer=synth)


# ---- scheduling --------------------------------------------------------------------------------


def dependents(plan: OrchestrationPlan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t.task_id: [] for t in plan.tasks}
    for task in plan.tasks:
        for dep in task.depends_on:
            out[dep].append(task.task_id)
    return out


def critical_path_priority(plan: OrchestrationPlan) -> dict[str, int]:
    """Tasks on longer downstream chains get higher priority at the balancer.

    Priority = number of tasks on the longest path from this task to the end
    of the plan. When the fleet is saturated, starting the task that gates the
    most later work first shortens the makespan (classic list scheduling).
    """
    down = dependents(plan)
    memo: dict[str, int] = {}

    def depth(task_id: str) -> int:
        if task_id not in memo:
            memo[task_id] = 1 + max((depth(d) for d in down[task_id]), default=0)
        return memo[task_id]

    return {t.task_id: depth(t.task_id) for t in plan.tasks}


def check_limits(plan: OrchestrationPlan, max_tasks: int = MAX_TASKS) -> None:
    """Refuse runaway plans (an LLM planner can emit thousands of tasks)."""
    if len(plan.tasks) > max_tasks:
        raise PlanError(f"plan has {len(plan.tasks)} tasks; the limit is {max_tasks}", field="tasks")
