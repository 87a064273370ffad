"""The conversation with the planner specialist: ask for a plan, allow one repair, else the heuristic.

The coordinator only carries the messages (`PlannerDialogue.opening()`, then
`hear(result)` until it returns a plan); every judgement — is the answer a
valid plan, is a repair worth asking for, which fallback — is made here.
The planner's JSON is constrained by the plan schema (Ollama `format`,
specialist names as an enum) and validated again here: an LLM must never
route work to servers or specialists that do not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from teamorch.config import SpecialistConfig, TeamConfig
from teamorch.errors import PlanError
from teamorch.messages import AutoSpec, OrchestrationPlan, Task, TaskResult
from teamorch.policies.planner_prompt import META_PROMPT, roster_text
from teamorch.policies.planning import build_plan, heuristic_spec, parse_llm_plan, plan_schema

BUILTIN_PLANNER = "Planner"
PLANNER_OPTIONS = {"num_predict": 512, "temperature": 0.2}
FIRST, REPAIR = "plan", "plan_repair"  # task ids of the two planner calls


def specialist_roles(team: TeamConfig) -> list[SpecialistConfig]:
    """Every specialist actor a team needs: its own, with the planner taught the meta-prompt.

    The team's `planner:` gets the meta-prompt after its own role; a team
    without one gets a built-in `Planner` on the team's default model.
    """
    if team.planner is not None:
        return [
            s.model_copy(update={"system_prompt": (s.system_prompt + "\n\n" + META_PROMPT).strip()})
            if s.name == team.planner
            else s
            for s in team.specialists
        ]
    if not team.specialists:
        return []
    model = team.default_model or team.specialists[0].model
    planner = SpecialistConfig(
        name=BUILTIN_PLANNER, model=model, system_prompt=META_PROMPT, options=dict(PLANNER_OPTIONS)
    )
    return [*team.specialists, planner]


@dataclass(frozen=True)
class PlannerRequest:
    """One call to the planner specialist: the task and what it is shown of earlier answers."""

    task: Task
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)


class PlannerDialogue:
    """One planning conversation for `spec.problem` with the specialists in `roster` to choose from."""

    def __init__(self, spec: AutoSpec, roster: Sequence[SpecialistConfig], planner: str) -> None:
        roster = [s for s in roster if s.name != BUILTIN_PLANNER]
        if not roster:
            raise PlanError("the team has no specialists for the planner to choose from", field="specialists")
        self.spec = spec
        self.planner = planner
        self.names = [s.name for s in roster]
        self.capabilities = [(s.name, s.capabilities) for s in roster]
        self.schema = plan_schema(self.names)  # Ollama `format` for every call
        self._ask = roster_text([(s.name, s.capabilities, s.system_prompt) for s in roster])
        self.notes: list[str] = []  # why the plan is what it is; ends up in `plan_notes`

    def opening(self) -> PlannerRequest:
        instruction = self._ask + "\n\nWrite the plan as JSON."
        return PlannerRequest(
            Task(task_id=FIRST, specialist=self.planner, input_data={"instruction": instruction}, max_retries=1)
        )

    def hear(self, result: TaskResult) -> PlannerRequest | OrchestrationPlan:
        """Judge one answer: the plan (accepted or the heuristic's), or the repair request to send next."""
        repaired = result.task_id == REPAIR
        if result.status != "succeeded":
            self.notes.append(f"planner {'repair ' if repaired else ''}call failed: {result.error}")
            return self._fallback()
        source = "llm-repaired" if repaired else "llm"
        try:
            plan = parse_llm_plan(result.output or "", self.names, self.spec.problem, self.spec.context, source=source)
        except PlanError as exc:
            self.notes.append(f"{'repaired' if repaired else 'planner'} output rejected: {exc}")
            return self._fallback() if repaired else self._repair(result, exc)
        accepted = "repaired plan accepted" if repaired else "plan written by the planner"
        return plan.model_copy(update={"plan_notes": [*self.notes, accepted]})

    def _repair(self, rejected: TaskResult, reason: PlanError) -> PlannerRequest:
        instruction = (
            f"{self._ask}\n\nYour previous plan (above) was rejected: {reason}. Write a corrected plan as JSON."
        )
        task = Task(task_id=REPAIR, specialist=self.planner, input_data={"instruction": instruction}, max_retries=1)
        return PlannerRequest(task, upstream={FIRST: {"specialist": self.planner, "output": rejected.output}})

    def _fallback(self) -> OrchestrationPlan:
        fallback = heuristic_spec(self.spec.problem, self.spec.context, self.capabilities)
        plan = build_plan(fallback)  # a heuristic consensus has the default single round
        self.notes.append(f"heuristic fallback chose {fallback.pattern}")
        return plan.model_copy(update={"plan_source": "heuristic", "plan_notes": list(self.notes)})
