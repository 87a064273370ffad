"""Running a plan's DAG: which tasks start now, which can never run, what a cancellation stops.

The coordinator's executor holds the asyncio tasks; every judgement it makes
about the plan is here, over plain data (the plan, the journal of finished
results, the ids in flight), so the rules can be read and tested without Ray.

Rules: a task starts the moment all of its dependencies have succeeded (waves
are the plan's shape, not a barrier), at most `limit` at once. A task whose
dependency failed, was skipped or was cancelled is `skipped`, never run on
half the evidence.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from teamorch.messages import OrchestrationPlan, Task, TaskResult, TaskStatus

Journal = dict[str, TaskResult]
"""Results of one run by task id: finished, skipped or cancelled. Tasks in flight are not in it."""


@dataclass(frozen=True)
class NextStep:
    """What the executor does before it waits again."""

    start: list[Task] = field(default_factory=list)  # dispatch these now, in this order
    settled: list[TaskResult] = field(default_factory=list)  # record these: tasks that will never run


def unrun(task: Task, waves: Mapping[str, int], status: TaskStatus, error: str) -> TaskResult:
    """The result of a task that did not run to an answer (skipped, cancelled, or its specialist is missing)."""
    return TaskResult(
        task_id=task.task_id,
        specialist=task.specialist,
        server=task.server,
        wave=waves.get(task.task_id, 0),
        status=status,
        error=error,
        kind=task.kind,
        round=task.round,
    )


def next_step(
    plan: OrchestrationPlan, journal: Mapping[str, TaskResult], running: Collection[str], limit: int
) -> NextStep:
    """The tasks to start and to skip, given what finished (`journal`) and what is in flight (`running`).

    Skips cascade in one pass because tasks are visited wave by wave, so every
    dependency is judged before its dependents. When nothing is in flight and
    nothing can start, the tasks left can never run (a dependency outside the
    plan's reach); they are skipped so that the run always ends.
    """
    waves = plan.wave_of()
    settled: dict[str, TaskResult] = dict(journal)
    skipped: list[TaskResult] = []
    for wave in plan.waves:
        for task in wave.tasks:
            if task.task_id in settled or task.task_id in running:
                continue
            failed = _first_unsuccessful(task, settled)
            if failed is not None:
                result = unrun(task, waves, "skipped", f"dependency {failed.task_id!r} {failed.status}")
                settled[task.task_id] = result
                skipped.append(result)
    waiting = [t for t in plan.tasks if t.task_id not in settled and t.task_id not in running]
    ready = [t for t in waiting if all(d in settled for d in t.depends_on)]
    start = ready[: max(0, limit - len(running))]
    if not running and not start:
        skipped += [unrun(t, waves, "skipped", "dependencies never finished") for t in waiting]
    return NextStep(start=start, settled=skipped)


def _first_unsuccessful(task: Task, settled: Mapping[str, TaskResult]) -> TaskResult | None:
    for dep in task.depends_on:
        result = settled.get(dep)
        if result is not None and result.status != "succeeded":
            return result
    return None


def dispatch_chunks(tasks: Sequence[Task], size: int, first: int | None = None) -> list[list[Task]]:
    """A step's tasks in the order given, `size` at a time: each chunk is journaled and sent before the next is
    prepared, so the specialists start on the first while the coordinator is still preparing the rest.

    `first` (smaller than `size`) sizes the first chunk alone: a run's first results then come back while
    its specialists still work through the rest, instead of after a whole `size` chunk went through each hop.
    """
    head = min(first or size, size)
    chunks = [list(tasks[:head])] if tasks else []
    return chunks + [list(tasks[i : i + size]) for i in range(head, len(tasks), size)]


def upstream_for(task: Task, journal: Mapping[str, TaskResult]) -> dict[str, dict[str, Any]]:
    """What a task is told about its dependencies: who found what."""
    return {d: {"specialist": journal[d].specialist, "output": journal[d].output} for d in task.depends_on}


def diversity_group(plan: OrchestrationPlan, task: Task, run_id: str) -> str | None:
    """Consensus experts of one round ask for distinct servers: diversity is the point of voting."""
    if plan.pattern == "consensus" and task.kind == "work":
        return f"{run_id}-r{task.round}"
    return None


# ---- cancellation ------------------------------------------------------------------------------


class Cancel(Enum):
    """Why tasks of a run are being stopped, which decides which ones stop."""

    RUN = "run"  # the caller cancelled the run: everything stops
    HEDGE = "hedge"  # a hedged run has its winner: the other work tasks stop, synthesis tasks still run

    def stops(self, task: Task) -> bool:
        return self is Cancel.RUN or task.kind == "work"


def hedge_won(plan: OrchestrationPlan, result: TaskResult) -> bool:
    """With `use_first_result` the first successful work task wins and the others are cancelled."""
    return plan.synthesis_strategy == "use_first_result" and result.kind == "work" and result.status == "succeeded"


def cancel_waiting(
    plan: OrchestrationPlan, journal: Mapping[str, TaskResult], running: Collection[str], scope: Cancel, reason: str
) -> list[TaskResult]:
    """The tasks not yet started that `scope` stops, as `cancelled` results (in-flight ones are the executor's)."""
    waves = plan.wave_of()
    return [
        unrun(t, waves, "cancelled", reason)
        for t in plan.tasks
        if t.task_id not in journal and t.task_id not in running and scope.stops(t)
    ]
