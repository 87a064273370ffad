"""Two runs on one team: an interactive run submitted while a batch run fills the fleet.

For each fleet shape, four runs of the same plans on a fresh team:

* the interactive run alone, and the batch run alone (the baselines);
* the batch run first, then (once it holds every slot) the interactive run, with
  the batch run in the `batch` class: interactive requests go ahead of its queue;
* the same with both runs `interactive`: one class, so the queue is served in
  arrival order (what every run got before priority classes).

Time to first task is from the interactive run's submission to its first request
reaching a server, read from the simulators' own request logs; makespans are
each run's wall time from its submission; the batch slowdown is its makespan
next to the interactive run over its makespan alone.

Run: `.venv/bin/python -m benchmarks.priority` (part of `make bench`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray

from benchmarks.common import SIM_NOTE, Fleet, ensure_ray, sim_team, table
from teamorch import api
from teamorch.messages import OrchestrationPlan, PriorityClass
from teamorch.sim import SimConfig

TOKENS = 40  # per task: 0.5 s on a 80 tokens/s slot
BATCH_TASKS = 24
INTERACTIVE_TASKS = 4
SHAPES: dict[str, list[SimConfig]] = {
    "1 server x 2 slots": [SimConfig(name="one", slots=2, tokens_per_second=80, ttft=0.02)],
    "3 servers x 1 slot, 2 speeds": [
        SimConfig(name="fast", slots=1, tokens_per_second=160, ttft=0.02),
        SimConfig(name="slow-a", slots=1, tokens_per_second=80, ttft=0.02),
        SimConfig(name="slow-b", slots=1, tokens_per_second=80, ttft=0.02),
    ],
}
SPECIALISTS = [{"name": "A", "system_prompt": "You answer briefly."}]


def _fan(problem: str, n: int, priority_class: PriorityClass) -> OrchestrationPlan:
    tasks = [{"task_id": f"t{i}", "specialist": "A", "options": {"num_predict": TOKENS}} for i in range(n)]
    return OrchestrationPlan.model_validate({"problem": problem, "tasks": tasks, "priority_class": priority_class})


def _first_request(fleet: Fleet, marker: str) -> float:
    """Wall time the first request whose prompt holds `marker` reached any server (the servers' own logs)."""
    ats = [e["at"] for s in fleet.stats().values() for e in s["requests_log"] if marker in e["prompt"]]
    return min(ats)


def _requests(fleet: Fleet) -> int:
    return sum(s["requests"] for s in fleet.stats().values())


def _scenario(fleet: Fleet, batch: PriorityClass | None, interactive: bool) -> dict[str, float]:
    """One team: the batch run (in class `batch`; None: not run), then the interactive run once the fleet is full."""
    fleet.reset()
    coordinator = api.start_coordinator(sim_team(fleet, SPECIALISTS))
    slots = sum(c.slots for c in fleet.configs.values())
    out: dict[str, float] = {}
    try:
        api.execute(coordinator, _fan("warm-up", slots, "interactive"))  # every server measured: past the cold start
        fleet.reset()
        ref = None
        if batch is not None:
            began = time.monotonic()
            ref = coordinator.run_plan.remote(_fan("BATCHRUN", BATCH_TASKS, batch))
            while _requests(fleet) < slots:
                time.sleep(0.01)
            time.sleep(TOKENS / 80 / 2)  # mid-task: what the interactive run waits for is the queue
        if interactive:
            submitted, started = time.time(), time.monotonic()
            api.execute(coordinator, _fan("QUESTION", INTERACTIVE_TASKS, "interactive"))
            out["interactive makespan"] = time.monotonic() - started
            out["time to first task"] = _first_request(fleet, "QUESTION") - submitted
        if ref is not None:
            ray.get(ref)
            out["batch makespan"] = time.monotonic() - began
    finally:
        api.stop_coordinator(coordinator)
    return out


def main() -> dict[str, Any]:
    ensure_ray()
    rows: list[list[Any]] = []
    for shape, configs in SHAPES.items():
        with Fleet(configs) as fleet:
            alone = _scenario(fleet, None, True)
            batch_alone = _scenario(fleet, "batch", False)
            classes = _scenario(fleet, "batch", True)
            fifo = _scenario(fleet, "interactive", True)
        base = batch_alone["batch makespan"]
        for label, got in (
            ("interactive alone", alone),
            ("batch alone", batch_alone),
            ("with a batch run (classes)", classes),
            ("with a batch run, both interactive", fifo),
        ):
            batch_span = got.get("batch makespan")
            rows.append(
                [
                    shape,
                    label,
                    _cell(got.get("time to first task")),
                    _cell(got.get("interactive makespan")),
                    _cell(batch_span),
                    _cell(batch_span / base if batch_span is not None else None),
                ]
            )
        print(f"  measured {shape}", flush=True)
    text = render(rows)
    print(text, flush=True)
    return {"text": text, "rows": rows}


def _cell(value: float | None) -> float | str:
    return "-" if value is None else value


def render(rows: Sequence[Sequence[Any]]) -> str:
    headers = ["fleet", "runs", "first task s", "interactive s", "batch s", "batch slowdown"]
    return "\n".join(
        [
            "",
            "## Priority classes: an interactive run next to a batch run",
            SIM_NOTE,
            f"Batch run: {BATCH_TASKS} tasks, interactive run: {INTERACTIVE_TASKS} tasks, {TOKENS} tokens each "
            "(0.5 s on an 80 tokens/s slot). The interactive run is submitted once the batch run holds every slot. "
            "first task s: from its submission to its first request at a server (the simulators' logs).",
            "",
            table(headers, rows),
        ]
    )


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.priority", __doc__)
    main()
