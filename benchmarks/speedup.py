"""Speedup on the seed's three scenarios, with service times scaled down 20x.

The seed's write-up timed its scenarios on two Ollama boxes: complex error
analysis (analysts of 45/38/52/41 s, then an 18 s architect), multi-file
analysis (6 files of ~40 s each, then a 30 s integration; we use 40 s each)
and consensus (experts of 60/55/65 s, then a 30 s judge). Here the two boxes
`ollama01` and `ollama02` are simulators with 1 slot each (Ollama's default
OLLAMA_NUM_PARALLEL=1), 100 tokens/s and 0.05 s to first token, and each task's
`num_predict` is chosen so its service time is exactly the seed's time / 20.

For each scenario the same tasks run twice through teamorch on one coordinator:
sequentially (a dependency chain, one task at a time) and as the real plan.
Efficiency compares the parallel wall time with the best possible makespan,
computed exactly (every split of the first wave over the two servers, then the
final task).

Run: `.venv/bin/python -m benchmarks.speedup` (part of `make bench`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import SIM_NOTE, Fleet, ensure_ray, sim_team, table
from teamorch import api
from teamorch.messages import OrchestrationPlan
from teamorch.sim import SimConfig

SCALE = 20.0
TPS = 100.0
TTFT = 0.05
SLOTS = 1
SERVERS = ("ollama01", "ollama02")


@dataclass
class Scenario:
    name: str
    first: dict[str, tuple[str, float]]  # task_id -> (specialist, seed seconds)
    final: tuple[str, str, float]  # (task_id, specialist, seed seconds)


SCENARIOS = [
    Scenario(
        "complex error analysis",
        {
            "syntax_analysis": ("Syntax Analyst", 45),
            "whitespace_analysis": ("Whitespace Analyst", 38),
            "logic_analysis": ("Logic Analyst", 52),
            "root_cause_analysis": ("Root Cause Analyst", 41),
        },
        ("fix_plan", "Architect", 18),
    ),
    Scenario(
        "multi-file analysis",
        {f"file_{i}": ("File Analyst", 40) for i in range(1, 7)},
        ("integration", "Integrator", 30),
    ),
    Scenario(
        "consensus",
        {"expert_a": ("Expert A", 60), "expert_b": ("Expert B", 55), "expert_c": ("Expert C", 65)},
        ("verdict", "Judge", 30),
    ),
]


def num_predict(seed_seconds: float) -> int:
    """Tokens that make a request take seed_seconds / SCALE on a simulator (ttft + tokens / tps)."""
    return max(1, round((seed_seconds / SCALE - TTFT) * TPS))


def service(seed_seconds: float) -> float:
    return TTFT + num_predict(seed_seconds) / TPS


def best_makespan(sc: Scenario, servers: int = len(SERVERS) * SLOTS) -> float:
    """Exact optimum: the final task needs every first-wave result, so it is the best split + the final task."""
    times = [service(s) for _, s in sc.first.values()]
    best = float("inf")
    for assignment in itertools.product(range(servers), repeat=len(times)):
        loads = [0.0] * servers
        for t, k in zip(times, assignment, strict=True):
            loads[k] += t
        best = min(best, max(loads))
    return best + service(sc.final[2])


def plan(sc: Scenario, sequential: bool) -> OrchestrationPlan:
    """The scenario's plan; `sequential` chains every task after the previous one (one at a time)."""
    tasks: list[dict[str, Any]] = []
    previous: str | None = None
    for task_id, (specialist, seconds) in sc.first.items():
        deps = [previous] if sequential and previous else []
        tasks.append(
            {
                "task_id": task_id,
                "specialist": specialist,
                "depends_on": deps,
                "options": {"num_predict": num_predict(seconds)},
            }
        )
        previous = task_id
    final_id, final_spec, final_seconds = sc.final
    tasks.append(
        {
            "task_id": final_id,
            "specialist": final_spec,
            "depends_on": [previous] if sequential else list(sc.first),
            "options": {"num_predict": num_predict(final_seconds)},
        }
    )
    return OrchestrationPlan.model_validate({"problem": sc.name, "tasks": tasks})


def main() -> dict[str, Any]:
    ensure_ray()
    names = sorted({spec for sc in SCENARIOS for spec, _ in sc.first.values()} | {sc.final[1] for sc in SCENARIOS})
    configs = [SimConfig(name=n, slots=SLOTS, tokens_per_second=TPS, ttft=TTFT, seed=i) for i, n in enumerate(SERVERS)]
    rows = []
    with Fleet(configs) as fleet:
        coordinator = api.start_coordinator(sim_team(fleet, [{"name": n} for n in names]))
        try:
            for sc in SCENARIOS:
                walls = {}
                for mode in ("sequential", "parallel"):
                    fleet.reset()
                    began = time.monotonic()
                    report = api.execute(coordinator, plan(sc, sequential=mode == "sequential"))
                    walls[mode] = time.monotonic() - began
                    if not report.success:
                        print(f"  {sc.name} {mode}: run failed: {[t.error for t in report.tasks if t.error]}")
                best = best_makespan(sc)
                total = sum(service(s) for _, s in sc.first.values()) + service(sc.final[2])
                rows.append(
                    [
                        sc.name,
                        len(sc.first) + 1,
                        total,
                        walls["sequential"],
                        walls["parallel"],
                        walls["sequential"] / walls["parallel"],
                        best,
                        best / walls["parallel"],
                        walls["parallel"] * SCALE,
                    ]
                )
                print(f"  measured {sc.name}: {walls['sequential']:.2f} s -> {walls['parallel']:.2f} s", flush=True)
        finally:
            api.stop_coordinator(coordinator)
    text = "\n".join(
        [
            "",
            "## Speedup on the seed's scenarios (service times / 20)",
            SIM_NOTE,
            f"Servers {', '.join(SERVERS)}: {SLOTS} slot each, {TPS:g} tokens/s, ttft {TTFT:g} s; policy peak_ewma.",
            "",
            table(
                [
                    "scenario",
                    "tasks",
                    "sum of service s",
                    "sequential s",
                    "parallel s",
                    "speedup",
                    "best possible s",
                    "efficiency",
                    "parallel x20 s",
                ],
                rows,
            ),
            "sequential and parallel are measured wall times through teamorch; efficiency = best possible / parallel; "
            "'parallel x20' scales the measured wall time back to the seed's seconds.",
        ]
    )
    print(text, flush=True)
    return {"text": text, "rows": rows}


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.speedup", __doc__)
    main()
