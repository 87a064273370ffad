"""Deterministic policy replay: the balancer's decisions and the simulator's servers on one virtual clock, no Ray.

A DEVELOPMENT TOOL for routing policies, NOT a measurement. Its figures are
never quoted as results (benchmarks/README.md quotes `benchmarks.prefix`,
which runs the real actors against real simulator servers over HTTP). What it
is for: a routing change can be tried on every fleet of a workload in
seconds, the same way every time, and a run can be taken apart request by
request (`--trace`: each slot's timeline, which requests prefilled cold),
which a benchmark on a shared machine cannot give.

What is real and what is replayed:

* Every decision is the real policy code: `plan_dispatch` (or the incremental
  `Planner`), `coalesce_delay`, `apply_group_diversity`, `planned_seconds`,
  and the balancer's bookkeeping in `teamorch.policies.fleet` (`record_grant`,
  `record_outcome`, `record_probe`, `to_load`). The requests are built as the
  specialist builds them (`prompt_blocks` -> `signature`).
* The servers follow `teamorch.sim`'s rules through its pure parts
  (`teamorch.sim_model.SlotCaches`: the free slot with the longest common
  prefix; `Residency`: least recently used eviction after a drain, one load
  at a time), and report what the simulator reports (prompt_eval = ttft +
  uncached / prefill rate, cached counts, load_duration).
* Replayed, not run: the balancer actor's glue (arrivals, coalescing timer,
  0.25 s tick, health polls, a probe after each load) and Ray/HTTP hops,
  a fixed `HOP` each way. Streaming, retries and faults are not replayed,
  nor early grants (a lease granted before its slot frees, waiting at the
  server actor's gate: `early_slot`): on the prefix fleets they are rare,
  since `early_lands` refuses one where the server's other slot holds
  another prefix, and `--live` replayed real fleet-B and fleet-C runs'
  cold prefills exactly (7 and 11) and their makespans within 0.03x.

Run: `.venv/bin/python -m benchmarks.replay [--policy P] [--planner | --live] [--trace]`. `--live` plans as the
balancer actor does (the incremental `Planner` with its live tolerances, `LIVE_*` in `teamorch.policies.balancing`):
its kept plans are what real runs follow (before `Planner._learning`, `--live` replayed fleet B's 11 cold prefills
of a real run where `--planner` replayed 8).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from benchmarks.common import MODEL, table
from benchmarks.prefix import (
    MODEL_FLEETS,
    PREFIX_FLEETS,
    PROBLEM,
    SEED,
    Shape,
    Workload,
    cache_floor,
    model_bound,
    multi_model_workload,
    prefix_bound,
    prefix_workload,
    prompt_of,
    tasks,
)
from teamorch.config import RetryConfig, ServerConfig, SpecialistConfig
from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseOutcome, LeaseRequest, ProbeResult, ServerLoad, Task
from teamorch.policies.balancing import (
    LIVE_KEEP_SECONDS,
    LIVE_ON_TIME,
    LIVE_SHIFT_SECONDS,
    LIVE_SPEED_DRIFT,
    Decision,
    Planner,
    Queued,
    apply_group_diversity,
    coalesce_delay,
    has_capacity,
    plan_dispatch,
    planned_seconds,
    wave_deadline,
)
from teamorch.policies.fleet import (
    PROBE_TOKENS,
    FleetMemory,
    Placement,
    ServerStats,
    probe_model,
    probe_prompt,
    recall,
    record_grant,
    record_outcome,
    record_probe,
    remember,
    to_load,
)
from teamorch.policies.prefix import SlotState, signature
from teamorch.policies.prompting import prompt_blocks
from teamorch.sim_model import Residency, SlotCaches, Taken

# Seconds of each Ray/HTTP hop (grant -> server, server -> release); H5 matched a real fleet-B run within 1% with it.
HOP = 0.004
TICK_SECONDS = 0.25  # the balancer's re-planning tick (teamorch.actors.balancer.TICK_SECONDS)
# Seconds between two of a wave's acquires reaching the balancer: the coordinator hands tasks to the specialists,
# each builds its prompt and asks; a real fleet-B run's 64 acquires came over 62 ms on a shared 2-core host.
ARRIVAL_SECONDS = 0.001
# Seconds between specialists' bursts (`--stagger`): before the coordinator waited for its specialist actors to start
# (worker processes, ~0.4 s each on 2 cores), a fresh team's first wave came in bursts, one specialist after another
# (measured 0, 37, 98, 237, 252 and 321 ms on fleet B), and a stagger of 0.06 s replayed that run's figures (1.74 x the
# bound on B, 7 loads on multi-model B). Now the wave comes whole: 0.
STAGGER_SECONDS = 0.0
# A request that found fewer of its prompt's tokens cached than this fraction counts as a cold prefill in the trace.
COLD_FRACTION = 0.5
# `--orders`: at most this many server orders per fleet (a five-server fleet has 120), spread over all of them.
ORDERS_MOST = 30
# Issue 10's shared-prefix targets, which `--orders` counts the orders meeting.
TARGET_X = 1.3
TARGET_HIT = 0.85
# The epoch seconds fleet memory is saved and recalled at (`--memory`): one instant, so nothing in it is stale.
MEMORY_NOW = 1.0e9


# The `Job.specialist` of a speed probe: its prompt tokens count (the simulator's counters include them, as in the
# real benchmark's), but it is no task: not in `Result.per_server` nor in the trace.
PROBE = "(speed probe)"


@dataclass(frozen=True)
class Job:
    """One task as the balancer and the server see it: its lease request, its prompt's tokens, its output tokens."""

    task_id: str
    specialist: str
    req: LeaseRequest
    prompt: tuple[str, ...]
    tokens: int


def jobs(work: Workload, plan: Sequence[Task]) -> list[Job]:
    """The lease requests the specialists send for `plan`, built as `Specialist.run` builds them."""
    specs = {s["name"]: SpecialistConfig.model_validate(s) for s in work.specialists}
    out = []
    for t in plan:
        spec = specs[t.specialist]
        sig = signature(prompt_blocks(spec, t, PROBLEM, {}, {}))
        n = int(t.options["num_predict"])
        req = LeaseRequest(
            model=spec.model or MODEL,
            expected_tokens=n,
            prefix=list(sig.chain),
            prefix_tokens=list(sig.tokens),
            prompt_tokens=sig.total,
        )
        out.append(Job(t.task_id, t.specialist, req, prompt_of(work, t), n))
    return out


def arrivals(plan: Sequence[Job], spacing: float, stagger: float) -> list[tuple[float, Job]]:
    """When each job reaches the balancer: `spacing` apart in plan order; with `stagger`, each specialist's jobs
    come together, the specialists `stagger` apart in a seeded random order (their actors start one by one)."""
    if not stagger:
        return [(k * spacing, job) for k, job in enumerate(plan)]
    names = sorted({job.specialist for job in plan})
    random.Random(SEED).shuffle(names)
    out = []
    for i, name in enumerate(names):
        mine = [job for job in plan if job.specialist == name]
        out += [(i * stagger + k * spacing, job) for k, job in enumerate(mine)]
    return out


@dataclass
class _Call:
    """A request at a server: arrived, maybe waiting for its model; `taken` once it holds a slot."""

    lease: int
    job: Job
    arrived: float
    taken: Taken | None = None
    load_wait: float = 0.0


@dataclass(frozen=True)
class Span:
    """One request on a server slot, for the trace: when it started, what it found cached, who sent it."""

    server: str
    slot: int
    start: float
    end: float
    specialist: str
    cached: int
    prompt: int

    @property
    def cold(self) -> bool:
        return self.cached < COLD_FRACTION * self.prompt


Push = Callable[[float, Callable[[float], None]], None]


class Box:
    """One simulator server on the replay clock, by `teamorch.sim`'s rules (see the module docstring)."""

    def __init__(self, shape: Shape, work: Workload, models: list[str], push: Push, done: Callable[..., None]) -> None:
        self.shape, self.work, self.push, self.done = shape, work, push, done
        self.max_loaded = work.max_loaded
        self.residency = Residency([] if work.max_loaded else models)
        self.caches: dict[str, SlotCaches] = {}
        self.running: Counter[str] = Counter()
        self.pending: list[_Call] = []
        self.loading: str | None = None  # the one load under way (or waiting for its victim to drain)
        self.victim: str | None = None
        self.counts: Counter[str] = Counter()
        self.spans: list[Span] = []

    def loaded(self) -> list[str]:
        return list(self.residency.order)

    def arrive(self, call: _Call, now: float) -> None:
        self.pending.append(call)
        self._step(now)

    def _step(self, now: float) -> None:
        for call in [c for c in self.pending if self.residency.usable(c.job.req.model)]:
            self.pending.remove(call)
            self._start(call, now)
        if self.loading is None:
            wanted = next((c.job.req.model for c in self.pending if not self.residency.resident(c.job.req.model)), None)
            if wanted is not None:
                self.loading = wanted
                self._make_room(now)

    def _make_room(self, now: float) -> None:
        """Evict the least recently used model (idle first) after its requests drain; then load."""
        assert self.loading is not None
        if self.residency.full(self.max_loaded):
            victim = self.residency.victim(lambda m: self.running[m] > 0)
            if victim is not None and self.running[victim] > 0:
                self.residency.draining.add(victim)
                self.victim = victim
                return  # `finish` resumes when it drained
            if victim is not None:
                self.residency.evict(victim)
                self.caches.pop(victim, None)
                self.counts["evictions"] += 1
        model = self.loading
        self.residency.loading.add(model)
        self.push(now + self.shape.load_time, lambda t: self._loaded(model, t))

    def _loaded(self, model: str, now: float) -> None:
        self.residency.loaded(model)
        self.counts["model_loads"] += 1
        self.loading = None
        self._step(now)

    def _start(self, call: _Call, now: float) -> None:
        model, f, work = call.job.req.model, self.shape.factor, self.work
        self.running[model] += 1
        self.residency.touch(model)
        caches = self.caches.setdefault(model, SlotCaches())
        call.taken = caches.take(call.job.prompt, self.shape.slots, now)
        call.taken.slot.tokens = call.job.prompt
        call.load_wait = now - call.arrived if now > call.arrived else 0.0
        uncached = len(call.job.prompt) - call.taken.cached
        prefill = work.ttft / f + (uncached / (work.prefill_tps * f) if work.prefill_tps else 0.0)
        gen = call.job.tokens / (work.tps * f)
        self.counts["prompt_tokens"] += len(call.job.prompt)
        self.counts["cached_prompt_tokens"] += call.taken.cached
        end = now + prefill + gen
        slot = caches.slots.index(call.taken.slot)
        if call.job.specialist != PROBE:
            self.spans.append(
                Span(self.shape.name, slot, now, end, call.job.specialist, call.taken.cached, len(call.job.prompt))
            )
        self.push(end, lambda t: self._finish(call, prefill, gen, t))

    def _finish(self, call: _Call, prefill: float, gen: float, now: float) -> None:
        assert call.taken is not None
        model = call.job.req.model
        SlotCaches.release(call.taken.slot, now)
        self.running[model] -= 1
        self.counts["completed"] += call.job.specialist != PROBE
        self.done(call, prefill, gen, now)
        if self.victim == model and self.running[model] == 0:
            self.victim = None
            self.residency.evict(model)
            self.caches.pop(model, None)
            self.counts["evictions"] += 1
            self._make_room(now)
        self._step(now)


@dataclass
class _Lease:
    server: str
    granted: float
    expected: float
    placed: Placement
    job: Job


@dataclass
class Result:
    """What one replay did; `spans` is every request on its slot, for `--trace`."""

    policy: str
    makespan: float
    prompt_tokens: int
    cached_tokens: int
    loads: int
    evictions: int
    per_server: dict[str, int]
    spans: list[Span] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def cold_prefills(self) -> Counter[str]:
        return Counter(s.specialist for s in self.spans if s.cold)


class Replay:
    """The balancer actor's event handling (teamorch.actors.balancer.LoadBalancer) over `Box` servers.

    Only its glue is re-enacted here: arrivals in queue order, the coalescing
    timer, the tick, polls and grants; each decision is the policy's.
    `planner=True` plans with the incremental `Planner` instead of calling
    `plan_dispatch` over the whole queue; `live=True` with the actor's live tolerances as well.
    """

    def __init__(
        self,
        work: Workload,
        shapes: Sequence[Shape],
        policy: str = "peak_ewma",
        *,
        planner: bool = False,
        live: bool = False,
        hop: float = HOP,
        arrival: float = ARRIVAL_SECONDS,
        stagger: float = STAGGER_SECONDS,
        memory: FleetMemory | None = None,
        measure: bool = True,
    ) -> None:
        self.measure = measure and policy == "peak_ewma" and len(shapes) > 1  # as the actor decides it
        self.probing: set[int] = set()  # speed probes not yet answered: no plan before they are
        self.work, self.policy, self.hop, self.arrival, self.stagger = work, policy, hop, arrival, stagger
        self.models = sorted({str(s.get("model", MODEL)) for s in work.specialists})
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self.seq = itertools.count()
        self.boxes = {s.name: Box(s, work, self.models, self._push, self._answered) for s in shapes}
        configs = {s.name: ServerConfig(name=s.name, url=f"http://{s.name}.replay", slots=s.slots) for s in shapes}
        self.stats = {name: ServerStats.new(cfg, RetryConfig()) for name, cfg in configs.items()}
        if memory is not None:  # a long-lived team's start: what an earlier run taught, recalled as `teamorch run` does
            for stats in self.stats.values():
                recall(stats, memory, MEMORY_NOW)
        self.poll_interval = min(cfg.poll_interval for cfg in configs.values())
        self.waiters: list[tuple[int, float, Job]] = []  # (seq, enqueued, job), in queue order
        self.leases: dict[int, _Lease] = {}
        tolerances = {
            "on_time": LIVE_ON_TIME,
            "shift_within": LIVE_SHIFT_SECONDS,
            "keep_seconds": LIVE_KEEP_SECONDS,
            "drift": LIVE_SPEED_DRIFT,
        }
        self.planner = (
            Planner(policy, rng=random.Random(0), **(tolerances if live else {})) if planner or live else None
        )
        self.rng = random.Random(0)
        self.rr = itertools.count()
        self.coalescing = False
        self.wave = (0.0, 0.0)  # the coalescing wait's first arrival and when it plans (a later arrival may move it)
        self.end = 0.0
        self.left = 0  # jobs not yet released

    def _push(self, at: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (at, next(self.seq), action))

    def run(self, plan: Sequence[Job], trace: bool = False) -> Result:
        """Submit every job at t=0 (one wave, as a plan's fan-out does) and replay until the last one is released."""
        for name in self.stats:
            self._probe(name, 0.0, dispatch=False)
        if self.measure:
            loads = self._loads(0.0)
            for name, stats in self.stats.items():
                model = probe_model(stats, self.models)  # as the actor decides it (`_probe` above: what it holds)
                if model is None:
                    continue
                key = next(self.seq)
                prompt = tuple(probe_prompt(name).split())  # the simulator's tokens: words
                req = LeaseRequest(model=model, expected_tokens=PROBE_TOKENS, prompt_tokens=len(prompt))
                self.probing.add(key)
                self._grant(key, Job(f"probe-{name}", PROBE, req, prompt, PROBE_TOKENS), name, loads, 0.0)
        for at, job in arrivals(plan, self.arrival, self.stagger):
            self._push(at, lambda t, job=job: self._arrive(job, t))
        self._push(self.poll_interval, self._poll)
        self._push(TICK_SECONDS, self._tick)
        self.left = len(plan)
        while self.events and self.left:
            at, _, action = heapq.heappop(self.events)
            action(at)
        counts = sum((box.counts for box in self.boxes.values()), Counter())
        return Result(
            self.policy,
            self.end,
            counts["prompt_tokens"],
            counts["cached_prompt_tokens"],
            counts["model_loads"],
            counts["evictions"],
            {name: box.counts["completed"] for name, box in self.boxes.items()},
            [s for box in self.boxes.values() for s in box.spans] if trace else [],
        )

    # ---- the balancer's events ------------------------------------------------------------

    def _loads(self, now: float) -> list[ServerLoad]:
        return [to_load(s, now, len(self.waiters)) for s in self.stats.values()]

    def _arrive(self, job: Job, now: float) -> None:
        key = next(self.seq)
        self.waiters.append((key, now, job))
        if self.planner is not None:
            self.planner.add(key, job.req, now)
        loads = self._loads(now)
        delay = coalesce_delay(self.policy, loads, job.req)
        if delay is not None or not any(has_capacity(s) for s in loads):
            if delay is not None:
                first = self.wave[0] if self.coalescing else now
                at = wave_deadline(loads, first, now, delay)
                if not self.coalescing or at > self.wave[1]:
                    self.coalescing, self.wave = True, (first, at)
                    self._push(at, lambda t, wave=self.wave: self._coalesced(t) if self.wave is wave else None)
            return
        self._dispatch(now)

    def _coalesced(self, now: float) -> None:
        self.coalescing = False
        self._dispatch(now)

    def _tick(self, now: float) -> None:
        if self.waiters and not self.coalescing:  # the actor's `_replan`
            self._dispatch(now)
        if self.waiters or self.leases:
            self._push(now + TICK_SECONDS, self._tick)

    def _poll(self, now: float) -> None:
        for name in self.stats:
            self._probe(name, now, dispatch=False)
        if not self.coalescing:
            self._dispatch(now)
        if self.waiters or self.leases:
            self._push(now + self.poll_interval, self._poll)

    def _probe(self, name: str, now: float, dispatch: bool = True) -> None:
        probe = ProbeResult(
            healthy=True, checked_at=now, models_present=self.models, models_loaded=self.boxes[name].loaded()
        )
        record_probe(self.stats[name], probe, now)
        if dispatch and not self.coalescing:
            self._dispatch(now)

    def _caches(self, now: float) -> dict[str, list[SlotState]]:
        remaining: dict[str, dict[int, float]] = {name: {} for name in self.stats}
        for lease in self.leases.values():
            if lease.placed.slot is not None:
                remaining[lease.server][lease.placed.slot] = max(0.0, lease.expected - (now - lease.granted))
        return {name: stats.prefix.states(remaining[name]) for name, stats in self.stats.items()}

    def _dispatch(self, now: float) -> None:
        if self.probing:
            return
        for _round in range(len(self.waiters) + 1):
            if not self.waiters or not self._round(now):
                return

    def _decide(self, now: float, loads: list[ServerLoad], queue: list[Queued]) -> dict[int, Decision]:
        """Decisions by position in `self.waiters`."""
        caches = self._caches(now)
        counter = self.rr if self.policy == "round_robin" else None
        if self.planner is None:
            return plan_dispatch(self.policy, loads, queue, caches=caches, counter=counter, rng=self.rng)
        keyed = self.planner.plan(loads, now, caches=caches, counter=counter)
        where = {key: i for i, (key, _, _) in enumerate(self.waiters)}
        return {where[key]: d for key, d in keyed.items()}

    def _round(self, now: float) -> bool:
        loads = self._loads(now)
        queue = [Queued(job.req, now - enqueued) for _, enqueued, job in self.waiters]
        decisions, held_back = apply_group_diversity(self._decide(now, loads, queue), queue)
        granted = set()
        for index, decision in decisions.items():
            if isinstance(decision, NoServerAvailable):
                raise decision
            key, _, job = self.waiters[index]
            self._grant(key, job, decision, loads, now)
            granted.add(key)
        self.waiters = [w for w in self.waiters if w[0] not in granted]
        return held_back

    def _grant(self, key: int, job: Job, name: str, loads: list[ServerLoad], now: float) -> None:
        if self.planner is not None:
            self.planner.remove(key)
        running = [max(0.0, x.expected - (now - x.granted)) for x in self.leases.values() if x.server == name]
        placed = record_grant(self.stats[name], now, job.req, max(running, default=0.0))
        row = next(s for s in loads if s.name == name)
        expected = planned_seconds(row, job.req, loads, True, placed.cached)
        self.leases[key] = _Lease(name, now, expected, placed, job)
        self._push(now + self.hop, lambda t: self.boxes[name].arrive(_Call(key, job, t), t))

    def _answered(self, call: _Call, prefill: float, gen: float, now: float) -> None:
        self._push(now + self.hop, lambda t: self._release(call, prefill, gen, t))

    def _release(self, call: _Call, prefill: float, gen: float, now: float) -> None:
        lease = self.leases.pop(call.lease)
        assert call.taken is not None
        outcome = LeaseOutcome(
            lease_id=str(call.lease),
            outcome="ok",
            model=call.job.req.model,
            latency=now - lease.granted,
            ttft=prefill + 2 * self.hop,
            tokens=call.job.tokens,
            eval_seconds=gen,
            prompt_tokens=len(call.job.prompt),
            cached_tokens=call.taken.cached,
            prompt_eval_seconds=prefill,
            load_seconds=call.load_wait or None,
        )
        record_outcome(self.stats[lease.server], outcome, lease.placed.cold, now, 1.0, lease.placed)
        if call.lease in self.probing:
            self.probing.discard(call.lease)
            self._dispatch(now)
            return
        self.end = max(self.end, now)
        self.left -= 1
        if call.load_wait:  # the balancer asks the server what it holds after a load
            self._push(now + self.hop, lambda t: self._probe(lease.server, t))
        self._dispatch(now)


# ---- the workloads of benchmarks.prefix ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    workload: str
    label: str
    work: Workload
    shapes: list[Shape]


def cases() -> Iterator[Case]:
    """Every (workload, fleet) of `benchmarks.prefix`."""
    for label, shapes in PREFIX_FLEETS.items():
        yield Case("shared prefix", label, prefix_workload(label), shapes)
    for label, (shapes, models) in MODEL_FLEETS.items():
        yield Case(f"multi-model ({models})", label, multi_model_workload(models), shapes)


def replay(
    case: Case,
    policy: str = "peak_ewma",
    planner: bool = False,
    trace: bool = False,
    stagger: float = STAGGER_SECONDS,
    live: bool = False,
    memory: bool = False,
    measure: bool = True,
) -> Result:
    """`memory`: replay the run once first and start from what it taught (the fleet memory it would save)."""
    learned = learn(case, policy, planner, live, stagger) if memory else None
    return Replay(
        case.work, case.shapes, policy, planner=planner, live=live, stagger=stagger, memory=learned, measure=measure
    ).run(jobs(case.work, tasks(case.work)), trace)


def learn(case: Case, policy: str, planner: bool, live: bool, stagger: float) -> FleetMemory:
    """The fleet memory a team saves after one run of `case` from cold servers (`teamorch.policies.fleet.remember`)."""
    first = Replay(case.work, case.shapes, policy, planner=planner, live=live, stagger=stagger)
    first.run(jobs(case.work, tasks(case.work)))
    return remember(first.stats.values(), None, MEMORY_NOW)


def bound_of(case: Case) -> float:
    plan = tasks(case.work)
    return (prefix_bound if case.work.prefill_tps else model_bound)(case.work, case.shapes, plan).seconds


def floor_of(case: Case) -> float | None:
    """The shared-prefix workload's cache floor (`benchmarks.prefix.cache_floor`); None for the multi-model one."""
    return cache_floor(case.work, case.shapes, tasks(case.work)).seconds if case.work.prefill_tps else None


def timeline(result: Result) -> str:
    """Each slot's requests in order: start time, `*` for a cold prefill, the specialist's first and last letters."""
    lines = []
    for key in sorted({(s.server, s.slot) for s in result.spans}):
        spans = sorted((s for s in result.spans if (s.server, s.slot) == key), key=lambda s: s.start)
        lines.append(
            f"{key[0]}/{key[1]}: "
            + " ".join(f"{s.start:5.2f}{'*' if s.cold else ' '}{s.specialist[:3]}{s.specialist[-1]}" for s in spans)
        )
    cold = result.cold_prefills()
    lines.append(f"cold prefills per specialist: {dict(cold)} (total {sum(cold.values())})")
    return "\n".join(lines)


def orders(case: Case, most: int = ORDERS_MOST) -> list[Case]:
    """`case` with its servers listed in other orders: every order, or `most` of them spread evenly over all.

    Why: a cold start assigns each slot's first prompt before any server has
    answered, in the order the servers are listed, so one listed order is one
    draw of a blind choice. A rule for the blind start is judged over the
    orders, not on the one the fleet happens to be written in.
    """
    every = [list(p) for p in itertools.permutations(case.shapes)]
    step = max(1, len(every) // most)
    return [Case(case.workload, case.label, case.work, shapes) for shapes in every[::step]]


def order_rows(
    case: Case, policy: str, planner: bool, live: bool, stagger: float, memory: bool = False, measure: bool = True
) -> list[object]:
    """Replays of `case` over its server orders (`orders`), from cold or (`memory`) from the fleet memory each
    order's first run saves: x bound mean and max, hit mean and min, and how many orders meet both issue 10
    targets (x bound <= TARGET_X, hit rate >= TARGET_HIT)."""
    bound = bound_of(case)
    runs = [replay(c, policy, planner, False, stagger, live, memory, measure) for c in orders(case)]
    xs = [r.makespan / bound for r in runs]
    hits = [r.hit_rate for r in runs]
    met = sum(1 for x, h in zip(xs, hits, strict=True) if x <= TARGET_X and h >= TARGET_HIT)
    return [case.label, policy, len(runs), sum(xs) / len(xs), max(xs), sum(hits) / len(hits), min(hits), met]


def main(argv: Sequence[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help="policies to replay (default: peak_ewma)")
    parser.add_argument("--planner", action="store_true", help="plan with the incremental Planner")
    parser.add_argument(
        "--live", action="store_true", help="plan as the balancer actor does (Planner, live tolerances)"
    )
    parser.add_argument("--trace", action="store_true", help="print each slot's timeline")
    parser.add_argument(
        "--memory", action="store_true", help="start from the fleet memory a first run saves (a long-lived team)"
    )
    parser.add_argument(
        "--blind",
        action="store_true",
        help="no speed probe per server before the first plan (the balancer's measure_first: false)",
    )
    parser.add_argument("--only", help="workload prefix ('shared', 'multi') or fleet label to replay")
    parser.add_argument(
        "--stagger",
        type=float,
        default=STAGGER_SECONDS,
        help="seconds between specialists' first acquires (0: one wave)",
    )
    parser.add_argument(
        "--orders",
        action="store_true",
        help="shared-prefix fleets over their servers' listed orders (with --memory too)",
    )
    args = parser.parse_args(argv)
    rows: list[list[object]] = []
    if args.orders:
        for case in cases():
            if case.workload.startswith("shared") and (not args.only or args.only in (case.label, "shared")):
                rows += [
                    order_rows(case, p, args.planner, args.live, args.stagger, args.memory, not args.blind)
                    for p in args.policy or ["peak_ewma"]
                ]
        start = "from fleet memory" if args.memory else "from cold"
        print(f"REPLAY (a development tool, not a measurement: see the module docstring), {start}, per server order")
        head = ["fleet", "policy", "orders", "x bound mean", "x bound max", "hit mean", "hit min", "both targets met"]
        print(table(head, rows))
        return rows
    for case in cases():
        if args.only and not (case.workload.startswith(args.only) or case.label == args.only):
            continue
        bound, floor = bound_of(case), floor_of(case)
        for policy in args.policy or ["peak_ewma"]:
            result = replay(
                case, policy, args.planner, args.trace, args.stagger, args.live, args.memory, not args.blind
            )
            rows.append(
                [
                    case.workload,
                    case.label,
                    policy,
                    result.makespan,
                    result.makespan / bound,
                    f"{result.makespan / floor:.2f}" if floor else "-",
                    result.hit_rate,
                    result.loads,
                ]
            )
            if args.trace:
                print(f"--- {case.workload} / fleet {case.label} / {policy}\n{timeline(result)}")
    print("REPLAY (a development tool, not a measurement: see the module docstring)")
    print(table(["workload", "fleet", "policy", "makespan s", "x bound", "x cache floor", "hit rate", "loads"], rows))
    return rows


if __name__ == "__main__":
    main()
