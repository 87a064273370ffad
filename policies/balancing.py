"""Which server gets the next request: pure functions over a load snapshot.

The balancer actor owns the live table and calls `plan_dispatch()` with its
whole queue; everything here is plain Python so each rule can be tested in
microseconds with hand-built snapshots. `choose()` is the one-request rule:
it answers with a server name, or `None` meaning "wait". Admission control
lives here too, because a loaded Ollama model queues excess requests without
bound and its 503 arrives too late to help.

`plan_dispatch()` applies `choose()` request by request for round_robin,
least_loaded and capability. For peak_ewma it schedules the whole queue with
one cost model (`planned_seconds`: EWMA time to first token + EWMA seconds
per token x expected tokens, error and model-load penalties), because a
one-request-at-a-time rule cannot tell which waiting request should take a
slow free server and which should wait for a fast busy one;
`choose("peak_ewma", ...)` is that scheduler over a queue of one.
`benchmarks/routing.py` measures the difference against a computed lower bound.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseRequest, ServerLoad

POLICIES = ("round_robin", "least_loaded", "capability", "peak_ewma")

# Priors used before any server has been measured.
PRIOR_TOKEN_SECONDS = 0.02
PRIOR_TTFT = 0.2
DEFAULT_EXPECTED_TOKENS = 256
# A model that is present but not loaded costs a load before the first token.
LOAD_PENALTY_SECONDS = 5.0
# A request running past its estimate is expected to end this soon (it must not look like a free slot).
OVERDUE_SECONDS = 0.05


def eligible(loads: Sequence[ServerLoad], req: LeaseRequest) -> list[ServerLoad]:
    """Servers that could ever serve `req`; raises `NoServerAvailable` with the reason when none can."""
    if req.server is not None:
        pinned = [s for s in loads if s.name == req.server]
        if not pinned:
            raise NoServerAvailable(f"pinned server {req.server!r} is not in the team")
        loads = pinned
    reasons: list[str] = []
    out = []
    for s in loads:
        if s.name in req.exclude:
            reasons.append(f"{s.name}: already failed this task")
        elif not s.healthy:
            reasons.append(f"{s.name}: unhealthy ({s.last_error or 'failed its health check'})")
        elif s.circuit == "open":
            reasons.append(f"{s.name}: circuit open ({s.last_error or 'repeated failures'})")
        elif s.models_present is not None and req.model not in s.models_present:
            reasons.append(f"{s.name}: has no model {req.model!r}")
        elif not set(req.requires) <= set(s.tags):
            reasons.append(f"{s.name}: lacks tags {sorted(set(req.requires) - set(s.tags))}")
        else:
            out.append(s)
    if not out:
        raise NoServerAvailable(f"no server can run model {req.model!r}: " + "; ".join(reasons or ["no servers"]))
    return out


def has_capacity(s: ServerLoad) -> bool:
    """A half-open circuit admits exactly one probe request."""
    limit = 1 if s.circuit == "half_open" else s.effective_slots
    return s.healthy and s.in_flight < limit


def _prefer(cands: list[ServerLoad], keep: list[ServerLoad]) -> list[ServerLoad]:
    return keep if keep else cands


def honour_avoid(cands: list[ServerLoad], req: LeaseRequest) -> list[ServerLoad]:
    """Prefer servers not in `req.avoid` (diversity), but never wait because of it.

    Avoided servers drop out only while a non-avoided one can start the
    request now, or while nobody can; an avoided server that is the only free
    one is used rather than leaving the request queued.
    """
    if not req.avoid:
        return cands
    others = [s for s in cands if s.name not in req.avoid]
    if any(has_capacity(s) for s in others) or not any(has_capacity(s) for s in cands):
        return _prefer(cands, others)
    return cands


def choose(
    policy: str,
    loads: Sequence[ServerLoad],
    req: LeaseRequest,
    *,
    counter: int = 0,
    rng: random.Random | None = None,
    affinity: bool = True,
    capabilities: Sequence[str] = (),
    waited: float = 0.0,
) -> str | None:
    """Pick a server for `req`, or None to wait for capacity.

    `counter` drives round robin, `capabilities` are the specialist's (for the
    capability policy), `waited` is how long this request already queued: a
    request never waits for a better server longer than that server would take.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown balancing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    rng = rng or random.Random(counter)
    if policy == "peak_ewma":
        # One request is a queue of one: the same scheduler the balancer runs over its whole queue.
        found = plan_dispatch(policy, loads, [Queued(req, waited, tuple(capabilities))], rng=rng, affinity=affinity)
        decision = found.get(0)
        if isinstance(decision, NoServerAvailable):
            raise decision
        return decision
    cands = honour_avoid(eligible(loads, req), req)
    free = [s for s in cands if has_capacity(s)]
    if affinity:
        loaded = [s for s in free if s.models_loaded is not None and req.model in s.models_loaded]
        free = _prefer(free, loaded)

    if not free:
        return None
    if policy == "round_robin":
        ring = sorted(cands, key=lambda s: s.name)
        for step in range(len(ring)):
            pick = ring[(counter + step) % len(ring)]
            if pick in free:
                return pick.name
        return None
    if policy == "capability":
        wanted = set(capabilities)
        return min(
            free, key=lambda s: (-len(wanted & set(s.tags)), s.in_flight / max(1, s.effective_slots), s.name)
        ).name
    return min(free, key=lambda s: (s.in_flight / max(1, s.effective_slots), s.in_flight, s.name)).name


# ---- the whole queue at once ---------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    """A request waiting at the balancer, as a planner sees it (no futures, no clocks)."""

    req: LeaseRequest
    waited: float = 0.0
    capabilities: tuple[str, ...] = ()


Decision = str | NoServerAvailable
Candidates = Callable[[LeaseRequest], "list[ServerLoad] | NoServerAvailable"]


def plan_dispatch(
    policy: str,
    loads: Sequence[ServerLoad],
    queue: Sequence[Queued],
    *,
    running: Mapping[str, Sequence[float]] | None = None,
    counter: Iterator[int] | None = None,
    rng: random.Random | None = None,
    affinity: bool = True,
) -> dict[int, Decision]:
    """Decide, for every queued request, "start now on server X", "fail" or (absent from the answer) "wait".

    `queue` is in the balancer's order (priority, then arrival); `running` gives,
    per server, the expected remaining seconds of each request in flight there.
    Returns {index in queue: server name or NoServerAvailable}.

    For `round_robin`, `least_loaded` and `capability` this is `choose()` applied
    to each request in turn over a load table updated after every grant. For
    `peak_ewma` it is list scheduling over the whole queue, because deciding
    one request at a time cannot see that the request behind it is the one
    that should take the slow server (see `_plan_peak_ewma`).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown balancing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    rng = rng or random.Random(0)
    decisions: dict[int, Decision] = {}
    cache: dict[tuple[object, ...], list[ServerLoad] | NoServerAvailable] = {}

    def candidates(req: LeaseRequest) -> list[ServerLoad] | NoServerAvailable:
        key = (req.model, tuple(req.requires), tuple(req.exclude), req.server, tuple(req.avoid))
        if key not in cache:
            try:
                cache[key] = honour_avoid(eligible(loads, req), req)
            except NoServerAvailable as exc:
                cache[key] = exc
        return cache[key]

    # Ineligible requests fail now even when every slot is busy, so nobody waits for a server that cannot come.
    live: list[int] = []
    for index, queued in enumerate(queue):
        cands = candidates(queued.req)
        if isinstance(cands, NoServerAvailable):
            decisions[index] = cands
        else:
            live.append(index)
    if not live or not any(has_capacity(s) for s in loads):
        return decisions

    if policy == "peak_ewma":
        plan = _plan_peak_ewma(loads, queue, live, candidates, running or {}, affinity, rng)
        decisions.update(plan)
        return decisions

    table = {s.name: s for s in loads}
    for index in live:
        current = list(table.values())
        if not any(has_capacity(s) for s in current):
            break
        queued = queue[index]
        name = choose(
            policy,
            current,
            queued.req,
            counter=next(counter) if counter is not None else 0,
            rng=rng,
            affinity=affinity,
            capabilities=queued.capabilities,
            waited=queued.waited,
        )
        if name is not None:
            decisions[index] = name
            table[name] = table[name].model_copy(update={"in_flight": table[name].in_flight + 1})
    return decisions


@dataclass
class _Speed:
    """One server's cost model for this planning round: seconds = (fixed + tokens x per_token) x penalty."""

    fixed: float
    per_token: float
    penalty: float
    measured: bool


def _speeds(loads: Sequence[ServerLoad]) -> dict[str, _Speed]:
    """Each server's cost model; a server not yet measured is assumed as slow as the slowest measured one.

    The planner is pessimistic about the unknown: it already limits an unmeasured
    server to one request at a time, and assuming it is fast would hand it the
    longest job in the queue. Before anything is measured all servers share
    the priors.
    """
    known_tps = [s.ewma_token_seconds for s in loads if s.ewma_token_seconds is not None]
    known_ttft = [s.ewma_ttft for s in loads if s.ewma_ttft is not None]
    worst_tps = max(known_tps) if known_tps else PRIOR_TOKEN_SECONDS
    worst_ttft = max(known_ttft) if known_ttft else PRIOR_TTFT
    return {
        s.name: _Speed(
            fixed=s.ewma_ttft if s.ewma_ttft is not None else worst_ttft,
            per_token=s.ewma_token_seconds if s.ewma_token_seconds is not None else worst_tps,
            penalty=1.0 + 4.0 * s.error_rate,
            measured=s.ewma_token_seconds is not None,
        )
        for s in loads
    }


def planned_seconds(s: ServerLoad, req: LeaseRequest, fleet: Sequence[ServerLoad], affinity: bool = True) -> float:
    """What `plan_dispatch` (peak_ewma) expects `req` to take on `s`, model load included.

    The balancer records it per lease, so later plans know when a busy slot frees up.
    """
    table = list(fleet) if any(f.name == s.name for f in fleet) else [*fleet, s]
    sp = _speeds(table)[s.name]
    seconds = (sp.fixed + sp.per_token * (req.expected_tokens or DEFAULT_EXPECTED_TOKENS)) * sp.penalty
    if affinity and s.models_loaded is not None and req.model not in s.models_loaded:
        seconds += LOAD_PENALTY_SECONDS
    return seconds


def _plan_peak_ewma(
    loads: Sequence[ServerLoad],
    queue: Sequence[Queued],
    live: list[int],
    candidates: Candidates,
    running: Mapping[str, Sequence[float]],
    affinity: bool,
    rng: random.Random,
) -> dict[int, Decision]:
    """Earliest-finish-time list scheduling of the whole queue on a virtual timeline.

    The cost model is peak_ewma's (EWMA time to first token + EWMA seconds per
    token x expected tokens, x (1 + 4 x recent error rate), + a model load where
    the model is not loaded). On top of it:

    * Order: within one priority (the plan's critical-path depth), longest
      expected job first, with seconds already waited added to a job's size.
      In a batch this is LPT, the classic makespan rule (a long job started
      last is what makes a tail); with steady arrivals, aging stops short jobs
      from starving behind a stream of long ones.
    * Each request, in that order, reserves the server slot where it would
      *finish* earliest, counting the expected remaining time of requests
      already running there and of requests reserved ahead of it. It is
      started now only if that slot is free now; otherwise it waits, and the
      slot it would have taken on a slow idle server stays open for a request
      further back that finishes sooner there. This is how a fast busy server
      beats a slow idle one, and how the slow one still gets the short jobs.
    * A server never measured (no EWMA yet) gets one request at a time until
      its first answer, and is assumed as slow as the slowest measured
      server (see `_speeds`). When nothing at all is measured (a cold start),
      each server is first sent the shortest waiting request: the cheapest
      way to learn every server's speed, where guessing would hand an
      unknown slow box a long job and leave the fast boxes' other slots idle
      until their first long answer.
    * The whole fleet is scanned rather than two sampled (power of two
      choices): P2C protects many balancers with stale views from herding;
      here one balancer owns an exact table and scanning is O(queue x servers).

    Plans are redone at every acquire, release and tick, so estimation errors
    cost at most until the next event.
    """
    speeds = _speeds(loads)

    def tokens(req: LeaseRequest) -> int:
        return req.expected_tokens or DEFAULT_EXPECTED_TOKENS

    # Virtual slots: a heap of times (seconds from now) at which each usable slot frees up.
    slots: dict[str, list[float]] = {}
    for s in loads:
        limit = 0
        if s.healthy:
            limit = 1 if s.circuit == "half_open" else max(1, s.effective_slots)
        if not speeds[s.name].measured:
            limit = min(limit, 1)  # one probe at a time until measured
        # An overdue request still holds its slot: it frees "very soon", never "now".
        ends = sorted(max(OVERDUE_SECONDS, r) for r in running.get(s.name, ()))
        if len(ends) < s.in_flight:  # in flight but no estimate given: assume one more average job
            guess = speeds[s.name].fixed + speeds[s.name].per_token * DEFAULT_EXPECTED_TOKENS
            ends += [guess] * (s.in_flight - len(ends))
        busy = ends[max(0, len(ends) - limit) :] if limit else []
        heap = busy + [0.0] * max(0, limit - len(busy))
        heap = heap[:limit] if limit else []
        heapq.heapify(heap)
        slots[s.name] = heap

    def load_wait(s: ServerLoad, model: str) -> float:
        # Until the balancer sees the model loaded, every slot of that server waits for the load.
        if not affinity or s.models_loaded is None or model in s.models_loaded:
            return 0.0
        return LOAD_PENALTY_SECONDS

    def service(s: ServerLoad, req: LeaseRequest) -> float:
        sp = speeds[s.name]
        return (sp.fixed + sp.per_token * tokens(req)) * sp.penalty

    best_fixed = min((sp.fixed for sp in speeds.values()), default=PRIOR_TTFT)
    best_tok = min((sp.per_token for sp in speeds.values()), default=PRIOR_TOKEN_SECONDS)

    def size(index: int) -> float:
        queued = queue[index]
        return best_fixed + best_tok * tokens(queued.req) + queued.waited

    order = sorted(live, key=lambda i: (-queue[i].req.priority, -size(i), i))
    decisions: dict[int, Decision] = {}

    def free_now() -> bool:
        return any(heap and heap[0] <= 0.0 for heap in slots.values())

    cold_start = not any(sp.measured for sp in speeds.values())
    for index in [] if cold_start else order:
        if not free_now():
            break
        req = queue[index].req
        cands = candidates(req)
        if isinstance(cands, NoServerAvailable):
            continue
        best: tuple[float, float, float, str] | None = None
        for s in cands:
            heap = slots.get(s.name)
            if not heap:
                continue
            start = max(heap[0], load_wait(s, req.model))
            finish = start + service(s, req)
            key = (finish, start, rng.random(), s.name)
            if best is None or key < best:
                best = key
        if best is None:
            continue
        finish, start, _, name = best
        slot_free = heapq.heappop(slots[name])
        heapq.heappush(slots[name], finish)
        if slot_free <= 0.0:
            decisions[index] = name

    # Cold-start probes: each free server takes the shortest request still waiting that it can serve.
    for name, heap in slots.items() if cold_start else ():
        if not heap or heap[0] > 0.0:
            continue
        waiting = [i for i in live if i not in decisions]
        fits = []
        for i in waiting:
            cands = candidates(queue[i].req)
            if isinstance(cands, list) and any(s.name == name for s in cands):
                fits.append(i)
        if fits:
            pick = min(fits, key=lambda i: (-queue[i].req.priority, tokens(queue[i].req), i))
            decisions[pick] = name
            heapq.heapreplace(heap, float("inf"))
    return decisions
