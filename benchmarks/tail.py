"""Cutting the tail: hedging against servers that are intermittently slow, on two fleets.

Some boxes have slow spells (a noisy neighbour, a throttling GPU, another
user's long prompt): the simulator's slow-tail fault makes a request on such a
server run at a fraction of its speed with some probability (`slow_rate`,
`slow_factor`; `slowed` counts them server-side). A slow request still
answers, only late, so retries never fire; the run waits for it.

The workload is chains of dependent tasks (each step reads the previous one's
findings), so at any moment fewer tasks are ready than the fleet has slots:
the idle capacity a hedge is allowed to use (`policies.hedging.decide_hedge`
never takes a slot a queued task could have). A chain is as slow as its
slowest step, which is how one straggler becomes a whole run's tail.

Routers: teamorch `peak_ewma` (the default), the same with
`balancer.hedge: true`, and `round_robin`. Each router gets a fresh team that
first runs a warm-up plan with the fault off (so the balancer has measured
speeds and a latency tail, as a long-lived team has), then the measured plan
with the fault on; every simulator's random stream is re-seeded when the
measured plan starts, so each router meets the same draws on each server. Task latency is a task's own
start to end (its chain waits for it). Wasted tokens are the report's estimate
of what cancelled race losers cost.

Run: `.venv/bin/python -m benchmarks.tail` (part of `make bench`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.common import SIM_NOTE, Fleet, ensure_ray, percentile, sim_team, table
from teamorch import api
from teamorch.messages import OrchestrationPlan
from teamorch.sim import SimConfig

SEED = 5
SPECIALISTS = [{"name": "Analyst", "system_prompt": "You follow up on the previous step's findings."}]
ROUTERS = (("peak_ewma", False), ("peak_ewma", True), ("round_robin", False))


@dataclass(frozen=True)
class Shape:
    """One fleet and the chains run on it (fewer chains than slots: the idle capacity hedges use)."""

    name: str
    servers: tuple[SimConfig, ...]
    chains: int
    steps: int


def fleets() -> list[Shape]:
    """Two differently shaped fleets: equal 2-slot boxes with one flaky box, and a mixed fleet with a big box
    whose slow spells are rare but long and a small one that is often slow."""
    equal = Shape(
        "A: 4 equal 2-slot servers, one slow 8% of the time at 1/10 speed",
        (
            SimConfig(name="a1", slots=2, tokens_per_second=300, ttft=0.05, seed=1),
            SimConfig(name="a2", slots=2, tokens_per_second=300, ttft=0.05, seed=2, slow_rate=0.08, slow_factor=0.1),
            SimConfig(name="a3", slots=2, tokens_per_second=300, ttft=0.05, seed=3),
            SimConfig(name="a4", slots=2, tokens_per_second=300, ttft=0.05, seed=4),
        ),
        chains=6,
        steps=16,
    )
    mixed = Shape(
        "B: a big 4-slot server (slow 3% at 1/8 speed), two 1-slot mid servers (one slow 8% at 1/5), a CPU box",
        (
            SimConfig(name="big", slots=4, tokens_per_second=600, ttft=0.03, seed=5, slow_rate=0.03, slow_factor=0.125),
            SimConfig(name="mid1", slots=1, tokens_per_second=250, ttft=0.06, seed=6, slow_rate=0.08, slow_factor=0.2),
            SimConfig(name="mid2", slots=1, tokens_per_second=250, ttft=0.06, seed=7),
            SimConfig(name="cpu", slots=1, tokens_per_second=100, ttft=0.2, seed=8),
        ),
        chains=5,
        steps=16,
    )
    return [equal, mixed]


def chains_plan(chains: int, steps: int, seed: int = SEED) -> OrchestrationPlan:
    """`chains` independent chains of `steps` tasks each, answers of 32..256 tokens."""
    rng = random.Random(seed)
    tasks = [
        {
            "task_id": f"c{c}s{s}",
            "specialist": "Analyst",
            "input_data": {"instruction": f"chain {c} step {s}"},
            "options": {"num_predict": rng.randint(32, 256)},
            "depends_on": [f"c{c}s{s - 1}"] if s else [],
        }
        for c in range(chains)
        for s in range(steps)
    ]
    return OrchestrationPlan.model_validate({"problem": "tail benchmark", "tasks": tasks, "success_criteria": "any"})


def warm_up_plan(n: int, seed: int = SEED + 1) -> OrchestrationPlan:
    rng = random.Random(seed)
    tasks = [
        {"task_id": f"w{i}", "specialist": "Analyst", "options": {"num_predict": rng.randint(32, 256)}}
        for i in range(n)
    ]
    return OrchestrationPlan.model_validate({"problem": "warm-up", "tasks": tasks, "success_criteria": "any"})


@dataclass
class Outcome:
    router: str
    makespan: float
    latencies: list[float]
    ok: int
    total: int
    hedges: int
    hedge_wins: int
    wasted_tokens: int
    slowed: int
    requests: int


def run(fleet: Fleet, shape: Shape, policy: str, hedge: bool) -> Outcome:
    """A fresh team: warm-up plan, then the measured chains; the servers' counters cover the measured plan."""
    fleet.reset()
    _slow_spells(fleet, on=False)
    team = sim_team(fleet, SPECIALISTS, policy)
    team = team.model_copy(update={"balancer": team.balancer.model_copy(update={"hedge": hedge})})
    coordinator = api.start_coordinator(team)
    try:
        api.execute(coordinator, warm_up_plan(6 * sum(c.slots for c in shape.servers)))
        _slow_spells(fleet, on=True)
        fleet.reset(reload=False)
        began = time.monotonic()
        report = api.execute(coordinator, chains_plan(shape.chains, shape.steps))
        makespan = time.monotonic() - began
    finally:
        api.stop_coordinator(coordinator)
    stats = fleet.stats()
    done = [t for t in report.tasks if t.status == "succeeded"]
    return Outcome(
        router=f"{policy}+hedge" if hedge else policy,
        makespan=makespan,
        latencies=[(t.ended_at or 0.0) - (t.started_at or 0.0) for t in done],
        ok=len(done),
        total=len(report.tasks),
        hedges=report.statistics.hedges,
        hedge_wins=report.statistics.hedge_wins,
        wasted_tokens=report.statistics.wasted_tokens,
        slowed=sum(s["slowed"] for s in stats.values()),
        requests=sum(s["requests"] for s in stats.values()),
    )


def _slow_spells(fleet: Fleet, on: bool) -> None:
    """The slow-tail fault off (warm-up) or as configured, re-seeded: every router's measured plan meets the
    same sequence of slow draws on each server."""
    for name, url in fleet.urls.items():
        cfg = fleet.configs[name]
        patch = {"slow_rate": cfg.slow_rate if on else 0.0, "seed": cfg.seed}
        httpx.post(f"{url}/sim/config", json=patch).raise_for_status()


def render(shape: Shape, outcomes: list[Outcome]) -> str:
    base = next((o.makespan for o in outcomes if o.router == "peak_ewma"), float("nan"))
    servers = ", ".join(
        f"{c.name}({c.slots} slots, {c.tokens_per_second:g} tok/s"
        + (f", slow {c.slow_rate:.0%} at x{c.slow_factor:g})" if c.slow_rate else ")")
        for c in shape.servers
    )
    rows = [
        [
            o.router,
            o.makespan,
            o.makespan / base,
            percentile(o.latencies, 50),
            percentile(o.latencies, 99),
            o.hedges,
            o.hedge_wins,
            o.wasted_tokens,
            o.slowed,
            o.requests,
            f"{o.ok}/{o.total}",
        ]
        for o in outcomes
    ]
    headers = [
        "router",
        "makespan s",
        "x peak_ewma",
        "p50 task s",
        "p99 task s",
        "hedges",
        "hedge wins",
        "wasted tokens",
        "slow requests",
        "requests",
        "ok",
    ]
    return "\n".join(
        [
            f"#### fleet {shape.name}",
            f"{servers}; {shape.chains} chains x {shape.steps} steps, 32..256 tokens per answer.",
            "",
            table(headers, rows),
        ]
    )


def main() -> dict[str, Any]:
    """Every router on both fleets; print and return the tables."""
    ensure_ray()
    sections = ["", "## The tail: hedging against intermittently slow servers", SIM_NOTE, ""]
    results: dict[str, list[Outcome]] = {}
    for shape in fleets():
        with Fleet(list(shape.servers)) as fleet:
            outcomes = []
            for policy, hedge in ROUTERS:
                outcomes.append(run(fleet, shape, policy, hedge))
                print(f"  measured {shape.name.split(':')[0]} {outcomes[-1].router}: {outcomes[-1].makespan:.1f} s")
        results[shape.name] = outcomes
        sections.append(render(shape, outcomes))
    sections.append(
        "task latency = a task's own start to end; slow requests and requests are counted by the servers "
        "(the measured plan only; a hedge is one more request)."
    )
    text = "\n".join(sections)
    print(text, flush=True)
    return {"outcomes": results, "text": text}


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.tail", __doc__)
    main()
