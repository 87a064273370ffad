"""What teamorch's actor path costs on top of the HTTP call it makes.

The server is a simulator with near-zero service time (ttft 0, a million
tokens/s, one output token), so everything measured is overhead:

* latency: one request at a time, a direct streaming `httpx` call to
  `/api/chat` (what teamorch's Ollama backend sends) vs the same request as a
  one-task plan through `api.execute` (driver -> coordinator -> specialist ->
  balancer lease -> server actor -> HTTP and back), vs one task inside a
  100-task dependency chain (no driver round trip: the coordinator's own
  per-task cost, including handing the previous output downstream);
* dispatch throughput: one coordinator, one plan of 500 independent tiny tasks,
  journaled in memory (the Python API) and on disk (`teamorch run`: fsynced facts);
* memory per task: growth of the coordinator process's resident set size
  (RSS) over several 500-task plans, divided by the tasks run. The
  coordinator keeps running totals and only the last few run journals, so
  this is what a long-lived shared coordinator still accumulates per task
  (allocator slack, Ray bookkeeping). The pickled report size per task (what
  the driver receives) is shown beside it.

Run: `.venv/bin/python -m benchmarks.overhead` (part of `make bench`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import statistics
import tempfile
import time
from typing import Any

import httpx
import ray

from benchmarks.common import MODEL, SIM_NOTE, Fleet, cpu_seconds, ensure_ray, percentile, sim_team, table
from teamorch import api
from teamorch.messages import JournalSpec, OrchestrationPlan
from teamorch.sim import SimConfig

LATENCY_SAMPLES = 200
PLAN_SAMPLES = 100
CHAIN = 100
# The idle gap before each call of the idle round-trip rows: about what each actor of a chain step waits between turns.
IDLE_SECONDS = 0.005
BURST = 500
# Plans of BURST tasks journaled in memory: the rate moves by about +-10% from run to run on 2 shared cores, so the
# table shows each run and their median, not one draw.
BURST_RUNS = 5
MEMORY_PLANS = 4
SPECIALISTS = [{"name": "Analyst", "system_prompt": "You analyse.", "options": {"num_predict": 1}}]


def _instant(slots: int) -> SimConfig:
    return SimConfig(name="instant", slots=slots, tokens_per_second=1e6, ttft=0.0, default_tokens=1)


def direct_latencies(url: str, n: int) -> list[float]:
    """The baseline: the same streaming /api/chat request, sent by hand over one keep-alive connection."""
    payload = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You analyse."}, {"role": "user", "content": "Your task: t"}],
        "stream": True,
        "options": {"num_predict": 1},
    }
    out = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n + 5):
            began = time.perf_counter()
            with client.stream("POST", "/api/chat", json=payload) as response:
                for line in response.iter_lines():
                    if line.strip() and json.loads(line).get("done"):
                        break
            out.append(time.perf_counter() - began)
    return out[5:]  # the first few open the connection


def _tasks(n: int, chain: bool = False) -> OrchestrationPlan:
    return OrchestrationPlan.model_validate(
        {
            "problem": "overhead",
            "tasks": [
                {
                    "task_id": f"t{i}",
                    "specialist": "Analyst",
                    "depends_on": [f"t{i - 1}"] if chain and i else [],
                }
                for i in range(n)
            ],
        }
    )


def plan_latencies(coordinator: Any, n: int) -> list[float]:
    plan = _tasks(1)
    out = []
    for _ in range(n + 3):
        began = time.perf_counter()
        report = api.execute(coordinator, plan)
        out.append(time.perf_counter() - began)
        if not report.success:
            raise RuntimeError(f"overhead plan failed: {report.tasks[0].error}")
    return out[3:]  # the first runs warm the specialist actor


class _Echo:
    """An async actor that answers at once: what one Ray call costs here before any teamorch work."""

    async def echo(self, value: int) -> int:
        return value

    async def round_trips(self, peer: Any, n: int, idle: float = 0.0) -> list[float]:
        """Sequential calls to `peer` from inside an actor (as teamorch's actors call each other), in seconds;
        with `idle`, both actors sleep that long between two calls (as each actor of a chain waits for the others)."""
        out = []
        for i in range(n + 20):
            if idle:
                await asyncio.sleep(idle)
            began = time.perf_counter()
            await peer.echo.remote(i)
            out.append(time.perf_counter() - began)
        return out[20:]  # the first ones set the connection up


def ray_round_trips(n: int, idle: float = 0.0) -> list[float]:
    """Ray's floor for one hop between two async actors on this machine (a chain step makes three in a row)."""
    caller, peer = ray.remote(_Echo).remote(), ray.remote(_Echo).remote()
    try:
        return list(ray.get(caller.round_trips.remote(peer, n, idle)))
    finally:
        for actor in (caller, peer):
            ray.kill(actor)


def _own_rss() -> int:
    """Current resident set size of the calling process, in bytes (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss(coordinator: Any) -> int:
    """The coordinator actor's RSS, read inside its own process (works wherever Ray placed it)."""
    return int(ray.get(coordinator.__ray_call__.remote(lambda _self: _own_rss())))


def _processes(coordinator: Any) -> dict[str, Any]:
    """The team's actors by role, for reading their CPU inside each one's process."""
    balancer, servers, specialists = ray.get(
        coordinator.__ray_call__.remote(lambda c: (c.balancer, c.servers, c.specialists))
    )
    actors = {"coordinator": coordinator, "balancer": balancer}
    actors.update({f"server {name}": handle for name, handle in servers.items()})
    actors.update({f"specialist {name}": handle for name, handle in specialists.items()})
    return actors


def _cpu(actors: dict[str, Any], fleet: Fleet) -> dict[str, float]:
    """CPU seconds so far of each actor's process, of this driver and of the simulator's process."""
    cpu = {role: float(ray.get(h.__ray_call__.remote(lambda _self: cpu_seconds()))) for role, h in actors.items()}
    cpu["driver (api.execute)"] = cpu_seconds()
    cpu["simulator (HTTP server, not teamorch)"] = cpu_seconds(fleet.pid) if fleet.pid else 0.0
    return cpu


def _steady_rate(report: Any) -> float:
    """Tasks ended per second between the 10th and 90th percentile end: the rate without a plan's start and end."""
    ends = sorted(t.ended_at for t in report.tasks if t.ended_at is not None)
    first, last = len(ends) // 10, len(ends) * 9 // 10
    span = ends[last] - ends[first] if last > first else 0.0
    return (last - first) / span if span > 0 else float("nan")


def _burst_rows(runs: list[tuple[float, Any]]) -> list[list[Any]]:
    """A row per 500-task plan (wall seconds, report), the last on disk, then the in-memory runs' median."""
    burst_rows = [
        [
            f"{BURST}-task plan, run {i + 1}",
            BURST,
            wall,
            BURST / wall,
            _steady_rate(rep),
            sum(1 for t in rep.tasks if t.status == "succeeded"),
        ]
        for i, (wall, rep) in enumerate(runs)
    ]
    burst_rows[-1][0] = f"{BURST}-task plan, journal on disk"
    in_memory = burst_rows[:-1]
    burst_rows.append(
        [
            f"median of the {len(in_memory)} in memory",
            BURST,
            statistics.median(row[2] for row in in_memory),
            statistics.median(row[3] for row in in_memory),
            statistics.median(row[4] for row in in_memory),
            "",
        ]
    )
    return burst_rows


def main() -> dict[str, Any]:
    ensure_ray()
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    with Fleet([_instant(slots=64)]) as fleet:
        url = fleet.urls["instant"]
        direct = direct_latencies(url, LATENCY_SAMPLES)
        d50 = percentile(direct, 50)
        hops = ray_round_trips(LATENCY_SAMPLES)
        idle_hops = ray_round_trips(LATENCY_SAMPLES, idle=IDLE_SECONDS)
        team = sim_team(fleet, SPECIALISTS)
        coordinator = api.start_coordinator(team)
        try:
            one = plan_latencies(coordinator, PLAN_SAMPLES)
            began = time.perf_counter()
            chain_report = api.execute(coordinator, _tasks(CHAIN, chain=True))
            chain_wall = time.perf_counter() - began
            # per task inside the chain: from the end of one task to the end of the next
            ends = sorted(t.ended_at or 0.0 for t in chain_report.tasks)
            chain_steps = [b - a for a, b in itertools.pairwise(ends)]
            server_calls = [a.ended_at - a.started_at for t in chain_report.tasks for a in t.attempts]

            bursts = []
            for _ in range(BURST_RUNS):
                began = time.perf_counter()
                burst_report = api.execute(coordinator, _tasks(BURST))
                bursts.append((time.perf_counter() - began, burst_report))
            with tempfile.TemporaryDirectory() as runs_dir:  # kept on disk as `teamorch run` keeps it: fsynced
                began = time.perf_counter()
                spec = JournalSpec(runs_dir=runs_dir, plan_raw={"problem": "overhead"})
                burst_report = api.execute(coordinator, _tasks(BURST), journal=spec)
                on_disk = (time.perf_counter() - began, burst_report)
            actors = _processes(coordinator)
            rss_before, cpu_before = _rss(coordinator), _cpu(actors, fleet)
            for _ in range(MEMORY_PLANS):
                report = api.execute(coordinator, _tasks(BURST))
            rss_after, cpu_after = _rss(coordinator), _cpu(actors, fleet)
            report_bytes = len(pickle.dumps(report))
        finally:
            api.stop_coordinator(coordinator)

    rows = [
        ["direct httpx streaming /api/chat", len(direct), d50 * 1e3, percentile(direct, 99) * 1e3, 0.0],
        [
            "teamorch: one-task plan via api.execute",
            len(one),
            percentile(one, 50) * 1e3,
            percentile(one, 99) * 1e3,
            (percentile(one, 50) - d50) * 1e3,
        ],
        [
            f"teamorch: one task of a {CHAIN}-task chain",
            len(chain_steps),
            percentile(chain_steps, 50) * 1e3,
            percentile(chain_steps, 99) * 1e3,
            (percentile(chain_steps, 50) - d50) * 1e3,
        ],
        [
            "  of which: specialist -> server actor -> HTTP",
            len(server_calls),
            percentile(server_calls, 50) * 1e3,
            percentile(server_calls, 99) * 1e3,
            (percentile(server_calls, 50) - d50) * 1e3,
        ],
    ]
    hop50, idle50 = percentile(hops, 50), percentile(idle_hops, 50)
    idle_ms = f"{IDLE_SECONDS * 1e3:g} ms"
    rows += [
        ["Ray: one round trip between two async actors (echo)", len(hops), hop50 * 1e3, percentile(hops, 99) * 1e3, ""],
        [f"Ray: the same after {idle_ms} idle", len(idle_hops), idle50 * 1e3, percentile(idle_hops, 99) * 1e3, ""],
        ["Ray: a chain step's floor (3 round trips in a row)", "", 3 * hop50 * 1e3, "", 3 * hop50 * 1e3],
        [f"  the same, each after {idle_ms} idle", "", 3 * idle50 * 1e3, "", 3 * idle50 * 1e3],
        [f"  any design's (2 round trips, after {idle_ms} idle)", "", 2 * idle50 * 1e3, "", 2 * idle50 * 1e3],
    ]
    burst_rows = _burst_rows([*bursts, on_disk])
    tasks_run = MEMORY_PLANS * BURST
    mem_rows = [
        [
            "coordinator RSS growth per task",
            f"{MEMORY_PLANS} x {BURST}",
            (rss_after - rss_before) / 1e6,
            (rss_after - rss_before) / tasks_run / 1e3,
        ],
        ["pickled RunReport per task (sent to the driver)", BURST, report_bytes / 1e6, report_bytes / BURST / 1e3],
    ]
    cpu_rows = [[role, (cpu_after[role] - cpu_before[role]) / tasks_run * 1e3] for role in cpu_before]
    cpu_rows.append(["all of them", sum(row[1] for row in cpu_rows)])
    text = "\n".join(
        [
            "",
            "## Overhead (near-zero service time)",
            SIM_NOTE,
            "Simulator: ttft 0, 1e6 tokens/s, num_predict 1, 64 slots; one request at a time for latency.",
            "",
            table(["path", "samples", "p50 ms", "p99 ms", "added p50 ms"], rows),
            f"({CHAIN}-task chain wall {chain_wall:.2f} s.) A chain step waits for three answered Ray calls in a "
            "row (the result to the coordinator and the next task out, `acquire`, `chat`): the floor rows are "
            "what they cost before teamorch does anything, measured in this run. In a chain each actor sits idle "
            "between its turns, and a call to an idle actor process costs more (its threads wake up): hence the "
            "idle rows. Any design with specialist and server actors apart makes at least two round trips per "
            "task (coordinator -> specialist, specialist -> server actor), the last row.",
            "",
            table(["dispatch throughput", "tasks", "wall s", "tasks/s", "middle 80% tasks/s", "succeeded"], burst_rows),
            f"All runs use the coordinator already warmed by the latency runs; the first {BURST_RUNS} journal in memory "
            "(the Python API's default), the last on disk with every fact fsynced (as `teamorch run` does). "
            "tasks/s: the plan's wall time from `api.execute` to its report, submission and report included; "
            "middle 80%: the rate tasks ended at between the 10th and the 90th percentile of their end times "
            "(what a longer plan would sustain).",
            "",
            table(["memory", "tasks", "total MB", "KB per task"], mem_rows),
            "RSS growth is what the coordinator process still holds per task run (it keeps totals and the last "
            "few run journals, not every report) plus allocator slack; not a per-in-flight-task cost.",
            "",
            table(["CPU per task, by process", "ms"], cpu_rows),
            f"Over the same {MEMORY_PLANS} x {BURST} tasks: user + system CPU of each process (all its threads, Ray's "
            "included) divided by the tasks run. The sum is what bounds dispatch on a machine's cores.",
        ]
    )
    print(text, flush=True)
    results.update(text=text, direct=direct, one=one, chain=chain_steps, bursts=[b[0] for b in bursts], hops=hops)
    return results


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.overhead", __doc__)
    main()
