"""How the balancer's planning scales with the fleet and the queue (no HTTP anywhere).

Two figures from `teamorch.policies.balancing` called directly (pure policy, no Ray), and one from the actor:

* one planning round: `plan_dispatch("peak_ewma", ...)` (the reference, which
  plans the whole queue from scratch) vs `Planner.plan` planning from scratch
  (the same decisions over a queue kept between rounds, `keep=0`) and
  continuing its last plan (the default) on a saturated fleet with one slot
  just freed, for several fleet shapes;
* sustained grants/s: a discrete-event simulation of the balancer's event
  loop (a request ends, its slot is released, the planner grants what that
  enables) on 100 servers x 4 slots with 10,000 queued, counting only the
  CPU time spent planning (plan rebuilds included);
* end to end (`actor_rate`): the real balancer actor on Ray, 100 servers x 4
  slots, 10,000 tiny requests queued by asyncio clients in this process that
  ask for a lease through a `LeaseClient` (batched asks and releases, grants
  by long poll) as specialists do, or with one `acquire` and one `release`
  call per lease, wait at the server's gate (its `slots` at once, as the
  server actor admits them), hold the lease for the service time of the
  server's speed class and release it with the outcome;
  grants per wall-clock second and the actor's CPU milliseconds per grant,
  `planner: incremental` vs `planner: reference` (`plan_dispatch` from
  scratch on every event) in the same run, and the ceiling: the same clients
  against `_NullDesk`, which decides nothing (Ray's own cost of the same
  protocol on this machine).

Fleets come in speed classes (`speed_classes`): identical servers within a
class, as a fleet of a few machine types is once measured; `spread` makes
every server's speed a little different, as EWMAs are. In the end-to-end run
no HTTP is sent: at 2,000+ requests/s on two cores, simulators and HTTP
clients would be what is measured, not the balancer (see benchmarks/README.md).

Run: `.venv/bin/python -m benchmarks.scale` (part of `make bench`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from teamorch.messages import Lease, LeaseCalls, LeaseGrant, LeaseGrants, LeaseOutcome, LeaseRequest, ServerLoad
from teamorch.policies.balancing import REPLAN_EVENTS, Decision, Planner, plan_dispatch
from teamorch.policies.prefix import SlotState, signature

MODEL = "m"
ROLES = 8


@dataclass
class SimFleet:
    """A fleet as the balancer sees it: load rows and what each slot holds, plus the true speeds of the simulation."""

    loads: dict[str, ServerLoad]
    slots: dict[str, list[SlotState]]
    token_seconds: dict[str, float]


def speed_classes(servers: int, classes: Sequence[float], spread: float = 0.0, seed: int = 0) -> list[float]:
    """Seconds per output token of each server: the classes in turn, each server off by up to `spread` (relative)."""
    rng = random.Random(seed)
    return [classes[i % len(classes)] * (1.0 + rng.uniform(-spread, spread)) for i in range(servers)]


def make_fleet(token_seconds: Sequence[float], slots: int) -> SimFleet:
    """Idle servers, already measured (so the planner is past its cold start), all holding `MODEL`."""
    loads, states, speeds = {}, {}, {}
    for i, tok in enumerate(token_seconds):
        name = f"s{i:03d}"
        loads[name] = ServerLoad(
            name=name,
            slots=slots,
            effective_slots=slots,
            models_present=[MODEL],
            models_loaded=[MODEL],
            ewma_token_seconds=tok,
            ewma_ttft=0.05,
            ewma_prefill_seconds=tok / 10,
        )
        states[name] = [SlotState() for _ in range(slots)]
        speeds[name] = tok
    return SimFleet(loads, states, speeds)


def make_queue(n: int, seed: int = 1) -> list[LeaseRequest]:
    """`n` requests of `ROLES` specialists (shared role prompts), 16..1000 output tokens, a few priorities."""
    rng = random.Random(seed)
    roles = [signature([f"role {r} " * 200]) for r in range(ROLES)]
    out = []
    for i in range(n):
        role = roles[rng.randrange(ROLES)]
        sig = signature([f"role {roles.index(role)} " * 200, f"task {i} " * 20])
        out.append(
            LeaseRequest(
                model=MODEL,
                expected_tokens=rng.randint(16, 1000),
                priority=rng.choice((0, 0, 0, 1)),
                prefix=list(sig.chain),
                prefix_tokens=list(sig.tokens),
                prompt_tokens=sig.total,
            )
        )
    return out


Plan = Callable[[Planner, list[ServerLoad], float, dict[str, list[SlotState]]], dict[int, Decision]]


def incremental(
    planner: Planner, loads: list[ServerLoad], now: float, caches: dict[str, list[SlotState]]
) -> dict[int, Decision]:
    return planner.plan(loads, now, caches=caches)


def reference(
    planner: Planner, loads: list[ServerLoad], now: float, caches: dict[str, list[SlotState]]
) -> dict[int, Decision]:
    """`plan_dispatch` over the same queue, from scratch, keyed like `Planner.plan`."""
    keyed = planner.queue(now)
    done = plan_dispatch(planner.policy, loads, [q for _, q in keyed], caches=caches, rng=planner.rng)
    return {keyed[i][0]: d for i, d in done.items()}


@dataclass
class Outcome:
    makespan: float
    grants: int
    plan_seconds: float  # CPU time inside the planner only
    rounds: int


class EventLoop:
    """The balancer's event loop over a simulated fleet: release, plan, grant; service times as the planner expects.

    A slot's prefix cache is modelled as the server keeps it (`SlotIndex`), so
    a request's prefill is what its slot does not hold. Only time inside
    `plan` is charged to the planner; building its inputs is the actor's work
    (and is per server in the incremental design, see benchmarks/README.md).
    """

    def __init__(
        self, fleet: SimFleet, requests: Sequence[LeaseRequest], plan: Plan, keep: int = REPLAN_EVENTS
    ) -> None:
        from teamorch.policies.prefix import SlotIndex

        self.fleet, self.plan = fleet, plan
        self.planner = Planner("peak_ewma", rng=random.Random(0), keep=keep)
        for key, req in enumerate(requests):
            self.planner.add(key, req, 0.0)
        self.index = {name: SlotIndex(len(states)) for name, states in fleet.slots.items()}
        self.ends: list[tuple[float, int, str, int]] = []  # (true end, key, server, slot)
        self.expected: dict[tuple[str, int], float] = {}

    def _caches(self, now: float) -> dict[str, list[SlotState]]:
        out = {}
        for name, index in self.index.items():
            remaining = {slot: end - now for (srv, slot), end in self.expected.items() if srv == name}
            out[name] = index.states(remaining)
        return out

    def _grant(self, key: int, name: str, now: float) -> None:
        req = self.planner.entries[key].req
        self.planner.remove(key)
        slot, cached = self.index[name].take(req.model, req.prefix, req.prefix_tokens)
        assert slot is not None
        tok = self.fleet.token_seconds[name]
        seconds = 0.05 + tok * (req.expected_tokens or 0) + tok / 10 * max(0, req.prompt_tokens - cached)
        self.expected[(name, slot)] = now + seconds
        heapq.heappush(self.ends, (now + seconds, key, name, slot))
        row = self.fleet.loads[name]
        self.fleet.loads[name] = row.model_copy(update={"in_flight": row.in_flight + 1})

    def _round(self, now: float, out: Outcome) -> bool:
        loads, caches = list(self.fleet.loads.values()), self._caches(now)
        began = time.process_time()
        decisions = self.plan(self.planner, loads, now, caches)
        out.plan_seconds += time.process_time() - began
        out.rounds += 1
        granted = [(k, d) for k, d in decisions.items() if isinstance(d, str)]
        for key, name in granted:
            self._grant(key, name, now)
        out.grants += len(granted)
        return bool(granted)

    def inputs(self, now: float) -> tuple[list[ServerLoad], dict[str, list[SlotState]]]:
        """The load table and slot caches the balancer would hand its planner at `now`."""
        return list(self.fleet.loads.values()), self._caches(now)

    def release(self, early: float = 0.0) -> float:
        """The next request to end ends (`early` seconds before it was expected to) and frees its slot; the time."""
        end, _key, name, slot = heapq.heappop(self.ends)
        del self.expected[(name, slot)]
        self.index[name].release(slot)
        row = self.fleet.loads[name]
        self.fleet.loads[name] = row.model_copy(update={"in_flight": row.in_flight - 1})
        return end - early

    def run(self, releases: int | None = None) -> Outcome:
        """Until the queue is served (or `releases` slots came back); the makespan is the last end."""
        out = Outcome(0.0, 0, 0.0, 0)
        while self._round(0.0, out):
            pass
        fill = out.grants
        out.grants = out.rounds = 0
        out.plan_seconds = 0.0  # the steady state only: the first rounds fill every slot at once
        done = 0
        while self.ends and (releases is None or done < releases):
            now = out.makespan = self.release()
            done += 1
            if len(self.planner):
                self._round(now, out)
        out.grants += fill if releases is None else 0
        return out


SHAPES = ((4, 4, 100), (20, 4, 1_000), (100, 4, 1_000), (100, 4, 10_000))
CLASSES = (0.0025, 0.005, 0.01)  # three machine types, 2x apart


def round_cost(servers: int, slots: int, queued: int, plan: Plan, keep: int = 0, repeats: int = 3) -> float:
    """Seconds of one planning round on a saturated fleet right after one release (best of `repeats`).

    `keep=0`: the round plans from scratch; otherwise it continues the plan that filled the fleet.
    """
    best = float("inf")
    for _ in range(repeats):
        loop = EventLoop(make_fleet(speed_classes(servers, CLASSES, 0.05), slots), make_queue(queued), plan, keep)
        out = loop.run(releases=1)
        best = min(best, out.plan_seconds / max(1, out.rounds))
    return best


def sustained(plan: Plan, releases: int, classes: Sequence[float], spread: float, keep: int = 0) -> Outcome:
    loop = EventLoop(make_fleet(speed_classes(100, classes, spread), 4), make_queue(10_000), plan, keep)
    return loop.run(releases)


ACTOR_SECONDS = 10.0  # measured window of each end-to-end run, from when the balancer holds every request
ACTOR_TTFT = 0.02


def _actor_team(servers: int, slots: int, planner: str) -> Any:
    from teamorch.config import TeamConfig

    return TeamConfig.model_validate(
        {
            # Never contacted: the balancer is given no server actors, so it neither probes nor calls them.
            "servers": [
                {"name": f"s{i:03d}", "url": f"http://127.0.0.1:{20000 + i}", "slots": slots} for i in range(servers)
            ],
            "default_model": MODEL,
            "specialists": [{"name": "A"}],
            "balancer": {"planner": planner},
        }
    )


@dataclass
class _Window:
    """What the clients saw while counting: the monotonic time of each grant, when the balancer had received
    every ask (a call made after them all answered: one caller's calls start in order) and when counting
    stopped (ACTOR_SECONDS later, or once every request was served), how many were waiting at the start, the
    CPU seconds the actor used in between, and the Ray calls the clients made to it in between."""

    grants: list[float]
    start: float
    end: float
    waiting: int
    cpu: float
    calls: int


async def _actor_clients(
    balancer: Any,
    requests: Sequence[LeaseRequest],
    speeds: dict[str, float],
    slots: int,
    pid: int = 0,
    batched: bool = True,
) -> _Window:
    """Acquire, hold for the server's service time, release, for every request at once.

    `batched`: through a `LeaseClient`, as specialists do (a loop turn's asks and releases in one one-way call,
    grants by one long poll); else one awaited `acquire` and one `release` call per lease.

    A server admits `slots` requests at once, as the server actor's gate does:
    an early grant (queued behind a request about to end) waits there, and its
    latency counts the wait, its time to first token does not (the specialist
    measures both so).
    """

    from benchmarks.common import cpu_seconds
    from teamorch.actors.leases import LeaseClient

    grants: list[float] = []
    gates = {name: asyncio.Semaphore(slots) for name in speeds}
    client = LeaseClient(balancer)
    unbatched = [0]  # calls made without the client

    async def one(req: LeaseRequest) -> None:
        lease = await (client.acquire(req) if batched else balancer.acquire.remote(req))
        unbatched[0] += 0 if batched else 2  # its acquire and its release
        began = time.monotonic()
        grants.append(began)
        tokens = req.expected_tokens or 0
        seconds = ACTOR_TTFT + speeds[lease.server] * tokens
        async with gates[lease.server]:
            gated = time.monotonic() - began
            await asyncio.sleep(seconds)
        # Prefill is free here (as in the simulator by default): the outcome says so, and the balancer learns it.
        outcome = LeaseOutcome(
            lease_id=lease.lease_id,
            outcome="ok",
            model=req.model,
            latency=gated + seconds,  # the service time as configured: the client loop's own lag is not the server's
            ttft=ACTOR_TTFT,
            tokens=tokens,
            eval_seconds=speeds[lease.server] * tokens,  # the server's own generation time, as Ollama reports it
            prompt_tokens=req.prompt_tokens,
            cached_tokens=0,
            prompt_eval_seconds=0.0,
        )
        if batched:
            client.release(outcome)
        else:
            await balancer.release.remote(outcome)

    tasks = [asyncio.ensure_future(one(req)) for req in requests]
    await asyncio.sleep(0)  # every acquire submitted
    await client.drain()  # and, batched, the asks sent with them have reached the balancer
    loads = await balancer.snapshot.remote()
    queued_at, waiting, cpu = time.monotonic(), loads[0].waiting if loads else 0, cpu_seconds(pid)
    calls = client.calls + unbatched[0]
    while time.monotonic() < queued_at + ACTOR_SECONDS and not all(t.done() for t in tasks):
        await asyncio.sleep(0.1)
    ended, cpu = time.monotonic(), cpu_seconds(pid) - cpu
    calls = client.calls + unbatched[0] - calls
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        raise failed[0]
    return _Window(grants, queued_at, ended, waiting, cpu, calls)


class _NullDesk:
    """A lease desk that decides nothing: a freed slot goes to the longest waiting ask.

    Driven by the same clients as the balancer, over the same protocol (the
    batched one: `lease_calls` and `granted`, answered through the same
    `GrantBoxes`; or one `acquire` and one `release` per grant), with the same
    slots, it measures what Ray's calls and asyncio alone allow on this
    machine: the ceiling for the balancer actor.
    """

    def __init__(self, servers: list[str], slots: int) -> None:
        from teamorch.actors.leases import GrantBoxes

        self.free = deque(name for name in servers for _ in range(slots))
        self.held: dict[str, str] = {}
        self.waiting: deque[Callable[[str], None]] = deque()  # how to hand a freed slot to each waiting ask
        self.count = itertools.count()
        self.boxes = GrantBoxes("null")

    async def start(self) -> None:
        return None

    def _ask(self, hand: Callable[[str], None]) -> None:
        if self.free:
            hand(self.free.popleft())
        else:
            self.waiting.append(hand)

    def _lease(self, server: str) -> Lease:
        lease_id = str(next(self.count))
        self.held[lease_id] = server
        return Lease(lease_id=lease_id, server=server)

    def _free(self, lease_id: str) -> None:
        server = self.held.pop(lease_id)
        if self.waiting:
            self.waiting.popleft()(server)
        else:
            self.free.append(server)

    async def acquire(self, req: LeaseRequest, capabilities: list[str] | None = None, key: str | None = None) -> Lease:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._ask(future.set_result)
        return self._lease(await future)

    async def release(self, done: LeaseOutcome) -> None:
        self._free(done.lease_id)

    async def lease_calls(self, calls: LeaseCalls) -> None:
        for done in calls.released:
            self._free(done.lease_id)
        for ask in calls.asks:
            self._ask(partial(self._grant, calls.client, ask.ask_id))

    def _grant(self, client: str, ask_id: str, server: str) -> None:
        self.boxes.put(client, LeaseGrant(ask_id=ask_id, lease=self._lease(server)))

    async def granted(self, client: str, epoch: str) -> LeaseGrants:
        return await self.boxes.collect(client, epoch)

    async def snapshot(self) -> list[ServerLoad]:
        return [ServerLoad(name="any", slots=1, effective_slots=1, waiting=len(self.waiting))]


@dataclass
class ActorRate:
    """One end-to-end run: grants per wall-clock second, grants and queue length when counting began, the
    actor's CPU milliseconds per grant (all its threads), which a shared machine disturbs less than the rate,
    and the clients' Ray calls to the actor per grant."""

    rate: float
    grants: int
    waiting: int
    cpu_ms: float
    calls: float


def actor_rate(
    planner: str, servers: int = 100, slots: int = 4, queued: int = 10_000, batched: bool = True
) -> ActorRate:
    """Grants per second the balancer actor sustains with a full queue.

    Counted from the moment the balancer holds every request (`_actor_clients`) for ACTOR_SECONDS.
    `planner: "ceiling"` drives `_NullDesk` instead: Ray's own cost of the lease protocol. `batched`: clients
    use the batched path (`LeaseClient`), else one `acquire` and one `release` call per grant.
    """
    import ray

    from benchmarks.common import ensure_ray
    from teamorch.actors.balancer import LoadBalancer

    ensure_ray()
    team = _actor_team(servers, slots, "incremental" if planner == "ceiling" else planner)
    names = [s.name for s in team.servers]
    speeds = dict(zip(names, speed_classes(servers, CLASSES, 0.05), strict=True))
    rng = random.Random(3)
    # Tiny tasks: 8..32 output tokens, so 400 slots free up thousands of times a second.
    # The warm-up offers every slot a request (the cold start's first round), so every server is measured
    # before the queue arrives, or nearly: the run measures grants, not how new servers are probed.
    warm = servers * slots
    requests = [r.model_copy(update={"expected_tokens": rng.randint(8, 32)}) for r in make_queue(queued + warm)]
    warm_up, requests = requests[:warm], requests[warm:]
    # Every request waits inside the balancer, as a team's specialists' acquire calls do.
    options = {"num_cpus": 0, "max_concurrency": queued + 1000}
    if planner == "ceiling":
        balancer = ray.remote(_NullDesk).options(**options).remote(names, slots)
    else:
        balancer = ray.remote(LoadBalancer).options(**options).remote(team, {})
    try:
        ray.get(balancer.start.remote())
        pid = ray.get(balancer.__ray_call__.remote(lambda _self: os.getpid()))
        # Every server measured: past the cold start.
        asyncio.run(_actor_clients(balancer, warm_up, speeds, slots, batched=batched))
        clients = _actor_clients(balancer, requests, speeds, slots, pid, batched)
        window = asyncio.run(clients)
    finally:
        ray.kill(balancer)
    steady = [t for t in window.grants if t > window.start]
    # Over the whole window (not up to the last grant): a balancer that stalls is charged for the stall.
    n = max(1, len(steady))
    return ActorRate(
        len(steady) / (window.end - window.start), len(steady), window.waiting, 1e3 * window.cpu / n, window.calls / n
    )


def main() -> dict[str, Any]:
    from benchmarks.common import table

    rows = []
    for servers, slots, queued in SHAPES:
        before = round_cost(servers, slots, queued, reference)
        after = round_cost(servers, slots, queued, incremental)
        kept = round_cost(servers, slots, queued, incremental, keep=REPLAN_EVENTS)
        rows.append([f"{servers} x {slots}", queued, before * 1e3, after * 1e3, kept * 1e3, before / kept])
    steady = []
    planners = (
        ("plan_dispatch", reference, 10, 0),
        ("Planner, from scratch", incremental, 50, 0),
        (f"Planner, kept ({REPLAN_EVENTS} events)", incremental, 1000, REPLAN_EVENTS),
    )
    for label, classes, spread in (("one speed", (0.005,), 0.0), ("3 classes, EWMA spread 5%", CLASSES, 0.05)):
        for name, plan, releases, keep in planners:
            out = sustained(plan, releases, classes, spread, keep)
            steady.append([label, name, out.rounds, out.plan_seconds / out.rounds * 1e3, out.grants / out.plan_seconds])
    actor = []
    runs = (("ceiling", False), ("ceiling", True), ("reference", True), ("incremental", False), ("incremental", True))
    for planner, batched in runs:
        run = actor_rate(planner, batched=batched)
        desk = "ceiling: a desk that decides nothing" if planner == "ceiling" else f"planner: {planner}"
        label = f"{desk}, {'batched (LeaseClient)' if batched else 'one acquire + one release call per grant'}"
        actor.append([label, run.waiting, run.grants, run.rate, run.cpu_ms, run.calls])
        print(f"  measured balancer actor, {label}: {run.rate:.0f} grants/s", flush=True)
    text = "\n".join(
        [
            "",
            "## Planning cost vs fleet size (pure policy, no Ray)",
            "peak_ewma; saturated fleet, one slot just released; 8 specialists with shared 200-token role prompts, "
            "16..1000 output tokens. From scratch: plan_dispatch's decisions; kept: the plan that filled the fleet, "
            "continued (makespan within 1% of plan_dispatch's in tests/test_planner_incremental.py).",
            "",
            table(["fleet", "queued", "plan_dispatch ms", "Planner ms", "Planner kept ms", "speedup (kept)"], rows),
            "",
            table(["100 x 4, 10,000 queued", "planner", "release rounds", "ms per round", "grants/s"], steady),
            "grants/s: grants per CPU-second spent planning, one release (one freed slot) per round.",
            "",
            "End to end: the balancer actor on Ray, 100 servers x 4 slots (3 speed classes), 10,000 tiny requests "
            f"(8..32 tokens) queued; grants per wall-clock second over {ACTOR_SECONDS:.0f} s from when the balancer "
            "held them all; clients in the benchmark process wait at the server's gate, hold each lease for its "
            "service time and release it (no HTTP). Batched: through a LeaseClient as specialists do (a loop turn's "
            "asks and releases in one one-way call, grants by one long poll); else one acquire and one release call "
            "per grant. Ceiling: the same clients against a desk that decides nothing (Ray's own cost of that "
            "protocol). CPU: the actor process's, all threads, per grant.",
            "",
            table(
                ["balancer actor", "queued at start", "grants", "grants/s", "actor CPU ms/grant", "calls/grant"], actor
            ),
        ]
    )
    print(text, flush=True)
    return {"text": text, "rounds": rows, "steady": steady, "actor": actor}


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.scale", __doc__)
    main()
