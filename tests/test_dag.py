"""The executor's decisions (`policies.dag`) over hand-built plans and journals: no Ray."""

from __future__ import annotations

from typing import Any

import pytest

from teamorch.messages import OrchestrationPlan, TaskResult, TaskStatus
from teamorch.policies.dag import (
    Cancel,
    cancel_waiting,
    dispatch_chunks,
    diversity_group,
    hedge_won,
    next_step,
    upstream_for,
)


def plan(*tasks: dict[str, Any], **extra: Any) -> OrchestrationPlan:
    return OrchestrationPlan.model_validate({"problem": "p", "tasks": list(tasks), **extra})


def t(task_id: str, *deps: str, **kw: Any) -> dict[str, Any]:
    return {"task_id": task_id, "specialist": "S", "depends_on": list(deps), **kw}


def done(task_id: str, status: TaskStatus = "succeeded", **kw: Any) -> TaskResult:
    return TaskResult(task_id=task_id, specialist="S", status=status, output=f"out-{task_id}", **kw)


def ids(items: list[Any]) -> list[str]:
    return [x.task_id for x in items]


def test_ready_tasks_start_in_plan_order_up_to_the_free_slots() -> None:
    p = plan(t("a"), t("b"), t("c"), t("d", "a"))
    assert ids(next_step(p, {}, set(), limit=2).start) == ["a", "b"]
    # one in flight, limit 2: one more may start; d still waits for a
    step = next_step(p, {}, {"a"}, limit=2)
    assert ids(step.start) == ["b"] and step.settled == []


def test_a_task_starts_when_its_own_dependencies_succeeded_not_its_whole_wave() -> None:
    p = plan(t("a"), t("slow"), t("after_a", "a"))
    assert ids(next_step(p, {"a": done("a")}, {"slow"}, limit=10).start) == ["after_a"]


def test_a_failed_dependency_skips_its_dependents_transitively() -> None:
    # Dependents listed before their dependencies: the skip still cascades in one step.
    p = plan(t("last", "middle"), t("middle", "first"), t("first"), t("other"))
    step = next_step(p, {"first": done("first", "failed")}, set(), limit=10)
    assert ids(step.start) == ["other"]
    skipped = {r.task_id: r for r in step.settled}
    assert set(skipped) == {"middle", "last"}
    assert all(r.status == "skipped" for r in skipped.values())
    assert skipped["middle"].error == "dependency 'first' failed"
    assert skipped["last"].error == "dependency 'middle' skipped"
    assert skipped["last"].wave == 3


@pytest.mark.parametrize("status", ["cancelled", "skipped"])
def test_any_unsuccessful_dependency_skips(status: TaskStatus) -> None:
    step = next_step(plan(t("a"), t("b", "a")), {"a": done("a", status)}, set(), limit=1)
    assert [(r.task_id, r.error) for r in step.settled] == [("b", f"dependency 'a' {status}")]


def test_tasks_that_can_never_start_are_skipped_so_the_run_ends() -> None:
    # Nothing in flight and nothing may start (no free slot): every task left is accounted for.
    step = next_step(plan(t("a"), t("b", "a")), {}, set(), limit=0)
    assert step.start == []
    assert [(r.task_id, r.status, r.error) for r in step.settled] == [
        ("a", "skipped", "dependencies never finished"),
        ("b", "skipped", "dependencies never finished"),
    ]


def test_finished_run_has_nothing_to_do() -> None:
    p = plan(t("a"), t("b", "a"))
    step = next_step(p, {"a": done("a"), "b": done("b")}, set(), limit=4)
    assert step.start == [] and step.settled == []


def test_upstream_names_who_found_what() -> None:
    p = plan(t("a"), t("b"), t("c", "a", "b"))
    journal = {"a": done("a"), "b": done("b")}
    assert upstream_for(p.task("c"), journal) == {
        "a": {"specialist": "S", "output": "out-a"},
        "b": {"specialist": "S", "output": "out-b"},
    }


def test_only_consensus_experts_ask_for_distinct_servers() -> None:
    experts = plan(t("x_r2", round=2), t("judge", "x_r2", kind="synthesis", round=2), pattern="consensus")
    assert diversity_group(experts, experts.task("x_r2"), "run1") == "run1-r2"
    assert diversity_group(experts, experts.task("judge"), "run1") is None
    fan = plan(t("x"), pattern="parallel_analysis")
    assert diversity_group(fan, fan.task("x"), "run1") is None


@pytest.mark.parametrize(
    ("strategy", "kind", "status", "won"),
    [
        ("use_first_result", "work", "succeeded", True),
        ("use_first_result", "work", "failed", False),
        ("use_first_result", "synthesis", "succeeded", False),
        ("merge_all", "work", "succeeded", False),
    ],
)
def test_hedge_won(strategy: str, kind: str, status: TaskStatus, won: bool) -> None:
    p = plan(t("a"), synthesis_strategy=strategy)
    assert hedge_won(p, done("a", status, kind=kind)) is won


def test_a_hedge_cancels_waiting_work_but_lets_synthesis_run() -> None:
    p = plan(t("try1"), t("try2"), t("try3"), t("merge", "try1", "try2", "try3", kind="synthesis"))
    journal = {"try1": done("try1")}
    hedged = cancel_waiting(p, journal, {"try2"}, Cancel.HEDGE, "hedged: 'try1' finished first")
    assert [(r.task_id, r.status, r.error) for r in hedged] == [("try3", "cancelled", "hedged: 'try1' finished first")]
    everything = cancel_waiting(p, journal, {"try2"}, Cancel.RUN, "run cancelled")
    assert ids(everything) == ["try3", "merge"]
    assert all(r.status == "cancelled" and r.error == "run cancelled" for r in everything)


def test_a_large_step_is_sent_in_chunks_in_plan_order_and_every_task_once() -> None:
    """The executor journals and sends a step chunk by chunk, so its first tasks are at work while the rest are
    prepared; none may be dropped, repeated or reordered."""
    tasks = plan(*(t(f"t{i}") for i in range(300))).tasks
    chunks = dispatch_chunks(tasks, 128)
    assert [len(c) for c in chunks] == [128, 128, 44]
    assert ids([task for chunk in chunks for task in chunk]) == [f"t{i}" for i in range(300)]
    assert dispatch_chunks(tasks[:5], 128) == [tasks[:5]] and dispatch_chunks([], 128) == []


def test_a_steps_first_chunk_can_be_smaller_so_work_starts_sooner() -> None:
    """The first chunk alone takes `first` tasks (never more than `size`); the rest go `size` at a time, in
    plan order, every task once."""
    tasks = plan(*(t(f"t{i}") for i in range(300))).tasks
    chunks = dispatch_chunks(tasks, 128, first=16)
    assert [len(c) for c in chunks] == [16, 128, 128, 28]
    assert ids([task for chunk in chunks for task in chunk]) == [f"t{i}" for i in range(300)]
    assert [len(c) for c in dispatch_chunks(tasks, 128, first=500)] == [128, 128, 44]
    assert dispatch_chunks(tasks[:5], 128, first=16) == [tasks[:5]] and dispatch_chunks([], 128, first=16) == []
