"""Routing quality on heterogeneous fleets: teamorch's four policies vs LiteLLM's Router.

The same few hundred tasks of varied length go to the same simulator servers
through each router; every makespan is compared with a lower bound computed from
the fleet's configuration, so "good" means "close to what is possible", not just
"better than the other one". A second, differently shaped fleet (a much slower
slow box, fewer tasks) follows, where what a router does before it has measured
the fleet, and the idle time of a slot between two requests, weigh more. Both
tables print the median slot gap as the simulators saw it.

Lower bound (no schedule can beat it):
  max(critical path, total work / total capacity), where
  * capacity counts only servers that have the model: sum of slots x tokens/s;
  * each request also costs its server ttft seconds, i.e. ttft x tokens/s
    token-equivalents of that slot; the cheapest such cost in the fleet is
    charged to every task (so the bound stays valid whatever the assignment);
  * a server whose model is present but not loaded contributes nothing for its
    load_time if it is used at all (the bound takes the better of using it or not);
  * errors, queueing and network are ignored (they only make real runs slower);
  * the tasks are independent, so the critical path is the longest single task
    on the fastest server.

Run: `.venv/bin/python -m benchmarks.routing` (part of `make bench`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.common import MODEL, SIM_NOTE, Fleet, ensure_ray, percentile, sim_team, slot_gap_ms, table
from teamorch import api
from teamorch.messages import POLICIES, OrchestrationPlan
from teamorch.sim import SimConfig

TASKS = 200
SEED = 7
SECOND_TASKS = 60
SECOND_SEED = 11
# Each teamorch policy runs this many times (interleaved), because one run of a greedy policy can be
# lucky or unlucky with where the last long jobs land; LiteLLM runs once (its spread is far larger
# than the differences that a second run could reveal, and each run costs about a minute).
REPEATS = 2

LITELLM_STRATEGIES = ("simple-shuffle", "least-busy", "latency-based-routing")
SPECIALISTS = [
    {"name": "Analyst", "system_prompt": "You analyse failures.", "capabilities": ["analysis"]},
    {"name": "Writer", "system_prompt": "You write short reports.", "capabilities": ["writing"]},
]


def fleet_configs() -> list[SimConfig]:
    """A realistic mixed fleet: GPU boxes of two sizes, a CPU box, a flaky box, a cold box, an unrelated box.

    Speeds differ by 4x between the fastest and slowest slot (real GPU vs CPU
    gaps are often larger; a smaller gap is the harder case for a smart router
    to show anything). `slots` is each box's OLLAMA_NUM_PARALLEL.
    """
    return [
        SimConfig(name="gpu-big", slots=2, tokens_per_second=600, ttft=0.04, seed=1),
        SimConfig(name="gpu-mid", slots=1, tokens_per_second=300, ttft=0.08, seed=2),
        SimConfig(name="cpu-box", slots=1, tokens_per_second=150, ttft=0.25, seed=3),
        SimConfig(name="flaky", slots=1, tokens_per_second=300, ttft=0.08, error_rate=0.05, seed=4),
        # Has our model on disk but another one in memory: the first request pays a 3 s load.
        SimConfig(
            name="cold",
            slots=2,
            tokens_per_second=300,
            ttft=0.08,
            models=[MODEL, "llama3.1:8b"],
            loaded=["llama3.1:8b"],
            load_time=3.0,
            seed=5,
        ),
        # Serves only an embedding model: must never get a chat request for MODEL.
        SimConfig(name="embed-box", slots=4, tokens_per_second=2000, ttft=0.01, models=["nomic-embed-text"], seed=6),
    ]


def second_fleet_configs() -> list[SimConfig]:
    """A smaller fleet with a slow box 12x slower per slot than the fast one (a CPU box next to a GPU).

    With 60 tasks the run lasts a few seconds, so the first requests (sent
    before any speed is measured) and the idle time between requests on a
    slot are a visible part of the makespan; one long job sent blindly to the
    slow box would double it.
    """
    return [
        SimConfig(name="fast", slots=2, tokens_per_second=480, ttft=0.04, seed=11),
        SimConfig(name="mid", slots=1, tokens_per_second=240, ttft=0.08, seed=12),
        SimConfig(name="slow", slots=1, tokens_per_second=40, ttft=0.4, seed=13),
    ]


def workload(n: int = TASKS, seed: int = SEED) -> list[int]:
    """Output lengths (num_predict) of n tasks: mostly short chats, some reports, a few long documents."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            lengths.append(rng.randint(16, 128))
        elif r < 0.95:
            lengths.append(rng.randint(128, 384))
        else:
            lengths.append(rng.randint(384, 1024))
    return lengths


@dataclass
class Bound:
    seconds: float
    critical_path: float
    work_bound: float
    capacity_tps: float
    servers: list[str]


def lower_bound(configs: list[SimConfig], lengths: list[int], model: str = MODEL) -> Bound:
    """The computable best makespan for independent tasks on this fleet (see module docstring)."""
    able = [c for c in configs if model in c.models]
    cap = {c.name: c.slots * c.tokens_per_second for c in able}
    fixed = min(c.ttft * c.tokens_per_second for c in able)  # token-equivalents each request costs at least
    work = sum(lengths) + fixed * len(lengths)
    cold = [c for c in able if c.loaded is not None and model not in c.loaded]
    best = float("inf")
    for k in range(len(cold) + 1):
        for used_cold in itertools.combinations(cold, k):
            unused = [c for c in cold if c not in used_cold]
            capacity = sum(cap.values()) - sum(cap[c.name] for c in unused)
            if capacity <= 0:
                continue
            lost = sum(c.load_time * cap[c.name] for c in used_cold)  # capacity idle while loading
            best = min(best, (work + lost) / capacity)
    critical = max(min(c.ttft + n / c.tokens_per_second for c in able) for n in lengths)
    return Bound(max(critical, best), critical, best, sum(cap.values()), [c.name for c in able])


@dataclass
class Outcome:
    """One router's run of the workload, measured from the client's side."""

    router: str
    makespan: float
    latencies: list[float]
    tokens: int
    ok: int
    failed: int
    retries: int
    per_server: dict[str, int] = field(default_factory=dict)
    sim_requests: int = 0
    sim_errors: int = 0
    gap_ms: float = float("nan")  # median idle time of a slot between two requests, as the simulators saw it


def _plan(lengths: list[int]) -> OrchestrationPlan:
    return OrchestrationPlan.model_validate(
        {
            "problem": "routing benchmark",
            "tasks": [
                {
                    "task_id": f"t{i:03d}",
                    "specialist": SPECIALISTS[i % len(SPECIALISTS)]["name"],
                    "input_data": {"instruction": f"task {i}"},
                    "options": {"num_predict": n},
                }
                for i, n in enumerate(lengths)
            ],
            "success_criteria": "any",
        }
    )


def _sim_totals(fleet: Fleet, outcome: Outcome) -> None:
    stats = fleet.stats()
    outcome.per_server = {name: s["completed"] for name, s in stats.items()}
    outcome.sim_requests = sum(s["requests"] for s in stats.values())
    outcome.sim_errors = sum(s["failed"] for s in stats.values())
    outcome.gap_ms = slot_gap_ms(stats)


def run_teamorch(fleet: Fleet, policy: str, lengths: list[int]) -> Outcome:
    """All tasks in one plan (independent), so they all reach the balancer at once."""
    fleet.reset()
    coordinator = api.start_coordinator(sim_team(fleet, SPECIALISTS, policy))
    try:
        plan = _plan(lengths)
        submitted_wall, started = time.time(), time.monotonic()
        report = api.execute(coordinator, plan)
        makespan = time.monotonic() - started
    finally:
        api.stop_coordinator(coordinator)
    done = [t for t in report.tasks if t.status == "succeeded"]
    outcome = Outcome(
        router=f"teamorch {policy}",
        makespan=makespan,
        latencies=[(t.ended_at or 0.0) - submitted_wall for t in done],
        tokens=sum(t.tokens for t in done),
        ok=len(done),
        failed=len(report.tasks) - len(done),
        retries=sum(max(0, len(t.attempts) - 1) for t in report.tasks),
    )
    _sim_totals(fleet, outcome)
    return outcome


def _quiet_litellm() -> Any:
    # Without this LiteLLM fetches its model price map from GitHub at import (no network here, and
    # a benchmark must not depend on it).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


def _deployments(fleet: Fleet) -> list[dict[str, Any]]:
    """What a LiteLLM user writes: one deployment per box that has the model (the embedding box is left out)."""
    return [
        {"model_name": MODEL, "litellm_params": {"model": f"ollama_chat/{MODEL}", "api_base": fleet.urls[name]}}
        for name, cfg in fleet.configs.items()
        if MODEL in cfg.models
    ]


def _messages(i: int) -> list[dict[str, str]]:
    spec = SPECIALISTS[i % len(SPECIALISTS)]
    return [
        {"role": "system", "content": str(spec["system_prompt"])},
        {"role": "user", "content": f"Problem: routing benchmark\n\nYour task: task {i}"},
    ]


async def _litellm_run(fleet: Fleet, strategy: str, lengths: list[int]) -> Outcome:
    litellm = _quiet_litellm()
    router = litellm.Router(model_list=_deployments(fleet), routing_strategy=strategy, num_retries=2)
    t0 = time.monotonic()
    latencies: list[float] = []
    tokens = 0

    async def one(i: int, n: int) -> bool:
        nonlocal tokens
        resp = await router.acompletion(model=MODEL, messages=_messages(i), max_tokens=n)
        latencies.append(time.monotonic() - t0)
        tokens += int(getattr(resp.usage, "completion_tokens", 0) or 0)
        return True

    results = await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)), return_exceptions=True)
    makespan = time.monotonic() - t0
    ok = sum(1 for r in results if r is True)
    return Outcome(
        router=f"LiteLLM {strategy}",
        makespan=makespan,
        latencies=latencies,
        tokens=tokens,
        ok=ok,
        failed=len(results) - ok,
        retries=0,
    )


def run_litellm(fleet: Fleet, strategy: str, lengths: list[int]) -> Outcome:
    """All tasks submitted at once as asyncio tasks through one fresh Router (how people use it)."""
    fleet.reset()
    outcome = asyncio.run(_litellm_run(fleet, strategy, lengths))
    _sim_totals(fleet, outcome)
    # Requests the servers saw beyond one per task are LiteLLM's retries (it does not report them itself).
    outcome.retries = max(0, outcome.sim_requests - len(lengths))
    return outcome


def warm_litellm(fleet: Fleet) -> None:
    """One call through a throwaway Router so LiteLLM's lazy imports are not charged to the first strategy."""
    litellm = _quiet_litellm()

    async def once() -> None:
        router = litellm.Router(model_list=_deployments(fleet)[:1])
        await router.acompletion(model=MODEL, messages=_messages(0), max_tokens=1)

    asyncio.run(once())


def pacing(fleet: Fleet, name: str, tokens: int, samples: int = 8) -> tuple[float, float]:
    """(configured, measured median) seconds of one request on an idle simulator, sent directly with httpx.

    The bound uses configured rates; this shows how much slower the simulator
    really is per request (its pacing sleeps overshoot a little), a cost every
    router in the table pays and none can avoid.
    """
    cfg = fleet.configs[name]
    payload = {"model": MODEL, "messages": _messages(0), "stream": True, "options": {"num_predict": tokens}}
    took = []
    with httpx.Client(base_url=fleet.urls[name], timeout=30) as client:
        for _ in range(samples):
            began = time.monotonic()
            with client.stream("POST", "/api/chat", json=payload) as response:
                for _line in response.iter_lines():
                    pass
            took.append(time.monotonic() - began)
    return cfg.ttft + tokens / cfg.tokens_per_second, percentile(took, 50)


@dataclass(frozen=True)
class Shape:
    """One fleet of the benchmark and what runs on it."""

    title: str
    configs: list[SimConfig]
    lengths: list[int]
    paced: tuple[str, str]  # the fastest and slowest server, for the pacing line
    litellm: bool  # LiteLLM rows too (each costs about a minute)


def shapes(quick: bool = False) -> list[Shape]:
    return [
        Shape("heterogeneous fleet", fleet_configs(), workload(60 if quick else TASKS), ("gpu-big", "cpu-box"), True),
        Shape(
            "second fleet: a much slower slow box, fewer tasks",
            second_fleet_configs(),
            workload(30 if quick else SECOND_TASKS, SECOND_SEED),
            ("fast", "slow"),
            False,
        ),
    ]


def main(quick: bool = False) -> dict[str, Any]:
    """Run every router on each fleet and workload; print and return the tables."""
    ensure_ray()
    results = [run_shape(shape) for shape in shapes(quick)]
    text = "\n".join(r["text"] for r in results)
    return {"bound": results[0]["bound"], "outcomes": results[0]["outcomes"], "shapes": results, "text": text}


def run_shape(shape: Shape) -> dict[str, Any]:
    """Every teamorch policy (REPEATS times, interleaved), then LiteLLM's strategies if the shape asks for them."""
    lengths, configs = shape.lengths, shape.configs
    bound = lower_bound(configs, lengths)
    outcomes: list[Outcome] = []
    with Fleet(configs) as fleet:
        median = sorted(lengths)[len(lengths) // 2]
        paced = {name: pacing(fleet, name, median) for name in shape.paced}
        for repeat in range(1, REPEATS + 1):
            for policy in POLICIES:
                outcome = run_teamorch(fleet, policy, lengths)
                outcome.router += f" #{repeat}"
                outcomes.append(outcome)
                print(f"  measured {outcome.router}: {outcome.makespan:.1f} s", flush=True)
        if shape.litellm:
            try:
                warm_litellm(fleet)
                for strategy in LITELLM_STRATEGIES:
                    outcomes.append(run_litellm(fleet, strategy, lengths))
                    print(f"  measured LiteLLM {strategy}: {outcomes[-1].makespan:.1f} s", flush=True)
            except ImportError as exc:
                print(f"  LiteLLM not installed ({exc}); install the bench extra: pip install -e '.[bench]'")
    text = render(configs, lengths, bound, outcomes, median, paced, shape)
    print(text, flush=True)
    return {"bound": bound, "outcomes": outcomes, "text": text}


def render(
    configs: list[SimConfig],
    lengths: list[int],
    bound: Bound,
    outcomes: list[Outcome],
    median: int,
    paced: dict[str, tuple[float, float]],
    shape: Shape,
) -> str:
    fleet_rows = [
        [
            c.name,
            c.slots,
            f"{c.tokens_per_second:g}",
            f"{c.ttft:g}",
            ",".join(c.models),
            "all" if c.loaded is None else (",".join(c.loaded) or "none"),
            f"{c.load_time:g}",
            f"{c.error_rate:g}",
        ]
        for c in configs
    ]
    rr = [o.makespan for o in outcomes if o.router.startswith("teamorch round_robin")]
    baseline = sum(rr) / len(rr) if rr else float("nan")
    order = {f"teamorch {p}": i for i, p in enumerate(POLICIES)}
    position = {id(o): i for i, o in enumerate(outcomes)}
    outcomes = sorted(outcomes, key=lambda o: (order.get(o.router.split(" #")[0], len(order)), position[id(o)]))
    rows = []
    for o in outcomes:
        rows.append(
            [
                o.router,
                o.makespan,
                o.makespan / bound.seconds,
                o.makespan / baseline,
                percentile(o.latencies, 50),
                percentile(o.latencies, 99),
                o.tokens / o.makespan if o.makespan else 0.0,
                f"{o.ok}/{o.ok + o.failed}",
                o.retries,
                o.gap_ms,
                " ".join(f"{k}={v}" for k, v in o.per_server.items() if v),
            ]
        )
    return "\n".join(
        [
            "",
            f"## Routing quality ({shape.title})",
            SIM_NOTE,
            f"{len(lengths)} independent tasks, num_predict {min(lengths)}..{max(lengths)} "
            f"(total {sum(lengths)} tokens), all submitted at once.",
            "",
            table(["server", "slots", "tok/s/slot", "ttft s", "models", "loaded", "load s", "error rate"], fleet_rows),
            "",
            f"Lower bound {bound.seconds:.2f} s = max(critical path {bound.critical_path:.2f} s, "
            f"work/capacity {bound.work_bound:.2f} s); capacity {bound.capacity_tps:g} tok/s over "
            f"{', '.join(bound.servers)}.",
            "Simulator pacing, one direct request of the median length "
            f"({median} tokens) on an idle server: "
            + "; ".join(f"{n} {m * 1e3:.0f} ms vs {c * 1e3:.0f} ms configured" for n, (c, m) in paced.items())
            + " (the bound uses configured rates).",
            "",
            table(
                [
                    "router",
                    "makespan s",
                    "x bound",
                    "x mean round_robin",
                    "p50 latency s",
                    "p99 latency s",
                    "tokens/s",
                    "ok",
                    "retries",
                    "slot gap p50 ms",
                    "completed per server",
                ],
                rows,
            ),
            "latency = task completion time minus the moment the whole batch was submitted. "
            "Slot gap: median idle time of a slot between two requests, as the simulators saw it.",
            ""
            if shape.litellm
            else "LiteLLM is not run on this fleet: its routers send a share of the work blindly to the slow box, "
            "which alone would take minutes; its figures are in the first table.",
            "",
            summary(outcomes, bound),
        ]
    )


def summary(outcomes: list[Outcome], bound: Bound) -> str:
    """One line per router family: mean makespan over its runs, as a multiple of the bound."""
    families: dict[str, list[float]] = {}
    for o in outcomes:
        families.setdefault(o.router.split(" #")[0], []).append(o.makespan)
    parts = [
        f"{name}: {sum(v) / len(v) / bound.seconds:.2f}x bound"
        + (f" (runs {', '.join(f'{x / bound.seconds:.2f}' for x in v)})" if len(v) > 1 else "")
        for name, v in families.items()
    ]
    return "Mean makespan / lower bound -- " + "; ".join(parts) + "."


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.routing", __doc__)
    main()
