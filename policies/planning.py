"""Plan shape: dependency order, critical path, limits.

Waves themselves are derived in `teamorch.messages.derive_waves` (a plan is
validated where it is parsed); this module holds the scheduling judgements
made over a valid plan.
"""

from __future__ import annotations

from teamorch.errors import PlanError
from teamorch.messages import OrchestrationPlan

MAX_TASKS = 500


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
