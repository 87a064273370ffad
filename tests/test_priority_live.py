"""Two runs on one team, through real actors and an Ollama-API simulator (teamorch.sim: real HTTP on loopback).

The times come from the simulator's own request log (when each request reached the box), not from the code
under test.
"""

from __future__ import annotations

import time

import ray

from teamorch import api
from teamorch.messages import OrchestrationPlan
from tests.helpers import sim_team

TOKENS = 40
TPS = 80.0  # one task: 40 tokens at 80 tokens/s, about 0.5 s on the box


def _fan(problem: str, n: int) -> OrchestrationPlan:
    tasks = [{"task_id": f"t{i}", "specialist": "A", "options": {"num_predict": TOKENS}} for i in range(n)]
    return OrchestrationPlan.model_validate({"problem": problem, "tasks": tasks})


def test_an_interactive_run_overtakes_a_queued_batch_run(sims, coordinator) -> None:
    box = sims(name="box", slots=2, tokens_per_second=TPS, ttft=0.01, default_tokens=TOKENS)
    handle = coordinator(sim_team([(box, 2)], [{"name": "A"}]))
    batch = handle.run_plan.remote(_fan("BATCHJOB", 16).model_copy(update={"priority_class": "batch"}))
    deadline = time.monotonic() + 30
    while box.stats()["requests"] < 4 and time.monotonic() < deadline:  # the batch run holds both slots
        time.sleep(0.02)
    time.sleep(TOKENS / TPS / 2)  # mid-task: the wait measured is for running requests, not for the hops after one
    interactive = api.execute(handle, _fan("QUESTION", 2))
    batch_report = ray.get(batch, timeout=60)
    assert interactive.success and batch_report.success  # the batch run is slowed, never starved
    log = box.stats()["requests_log"]
    is_batch = ["BATCHJOB" in entry["prompt"] for entry in log]
    first = next(i for i, b in enumerate(is_batch) if not b)
    task_seconds = max(t.duration for t in batch_report.tasks)  # one batch task, as its specialist timed it
    asked = min(t.started_at for t in interactive.tasks)  # its specialist had the task and asked for a slot
    assert log[first]["at"] - asked < task_seconds, (log[first]["at"] - asked, task_seconds)
    # Both interactive requests reached the box before any batch request still queued when they arrived.
    assert is_batch[first : first + 2] == [False, False], is_batch
    assert sum(is_batch[first + 2 :]) >= 8, is_batch  # most of the batch run was still queued
