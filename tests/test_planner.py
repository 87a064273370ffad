"""LLM-made plans: validated, repaired once, else a deterministic heuristic.

The planner talks to the Ollama-API simulator (teamorch.sim, real HTTP on
loopback) whose canned `replies` play the LLM: a good plan, a broken one, one
that invents a server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import ray

from teamorch import api
from teamorch.config import SpecialistConfig, TeamConfig
from teamorch.errors import PlanError
from teamorch.messages import (
    AutoSpec,
    ConsensusSpec,
    DivideAndConquerSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    TaskResult,
)
from teamorch.policies.planner_dialogue import BUILTIN_PLANNER, PlannerDialogue, PlannerRequest, specialist_roles
from teamorch.policies.planner_prompt import META_PROMPT
from teamorch.policies.planning import heuristic_spec, parse_llm_plan, plan_schema
from tests.helpers import sim_team

ROSTER = ["Syntax Analyst", "Logic Analyst", "Architect"]
GOOD = {
    "pattern": "parallel_analysis",
    "tasks": [
        {"task_id": "syntax", "specialist": "Syntax Analyst", "instruction": "find syntax errors", "depends_on": []},
        {"task_id": "logic", "specialist": "Logic Analyst", "instruction": "find logic bugs", "depends_on": []},
        {"task_id": "merge", "specialist": "Architect", "instruction": "merge", "depends_on": ["syntax", "logic"]},
    ],
    "synthesis_strategy": "merge_all",
    "success_criteria": "all_tasks_complete",
}
EVIL = {
    "pattern": "parallel_analysis",
    "tasks": [{"task_id": "a", "specialist": "Syntax Analyst", "instruction": "x", "server": "http://10.1.2.3:11434"}],
}


def test_parse_valid_plan_derives_waves() -> None:
    plan = parse_llm_plan("Here you go: " + json.dumps(GOOD), ROSTER, "bug")
    assert plan.plan_source == "llm" and plan.pattern == "parallel_analysis"
    assert [[t.task_id for t in w.tasks] for w in plan.waves] == [["syntax", "logic"], ["merge"]]
    assert plan.task("syntax").input_data == {"instruction": "find syntax errors"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no json here", "contains no JSON object"),
        ("{broken", "contains no JSON object"),
        ('{"pattern": "parallel_analysis", "tasks": [}', "JSON is invalid"),
        (json.dumps(EVIL), "names a server or URL at 'tasks[0].server'"),
        (json.dumps({**GOOD, "tasks": [{**GOOD["tasks"][0], "specialist": "Hacker"}]}), "unknown specialist 'Hacker'"),
        (json.dumps({**GOOD, "tasks": [{**GOOD["tasks"][0], "depends_on": ["zzz"]}]}), "unknown task 'zzz'"),
        (json.dumps({**GOOD, "pattern": "anarchy"}), "Input should be"),
    ],
)
def test_parse_rejects_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(PlanError) as err:
        parse_llm_plan(text, ROSTER, "bug")
    assert message in str(err.value)


def test_schema_constrains_specialists_to_roster() -> None:
    schema = plan_schema(ROSTER)
    assert schema["$defs"]["DraftTask"]["properties"]["specialist"]["enum"] == ROSTER
    fields = set(schema["properties"]) | set(schema["$defs"]["DraftTask"]["properties"])
    assert not fields & {"server", "url", "model", "host"}
    assert schema["$defs"]["DraftTask"]["additionalProperties"] is False


def test_heuristic_picks_a_pattern() -> None:
    roster = [("Syntax Analyst", ["syntax"]), ("Logic Analyst", ["logic"]), ("Architect", ["synthesis"])]
    files = heuristic_spec("find cycles", {"files": ["a.py", "b.py"]}, roster)
    assert isinstance(files, DivideAndConquerSpec) and files.reducer == "Architect" and files.items == ["a.py", "b.py"]
    decide = heuristic_spec("Which approach should we choose?", {}, roster)
    assert isinstance(decide, ConsensusSpec) and decide.experts == ["Syntax Analyst", "Logic Analyst"]
    plain = heuristic_spec("it crashes", {}, roster)
    assert isinstance(plain, ParallelAnalysisSpec) and plain.synthesizer == "Architect"


# ---- the dialogue's decisions, without Ray ------------------------------------------------------

TEAM = TeamConfig.model_validate(
    {"default_model": "m", "specialists": [{"name": n, "capabilities": [n.split()[0].lower()]} for n in ROSTER]}
)


def answer(task_id: str, output: str | None = None, error: str | None = None) -> TaskResult:
    status = "failed" if error else "succeeded"
    return TaskResult(task_id=task_id, specialist=BUILTIN_PLANNER, status=status, output=output, error=error)


def dialogue(problem: str = "bug") -> PlannerDialogue:
    return PlannerDialogue(AutoSpec(problem=problem, context={"file": "main.py"}), TEAM.specialists, BUILTIN_PLANNER)


def test_dialogue_accepts_a_valid_first_answer() -> None:
    talk = dialogue()
    opening = talk.opening()
    assert opening.task.specialist == BUILTIN_PLANNER and "ROSTER" in opening.task.input_data["instruction"]
    assert talk.schema["$defs"]["DraftTask"]["properties"]["specialist"]["enum"] == ROSTER
    plan = talk.hear(answer(opening.task.task_id, json.dumps(GOOD)))
    assert isinstance(plan, OrchestrationPlan)
    assert plan.plan_source == "llm" and plan.plan_notes == ["plan written by the planner"]
    assert plan.context == {"file": "main.py"}


def test_dialogue_asks_for_one_repair_showing_the_rejected_answer_and_why() -> None:
    talk = dialogue()
    repair = talk.hear(answer(talk.opening().task.task_id, "no json"))
    assert isinstance(repair, PlannerRequest)
    assert "was rejected: plan: the planner's answer contains no JSON object" in repair.task.input_data["instruction"]
    assert list(repair.upstream.values()) == [{"specialist": BUILTIN_PLANNER, "output": "no json"}]
    plan = talk.hear(answer(repair.task.task_id, json.dumps(GOOD)))
    assert isinstance(plan, OrchestrationPlan) and plan.plan_source == "llm-repaired"
    assert plan.plan_notes[-1] == "repaired plan accepted"


def test_dialogue_falls_back_to_the_heuristic_after_a_rejected_repair() -> None:
    talk = dialogue("Which approach should we choose?")
    repair = talk.hear(answer(talk.opening().task.task_id, json.dumps(EVIL)))
    assert isinstance(repair, PlannerRequest)
    plan = talk.hear(answer(repair.task.task_id, "still no json"))
    assert isinstance(plan, OrchestrationPlan)
    assert plan.plan_source == "heuristic" and plan.pattern == "consensus"
    assert [n.split(":")[0] for n in plan.plan_notes] == [
        "planner output rejected",
        "repaired output rejected",
        "heuristic fallback chose consensus",
    ]


@pytest.mark.parametrize("repair_first", [False, True])
def test_dialogue_falls_back_when_a_planner_call_fails(repair_first: bool) -> None:
    talk = dialogue()
    task_id = talk.opening().task.task_id
    if repair_first:
        repair = talk.hear(answer(task_id, "no json"))
        assert isinstance(repair, PlannerRequest)
        task_id = repair.task.task_id
    plan = talk.hear(answer(task_id, error="server down"))
    assert isinstance(plan, OrchestrationPlan) and plan.plan_source == "heuristic"
    failed = "planner repair call failed" if repair_first else "planner call failed"
    assert f"{failed}: server down" in plan.plan_notes


def test_dialogue_needs_specialists_to_choose_from() -> None:
    with pytest.raises(PlanError, match="no specialists"):
        PlannerDialogue(AutoSpec(problem="p"), [SpecialistConfig(name=BUILTIN_PLANNER)], BUILTIN_PLANNER)


def test_planner_role_is_built_in_or_the_team_planner_taught_the_meta_prompt() -> None:
    builtin = specialist_roles(TEAM)
    assert [s.name for s in builtin] == [*ROSTER, BUILTIN_PLANNER]
    assert builtin[-1].system_prompt == META_PROMPT and builtin[-1].model == "m"
    architect = TEAM.specialists[2].model_copy(update={"system_prompt": "You design."})
    own = specialist_roles(
        TEAM.model_copy(update={"planner": "Architect", "specialists": [*TEAM.specialists[:2], architect]})
    )
    assert [s.name for s in own] == ROSTER
    assert own[2].system_prompt == "You design.\n\n" + META_PROMPT.strip() and own[0].system_prompt == ""
    assert specialist_roles(TeamConfig()) == []


# ---- through real actors ------------------------------------------------------------------------


def _planner_team(sims, replies: list[dict[str, str]], **kw: Any):
    server = sims(name="llm", slots=2, replies=replies, tokens_per_second=5000, **kw)
    return sim_team([(server, 2)], [{"name": n} for n in ROSTER])


def test_planner_valid_plan_is_used(sims, coordinator) -> None:
    team = _planner_team(sims, [{"match": "Write the plan as JSON", "reply": json.dumps(GOOD)}])
    plan: Any = ray.get(coordinator(team).create_plan.remote(AutoSpec(problem="bug")))
    assert plan.plan_source == "llm" and [t.task_id for t in plan.tasks] == ["syntax", "logic", "merge"]


def test_planner_invalid_plan_is_repaired(sims, coordinator) -> None:
    replies = [
        {"match": "was rejected", "reply": json.dumps(GOOD)},
        {"match": "Write the plan as JSON", "reply": '{"pattern": "parallel_analysis", "tasks": []}'},
    ]
    plan: Any = ray.get(coordinator(_planner_team(sims, replies)).create_plan.remote(AutoSpec(problem="bug")))
    assert plan.plan_source == "llm-repaired"
    assert "planner output rejected" in plan.plan_notes[0] and "tasks" in plan.plan_notes[0]


def test_planner_inventing_a_server_is_rejected_then_heuristic(sims, coordinator) -> None:
    replies = [{"match": "JSON", "reply": json.dumps(EVIL)}]
    plan: Any = ray.get(coordinator(_planner_team(sims, replies)).create_plan.remote(AutoSpec(problem="it crashes")))
    assert plan.plan_source == "heuristic" and plan.pattern == "parallel_analysis"
    assert any("names a server or URL" in n for n in plan.plan_notes)
    assert all(t.server is None for t in plan.tasks)


def test_planner_down_falls_back_to_heuristic(sims, coordinator) -> None:
    team = _planner_team(sims, [], error_rate=1.0)
    plan: Any = ray.get(coordinator(team).create_plan.remote(AutoSpec(problem="Which approach is best?")))
    assert plan.plan_source == "heuristic" and plan.pattern == "consensus"
    assert any("planner call failed" in n for n in plan.plan_notes)


def test_auto_pattern_runs_the_planned_tasks(sims, coordinator) -> None:
    team = _planner_team(sims, [{"match": "Write the plan as JSON", "reply": json.dumps(GOOD)}])
    report = api.execute(coordinator(team), AutoSpec(problem="bug"))
    assert report.success and report.plan_source == "llm"
    assert [t.task_id for t in report.tasks] == ["syntax", "logic", "merge"]
