from __future__ import annotations

import pytest

from teamorch.errors import PlanError
from teamorch.messages import OrchestrationPlan


def plan(tasks: list[dict], **kw) -> OrchestrationPlan:
    return OrchestrationPlan.model_validate({"problem": "p", "tasks": tasks, **kw})


def t(task_id: str, *deps: str, **kw) -> dict:
    return {"task_id": task_id, "specialist": "S", "depends_on": list(deps), **kw}


def test_waves_are_topological_levels() -> None:
    p = plan([t("a"), t("b"), t("c", "a"), t("d", "c", "b"), t("e", "a")])
    assert [[x.task_id for x in w.tasks] for w in p.waves] == [["a", "b"], ["c", "e"], ["d"]]
    assert [w.wave_number for w in p.waves] == [1, 2, 3]


def test_explicit_waves_are_barriers_unless_edges_given() -> None:
    p = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "waves": [
                {"wave_number": 1, "tasks": [t("a"), t("b")]},
                {"wave_number": 2, "tasks": [t("c"), t("d", "a")]},
            ],
        }
    )
    assert p.task("c").depends_on == ["a", "b"]
    assert p.task("d").depends_on == ["a"]
    assert len(p.waves) == 2


@pytest.mark.parametrize(
    ("tasks", "message", "field"),
    [
        ([t("a"), t("a")], "duplicate task_id 'a'", "tasks[1].task_id"),
        ([t("a", "zzz")], "unknown task 'zzz'", "tasks[0].depends_on"),
        ([t("a", "a")], "depends on itself", "tasks[0].depends_on"),
        ([t("a", "c"), t("b", "a"), t("c", "b")], "dependency cycle: a -> c -> b -> a", "depends_on"),
    ],
)
def test_bad_plans_are_named(tasks: list[dict], message: str, field: str) -> None:
    with pytest.raises(PlanError) as err:
        plan(tasks)
    assert message in str(err.value)
    assert err.value.field == field


def test_non_positive_timeout_rejected() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        plan([t("a", timeout=0)])


def test_empty_and_ambiguous_plans_rejected() -> None:
    with pytest.raises(PlanError, match="no tasks"):
        plan([])
    with pytest.raises(PlanError, match="either 'waves' or 'tasks'"):
        OrchestrationPlan.model_validate(
            {"problem": "p", "tasks": [t("a")], "waves": [{"wave_number": 1, "tasks": [t("b")]}]}
        )


@pytest.mark.parametrize("criteria", ["all_tasks_complete", "majority", "any", "at_least: 2", "at_least:3"])
def test_success_criteria_accepted(criteria: str) -> None:
    assert plan([t("a")], success_criteria=criteria).success_criteria == criteria.strip()


def test_unknown_success_criteria_rejected() -> None:
    with pytest.raises(ValueError, match="unknown success_criteria"):
        plan([t("a")], success_criteria="most")


def test_a_validated_plan_validates_again_as_itself() -> None:
    # Pydantic re-runs the plan's validators on an instance inside another model, and a dumped plan carries
    # both waves and tasks: neither may be mistaken for a plan that gave both.
    from pydantic import BaseModel

    class Holder(BaseModel):
        plan: OrchestrationPlan

    p = plan([t("a"), t("b", "a")], context={"k": "v"})
    assert Holder(plan=p).plan == p
    assert OrchestrationPlan.model_validate(p.model_dump()) == p
    assert OrchestrationPlan.model_validate_json(p.model_dump_json()) == p
    tampered = p.model_dump()
    tampered["waves"] = [tampered["waves"][1], tampered["waves"][0]]
    with pytest.raises(PlanError, match="either 'waves' or 'tasks'"):
        OrchestrationPlan.model_validate(tampered)
