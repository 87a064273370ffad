"""Which server gets the next request: pure functions over a load snapshot.

The balancer actor owns the live table and calls `plan_dispatch()` with its
whole queue; everything here is plain Python so each rule can be tested in
microseconds with hand-built snapshots. Admission control lives here too,
because a loaded Ollama model queues excess requests without bound and its 503
arrives too late to help.

As in Ray Serve's request routers, each policy has one entry point over plain
data. `choose()` is the one-request rule of round_robin, least_loaded and
capability: a server name, or `None` meaning "wait"; `plan_dispatch()` applies
it request by request. peak_ewma schedules the whole queue at once
(`_plan_peak_ewma`) with one cost model (`planned_seconds`: EWMA time to first
token + EWMA seconds per token x expected tokens + measured prefill seconds x
the prompt tokens not already in the chosen slot's prefix cache, error and
model-load penalties), because a one-request-at-a-time rule cannot tell which waiting
request should take a slow free server and which should wait for a fast busy
one; `choose("peak_ewma", ...)` is that scheduler over a queue of one.
`benchmarks/routing.py` measures the difference against a computed lower bound.

Two smaller decisions of the balancer's dispatch live here as well:
`coalesce_delay` (how long an arrival waits for the rest of its wave) and
`apply_group_diversity` (one server per diversity group per round).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from teamorch.errors import NoServerAvailable
from teamorch.messages import POLICIES, LeaseRequest, ServerLoad
from teamorch.policies.placement import Assignment, GroupWork, Host, Rate, place, sticky
from teamorch.policies.prefix import CachedSlot, SlotState, matched_tokens, server_preference
from teamorch.policies.priority import TOP_RANK, Aging, rank

_T = TypeVar("_T")

# Priors used before any server has been measured.
PRIOR_TOKEN_SECONDS = 0.02
PRIOR_TTFT = 0.2
# Seconds per uncached prompt token before any server reported its prompt evaluation (10x faster than generating).
PRIOR_PREFILL_SECONDS = 0.002
DEFAULT_EXPECTED_TOKENS = 256
# A model that is present but not loaded costs a load before the first token.
LOAD_PENALTY_SECONDS = 5.0
# A request running past its estimate is expected to end this soon (it must not look like a free slot).
OVERDUE_SECONDS = 0.05
# A busy slot expected to end within this many seconds (an overdue one included) may already be free at its server
# when a request granted now arrives there: the server frees a slot a release hop (4-20 ms) before the balancer hears.
LANDING_SECONDS = 0.02
# peak_ewma plans the whole queue; a wave of a plan reaches the balancer as requests a millisecond or
# two apart, so an arrival that finds a free slot waits a moment for the rest of its wave instead of
# taking the slot just because it came first. The wait is capped at a small fraction of the request's
# expected service time, so it never matters for the request itself.
COALESCE_SECONDS = 0.005
# Before anything is measured the first plan decides every slot's first request (and model, and prefix), so it waits
# longer for the whole wave to arrive: once per balancer, not per request.
COLD_COALESCE_SECONDS = 0.05
COALESCE_FRACTION = 0.01
# ...and it waits until the wave has arrived: until no acquire came for COLD_QUIET_SECONDS (a wave's acquires come a
# few ms apart, up to ~7 ms measured on a shared 2-core host), at most COLD_WAVE_SECONDS after the first. The first
# plan that saw only the wave's first few requests gave the fast slots to small prefix groups and left the big ones
# for the slow slots, for the whole run (prefix fleet B: 1.58-1.82x the bound, 1.33x with the whole wave).
COLD_QUIET_SECONDS = 0.02
COLD_WAVE_SECONDS = 0.25
# On an idle measured fleet a wave is planned once no arrival came for this many coalescing delays (`wave_deadline`).
WAVE_QUIET_DELAYS = 10
# A running request expected to end within this many seconds may have its slot's next request granted already
# (`early_slot`). It must cover the hops it hides (8-10 ms, tens on a busy host) plus the error of the end's estimate
# (a request that ends before its successor is granted leaves the slot idle for those hops), and stay small against
# a request, since the plan treats the slot as free now. Measured on the routing benchmark's two fleets on a shared
# 2-core host: 0.05 s left a median gap of 5-13 ms, 0.1 s 4-7.5 ms, 0.2 s no better than 0.1 s.
EARLY_GRANT_SECONDS = 0.1
# ...unless it has run this fraction of its estimate past it: then it may be stalled, and nothing queues behind it.
EARLY_GRANT_OVERDUE = 0.5


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


def has_capacity(s: ServerLoad, taken: int = 0) -> bool:
    """Whether `s` has a free slot once `taken` more are granted. A half-open circuit admits exactly one probe."""
    limit = 1 if s.circuit == "half_open" else s.effective_slots
    return s.healthy and s.in_flight + taken < limit


def due_soon(remaining: float, expected: float, horizon: float = EARLY_GRANT_SECONDS) -> bool:
    """Whether a running request may have the next request on its slot granted already.

    `remaining` is its expected seconds left (negative once overdue). Due: it
    ends within `horizon`, or ran past its estimate by less than
    EARLY_GRANT_OVERDUE of it (estimates err both ways; one that overran by
    more may be stalled, and a request queued behind it would be stuck).
    """
    return -max(horizon, EARLY_GRANT_OVERDUE * expected) <= remaining <= horizon


def due_in(remaining: float, horizon: float = EARLY_GRANT_SECONDS) -> float:
    """Seconds until a running request with `remaining` expected seconds left becomes due (`due_soon`)."""
    return remaining - horizon


def early_slot(s: ServerLoad, due: bool, queued_behind: int) -> bool:
    """Whether `s` may be granted one request beyond its free slots now, to wait at its server actor's gate.

    Why: between one request's end and the next one's start the slot would
    otherwise sit idle for the release -> grant -> specialist -> server actor
    -> HTTP hops (8-10 ms median, tens of ms on a busy host). Granted while a
    running request is `due` (`due_soon`), the next one is already waiting
    inside the server actor, which never has more than `slots` requests at the
    box (its gate), and goes out the moment a stream ends. At most one waits
    per server (`queued_behind` is how many already do), so a server holds at
    most `effective_slots` + 1 leases; none on a server that is not fully
    trusted (circuit not closed, never measured: its estimates mean nothing).
    """
    return (
        due
        and queued_behind == 0
        and s.healthy
        and s.circuit == "closed"
        and s.ewma_token_seconds is not None
        and s.in_flight <= s.effective_slots
    )


def early_lands(slots: Sequence[CachedSlot], slot: int, prefill_seconds: float | None) -> bool:
    """Whether a request granted early for `slot` (`early_slot`) finds there the prompt the planner costed it with.

    It waits at the server actor's gate and goes out when the server's first
    stream ends, whichever slot that is, or at once if a slot is free (the
    planner may leave one idle for its own group: `teamorch.policies.placement`);
    the server then gives it that slot. When another slot holds a different
    prefix (model or first block; or nothing) worth more than the hops an
    early grant hides (EARLY_GRANT_SECONDS of prefill), landing there would
    cost it a cold prefill and overwrite that slot's cache: no early grant then.
    """
    mine = slots[slot]
    seconds = prefill_seconds if prefill_seconds is not None else PRIOR_PREFILL_SECONDS
    for i, other in enumerate(slots):
        if i == slot or (other.model, other.chain[:1]) == (mine.model, mine.chain[:1]):
            continue
        if max((*mine.tokens[:1], *other.tokens[:1]), default=0) * seconds > EARLY_GRANT_SECONDS:
            return False
    return True


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


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown balancing policy {policy!r}; choose one of {', '.join(POLICIES)}")


def choose(
    policy: str,
    loads: Sequence[ServerLoad],
    req: LeaseRequest,
    *,
    counter: int = 0,
    rng: random.Random | None = None,
    affinity: bool = True,
    capabilities: Sequence[str] = (),
) -> str | None:
    """Pick a server for `req`, or None to wait for capacity.

    `counter` drives round robin, `capabilities` are the specialist's (for the
    capability policy), `rng` breaks peak_ewma's exact ties (seeded from
    `counter` when not given, so a call is reproducible).
    """
    _check_policy(policy)
    if policy == "peak_ewma":
        # One request is a queue of one: the same scheduler the balancer runs over its whole queue.
        queue = [Queued(req, 0.0, tuple(capabilities))]
        decision = plan_dispatch(policy, loads, queue, rng=rng or random.Random(counter), affinity=affinity).get(0)
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
        return _round_robin(cands, free, counter)
    if policy == "capability":
        wanted = set(capabilities)
        return min(
            free, key=lambda s: (-len(wanted & set(s.tags)), s.in_flight / max(1, s.effective_slots), s.name)
        ).name
    return min(free, key=lambda s: (s.in_flight / max(1, s.effective_slots), s.in_flight, s.name)).name


def _round_robin(cands: list[ServerLoad], free: list[ServerLoad], counter: int) -> str | None:
    """The first free server at or after position `counter` of the ring of candidates, in name order."""
    ring = sorted(cands, key=lambda s: s.name)
    for step in range(len(ring)):
        pick = ring[(counter + step) % len(ring)]
        if pick in free:
            return pick.name
    return None


# ---- the whole queue at once ---------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    """A request waiting at the balancer, as a planner sees it (no futures, no clocks).

    `waited`: seconds it has queued so far; peak_ewma counts them toward the
    job's size (aging), so a short job cannot starve behind long ones.
    `rank`: its priority class's rank as the balancer sees it now
    (`teamorch.policies.priority`; None: its class's own rank), above `priority`.
    """

    req: LeaseRequest
    waited: float = 0.0
    capabilities: tuple[str, ...] = ()
    rank: int | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Its place before any policy's own order: (minus) class rank, then (minus) critical-path priority."""
        return (-(rank(self.req.priority_class) if self.rank is None else self.rank), -self.req.priority)


Decision = str | NoServerAvailable


def plan_dispatch(
    policy: str,
    loads: Sequence[ServerLoad],
    queue: Sequence[Queued],
    *,
    running: Mapping[str, Sequence[float]] | None = None,
    caches: Mapping[str, Sequence[SlotState]] | None = None,
    counter: Iterator[int] | None = None,
    rng: random.Random | None = None,
    affinity: bool = True,
) -> dict[int, Decision]:
    """Decide, for every queued request, "start now on server X", "fail" or (absent from the answer) "wait".

    `queue` is in the balancer's order (class rank, priority, then arrival); `running` gives,
    per server, the expected remaining seconds of each request in flight there;
    `caches` gives, per server, each slot with what its prefix cache holds and
    (when busy) its remaining seconds, and then replaces `running` for it.
    Returns {index in queue: server name or NoServerAvailable}.

    For `round_robin`, `least_loaded` and `capability` this is `choose()` applied
    to each request in turn over a load table updated after every grant. For
    `peak_ewma` it is list scheduling over the whole queue, because deciding
    one request at a time cannot see that the request behind it is the one
    that should take the slow server (see `_plan_peak_ewma`).
    """
    _check_policy(policy)
    rng = rng or random.Random(0)
    decisions: dict[int, Decision] = {}
    # Ineligible requests fail now even when every slot is busy, so nobody waits for a server that cannot come.
    live: dict[int, list[ServerLoad]] = {}
    cache: dict[tuple[object, ...], list[ServerLoad] | NoServerAvailable] = {}
    for index, queued in enumerate(queue):
        req = queued.req
        key = (req.model, tuple(req.requires), tuple(req.exclude), req.server, tuple(req.avoid))
        if key not in cache:
            try:
                cache[key] = honour_avoid(eligible(loads, req), req)
            except NoServerAvailable as exc:
                cache[key] = exc
        cands = cache[key]
        if isinstance(cands, NoServerAvailable):
            decisions[index] = cands
        else:
            live[index] = cands
    if not live or not any(has_capacity(s) for s in loads):
        return decisions
    if policy == "peak_ewma":
        decisions.update(_plan_peak_ewma(loads, queue, live, running or {}, caches or {}, affinity, rng))
    else:
        order = sorted(live, key=lambda i: queue[i].order)  # the balancer's order already; stable for it
        decisions.update(_plan_one_at_a_time(policy, loads, queue, order, counter, rng, affinity))
    return decisions


def _plan_one_at_a_time(
    policy: str,
    loads: Sequence[ServerLoad],
    queue: Sequence[Queued],
    live: list[int],
    counter: Iterator[int] | None,
    rng: random.Random,
    affinity: bool,
) -> dict[int, Decision]:
    """`choose()` for each request in queue order, each grant taking its slot before the next choice."""
    decisions: dict[int, Decision] = {}
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
        )
        if name is not None:
            decisions[index] = name
            table[name] = table[name].model_copy(update={"in_flight": table[name].in_flight + 1})
    return decisions


# ---- peak_ewma ------------------------------------------------------------------------------


@dataclass
class _Speed:
    """One server's cost model for this planning round.

    seconds = (fixed + per_token x output tokens + prefill x uncached prompt tokens) x penalty;
    `load` is what loading a model there costs before that.
    """

    fixed: float
    per_token: float
    prefill: float
    load: float
    penalty: float
    measured: bool

    def seconds(self, tokens: int, uncached: int = 0) -> float:
        return (self.fixed + self.per_token * tokens + self.prefill * uncached) * self.penalty


def _worst(values: Iterable[float | None], prior: float) -> float:
    known = [v for v in values if v is not None]
    return max(known) if known else prior


def _speeds(loads: Sequence[ServerLoad]) -> dict[str, _Speed]:
    """Each server's cost model; a server not yet measured is assumed as slow as the slowest measured one.

    The planner is pessimistic about the unknown: it already limits an unmeasured
    server to one request at a time, and assuming it is fast would hand it the
    longest job in the queue. Before anything is measured all servers share
    the priors. The same holds for prefill seconds per token and load time.
    """
    worst_tps = _worst((s.ewma_token_seconds for s in loads), PRIOR_TOKEN_SECONDS)
    worst_ttft = _worst((s.ewma_ttft for s in loads), PRIOR_TTFT)
    worst_prefill = _worst((s.ewma_prefill_seconds for s in loads), PRIOR_PREFILL_SECONDS)
    return {
        s.name: _Speed(
            fixed=s.ewma_ttft if s.ewma_ttft is not None else worst_ttft,
            per_token=s.ewma_token_seconds if s.ewma_token_seconds is not None else worst_tps,
            prefill=s.ewma_prefill_seconds if s.ewma_prefill_seconds is not None else worst_prefill,
            load=s.ewma_load_seconds if s.ewma_load_seconds is not None else LOAD_PENALTY_SECONDS,
            penalty=1.0 + 4.0 * s.error_rate,
            measured=_measured(s),
        )
        for s in loads
    }


def _measured(s: ServerLoad) -> bool:
    """Whether `s` has answered a request: its cost model is its own, not the slowest measured one's (`_speeds`)."""
    return s.ewma_token_seconds is not None


def _tokens(req: LeaseRequest) -> int:
    return req.expected_tokens or DEFAULT_EXPECTED_TOKENS


def _load_wait(s: ServerLoad, model: str, affinity: bool, load_seconds: float = LOAD_PENALTY_SECONDS) -> float:
    """Seconds before `model` can run on `s`: a load if it is not resident, the rest of one being loaded."""
    if not affinity or s.models_loaded is None:
        return 0.0
    if model not in s.models_loaded:
        return load_seconds
    return s.load_remaining if s.loading_model == model else 0.0


def planned_seconds(
    s: ServerLoad, req: LeaseRequest, fleet: Sequence[ServerLoad], affinity: bool = True, cached: int = 0
) -> float:
    """What `plan_dispatch` (peak_ewma) expects `req` to take on `s`, model load included.

    `cached`: prompt tokens the server is expected to find in the slot's cache.
    The balancer records it per lease, so later plans know when a busy slot frees up.
    """
    known = None not in (s.ewma_ttft, s.ewma_token_seconds, s.ewma_prefill_seconds)
    table = [s] if known else list(fleet) if any(f.name == s.name for f in fleet) else [*fleet, s]
    speed = _speeds(table)[s.name]  # a server's own estimates need no fleet's worst (`_speeds`)
    uncached = max(0, req.prompt_tokens - cached)
    return speed.seconds(_tokens(req), uncached) + _load_wait(s, req.model, affinity, speed.load)


def _plan_peak_ewma(
    loads: Sequence[ServerLoad],
    queue: Sequence[Queued],
    live: Mapping[int, list[ServerLoad]],
    running: Mapping[str, Sequence[float]],
    caches: Mapping[str, Sequence[SlotState]],
    affinity: bool,
    rng: random.Random,
) -> dict[int, Decision]:
    """Earliest-finish-time list scheduling of the whole queue on a virtual timeline.

    `live` maps each servable request's index in `queue` to its candidates. The
    cost of a request on a server slot is peak_ewma's: EWMA time to first
    token + EWMA seconds per token x expected output tokens + measured prefill
    seconds per token x the prompt tokens that slot does not hold in its cache,
    x (1 + 4 x recent error rate), after a model load where the model is not
    resident. On top of it:

    * Order (`_longest_first`): within one class rank and priority (the plan's critical-path
      depth), longest expected job first, with seconds already waited added to
      a job's size. In a batch this is LPT, the classic makespan rule (a long
      job started last is what makes a tail); with steady arrivals, aging stops
      short jobs from starving behind a stream of long ones.
    * Each request, in that order, reserves the slot where it would *finish*
      earliest (`_earliest_finish`; a request that starts now gets the free
      slot the server itself would pick, and overwriting a cache the rest of
      the queue still needs counts as the prefill it will cost, see `_Demand`), counting the expected remaining time of
      requests already running there and of requests reserved ahead of it
      (`_virtual_slots`), and what each slot will hold in its prefix cache
      then (`teamorch.policies.prefix`). It is started now only if that slot
      is free now; otherwise it waits, and the slot it would have taken on a
      slow idle server stays open for a request further back that finishes
      sooner there. This is how a fast busy server beats a slow idle one, how
      a request waits for the slot that holds its prefix, and how a hot
      prefix still spills to a second server once waiting for its warm slots
      would cost more than a cold prefill there: both sides are seconds on
      the same timeline, so no separate balance threshold is needed.
    * Model residency: a request for a model the server does not hold pays
      the measured load time; where the server is full (`resident_limit`),
      the load also waits for the running requests of the model it evicts,
      and the rest of the plan sees the server holding the new model, so a
      later request for the evicted one pays the load back. Switching a
      server therefore only wins when the backlog it relieves is longer
      than the loads it causes, which keeps each model where it is loaded.
    * A server never measured (no EWMA yet) in a fleet where others are gets
      one request at a time until its first answer, and is assumed as slow as
      the slowest measured server (see `_speeds`); that request is the
      shortest one waiting (`_probe_shortest`), never a long job sent blind. When nothing at all is
      measured (a cold start), every free slot is first sent a short waiting
      request (`_cold_start_probes`), the prefixes spread over the slots
      (every group one first, then by expected work): the cheapest way to
      learn every server's speed, where guessing would hand an unknown slow
      box a long job; and every slot's first request pays a cold prefill anyway.
    * Prefix groups and models are placed as a whole first
      (`teamorch.policies.placement`, `_placement`): each request is then
      planned only onto the slots open to its group (`_placed`), so a fast
      server does not switch between specialists one request at a time, and
      a one-model server keeps its model while the model has queued work.
    * The whole fleet is scanned rather than two sampled (power of two
      choices): P2C protects many balancers with stale views from herding;
      here one balancer owns an exact table and scanning is O(queue x slots).

    Plans are redone at every acquire, release and tick, so estimation errors
    cost at most until the next event.
    """
    speeds = _speeds(loads)
    cold = not any(sp.measured for sp in speeds.values())
    servers = _virtual_slots(loads, speeds, running, caches, probing_one=not cold)
    if cold:
        return _cold_start_probes(queue, live, servers, speeds)
    live = _probe_shortest(queue, live, speeds)
    order = _warm_first(_longest_first(queue, live, speeds, servers), lambda i: queue[i].req, servers)
    return _earliest_finish(queue, order, live, servers, speeds, affinity, rng)


@dataclass
class _Slot:
    """A slot on the virtual timeline: when it frees (seconds from now) and the prompt its cache then holds."""

    free_at: float
    model: str | None = None
    chain: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    index: int | None = None  # the server's own slot number (None: anonymous), whose order breaks the server's ties
    landing: bool = False  # busy, but may be free at the server already (LANDING_SECONDS)

    def cached(self, req: LeaseRequest) -> int:
        return matched_tokens(req.prefix, req.prefix_tokens, self.chain) if self.model == req.model else 0


@dataclass
class _Server:
    """One server on the virtual timeline: its usable slots and which models it holds (None: not known)."""

    slots: list[_Slot]
    resident: list[str] | None = None  # least recently used first
    limit: int = 1
    loading: str | None = None
    ready_at: float = 0.0  # when `loading` is ready

    def free_times(self) -> list[float]:
        return [s.free_at for s in self.slots]

    def free_now(self) -> bool:
        return any(s.free_at <= 0.0 for s in self.slots)


def _virtual_slots(
    loads: Sequence[ServerLoad],
    speeds: Mapping[str, _Speed],
    running: Mapping[str, Sequence[float]],
    caches: Mapping[str, Sequence[SlotState]] | None = None,
    probing_one: bool = True,
) -> dict[str, _Server]:
    """Per server, its usable slots: when each frees (0: free now) and what its cache holds.

    `caches` gives a server's slots one by one (from the balancer's prefix
    index, with the expected remaining time of each busy one); a server not in
    it has anonymous slots whose busy ones end as `running` says.
    """
    servers: dict[str, _Server] = {}
    for s in loads:
        sp = speeds[s.name]
        limit = 0
        if s.healthy:
            limit = 1 if s.circuit == "half_open" else max(1, s.effective_slots)
        starts = limit
        if not sp.measured and probing_one:
            starts = min(limit, 1)  # one probe at a time until measured; its busy slots still show what they hold
        states = list((caches or {}).get(s.name, ()))
        named = bool(states)  # the index's slots, in the server's order; else anonymous ones from `running`
        if not states:
            states = [SlotState(free_in=r) for r in running.get(s.name, ())]
        # An overdue request still holds its slot: it frees "very soon", never "now".
        busy = sorted(
            (
                _Slot(
                    max(OVERDUE_SECONDS, st.free_in),
                    st.model,
                    st.chain,
                    st.tokens,
                    i if named else None,
                    st.free_in <= LANDING_SECONDS,
                )
                for i, st in enumerate(states)
                if st.free_in is not None
            ),
            key=lambda slot: slot.free_at,
        )
        if len(busy) < s.in_flight:  # in flight but no estimate given: assume one more average job
            busy += [_Slot(sp.fixed + sp.per_token * DEFAULT_EXPECTED_TOKENS)] * (s.in_flight - len(busy))
        free = [
            _Slot(0.0, st.model, st.chain, st.tokens, i if named else None)
            for i, st in enumerate(states)
            if st.free_in is None
        ]
        free += [_Slot(0.0) for _ in range(max(0, limit - len(free)))]
        # The `limit` latest-ending requests hold the usable slots; any slot left over is free now.
        kept = busy[max(0, len(busy) - limit) :]
        slots = kept + free[: max(0, min(limit, starts) - len(kept))]
        servers[s.name] = _Server(
            slots=[_Slot(x.free_at, x.model, x.chain, x.tokens, x.index, x.landing) for x in slots],
            resident=list(s.models_loaded) if s.models_loaded is not None else None,
            limit=max(1, s.resident_limit),
            loading=s.loading_model,
            ready_at=s.load_remaining,
        )
    return servers


def _probe_shortest(
    queue: Sequence[Queued], live: Mapping[int, list[ServerLoad]], speeds: Mapping[str, _Speed]
) -> dict[int, list[ServerLoad]]:
    """`live` with each server never measured left as a candidate only of the shortest request it can serve.

    Its first answer is how its speed is learned, and until then the plan's
    estimate for it is a guess: the longest-first order would otherwise hand
    it whatever finishes soonest there, often a long job the measured servers
    are busy with (a 3 s job on the slowest box was seen). The shortest
    request costs least if the guess was wrong. It still goes there only if
    that is where it finishes first (a model load, say, can make it wait).
    Each unmeasured server gets its own request (the shortest one no other
    unmeasured server took), so one round probes them all: with one shared
    request, a round probed one server, and 60 new servers behind a long
    queue took 60 rounds of planning the whole queue.
    """
    unmeasured = {name for name, sp in speeds.items() if not sp.measured}
    if not unmeasured:
        return dict(live)
    probe: dict[str, int] = {}
    # Among equally short requests the one that waited least: the longest-first order plans it last, when the
    # measured servers' slots are taken, so it is the one the unmeasured server can win.
    shortest = sorted(live, key=lambda i: (_tokens(queue[i].req), queue[i].req.prompt_tokens, queue[i].waited, -i))
    for index in shortest:
        if len(probe) == len(unmeasured):
            break
        name = next((s.name for s in live[index] if s.name in unmeasured and s.name not in probe), None)
        if name is not None:
            probe[name] = index
    return {
        index: [s for s in cands if s.name not in unmeasured or probe.get(s.name) == index] or cands
        for index, cands in live.items()
    }


def _longest_first(
    queue: Sequence[Queued], live: Iterable[int], speeds: Mapping[str, _Speed], servers: Mapping[str, _Server]
) -> list[int]:
    """Queue indices by class rank and priority, then requests for a model some server holds before those for a model none
    holds, then expected size (on the fleet's best speeds) plus seconds waited, largest first.

    Resident first: a request whose model must be loaded somewhere is planned
    after the requests that keep the servers' current models busy, so it
    sees when each server's batch of its current model ends and does not
    evict a model whose queue is about to be served (which would cost a load
    back; see `_Demand.evicts_needed`).
    """
    best_fixed = min((sp.fixed for sp in speeds.values()), default=PRIOR_TTFT)
    best_tok = min((sp.per_token for sp in speeds.values()), default=PRIOR_TOKEN_SECONDS)
    held: set[str] | None = set()
    for server in servers.values():
        if server.resident is None:
            held = None  # some server cannot say what it holds: assume any model may be there
            break
        held.update(server.resident)

    def key(index: int) -> tuple[tuple[int, int], bool, float, int]:
        queued = queue[index]
        homeless = held is not None and queued.req.model not in held
        return (queued.order, homeless, -(best_fixed + best_tok * _tokens(queued.req) + queued.waited), index)

    return sorted(live, key=key)


def _warm_first(
    order: list[_T],
    req_of: Callable[[_T], LeaseRequest],
    servers: Mapping[str, _Server],
    queued: Mapping[str, int] | None = None,
) -> list[_T]:
    """`order` with, per prefix group (`_group`), as many of its requests as free slots hold its prefix moved to the
    front, in their order. `queued`: the requests of `order` per group, when the caller keeps that count.

    Why: the server gives a request the free slot with the longest common
    prefix and, on a tie, the lowest-numbered one (`lands_as_planned`). When
    two slots of a server are free, a request cold on both, planned and
    granted first, lands on the lower one even if that one holds the prefix
    of a queued group, whose request then takes the other slot: two cold
    prefills where one was needed (replayed on prefix fleet B). Planned (and
    granted: `apply_group_diversity` keeps the plan's order) first, each warm
    request takes its own slot, and a cold one the slot that is left.
    And a freed slot whose group has no more requests queued than slots
    holding it (its last few) serves them before it switches to another
    group: planned by size alone, a big group's request took the freed slot
    of a small group with one request left, which then paid a cold prefill
    elsewhere, or took the slot back later, cold again (replayed on prefix
    fleet B with its servers listed slowest first: 15 cold prefills, 9 with
    this). A group with more left than that is left to the plan (its
    placement decides how many slots it keeps).
    """
    idle = [
        (slot, sum(1 for other in server.slots if other.free_at <= 0.0) > 1)  # (a free slot holding a prefix, a tie)
        for server in servers.values()
        for slot in server.slots
        if slot.free_at <= 0.0 and slot.chain
    ]
    if not idle:
        return order
    holding = Counter(_slot_group(slot) for server in servers.values() for slot in server.slots if slot.chain)
    if queued is None:
        queued = Counter(_group(req_of(item)) for item in order)
    groups = [(_slot_group(slot), tie) for slot, tie in idle]
    free = Counter(group for group, tie in groups if tie or queued.get(group, 0) <= holding[group])
    for group in free:
        free[group] = min(free[group], queued.get(group, 0))  # so the scan ends once every one is found
    need = sum(free.values())
    if not need:
        return order
    first: list[_T] = []
    rest: list[_T] = []
    for at, item in enumerate(order):
        if not need:
            return first + rest + order[at:]
        group = _group(req_of(item))
        if free[group] > 0:
            free[group] -= 1
            need -= 1
            first.append(item)
        else:
            rest.append(item)
    return first + rest


@dataclass(frozen=True)
class _Fit:
    """Where a request would run on one server: its finish and start, the slot, whether it loads the model,
    and `score` (finish plus the prefill it makes others pay by overwriting a cache they still need, and, while
    the queue is long, the prefill of a second copy of a prefix the fleet holds elsewhere: `_Demand.busy`)."""

    score: float
    finish: float
    start: float
    slot: int
    switch: bool


class _Counts:
    """Counts of the queue minus what this round has planned so far.

    The incremental planner keeps the queue's counts between rounds; a round
    records its subtractions here instead of copying them (10,000 prefixes).
    """

    def __init__(self, base: Counter[str]) -> None:
        self.base = base
        self.used: Counter[str] = Counter()

    def __getitem__(self, key: str) -> int:
        return self.base.get(key, 0) - self.used.get(key, 0)  # `get`: a Counter's missing key is a Python call

    def subtract(self, keys: Iterable[str]) -> None:
        self.used.update(keys)


class _Demand:
    """What the rest of the queue still needs: cached prefixes (and how many virtual slots hold each), and models
    (and how many servers hold each).

    A request that takes a slot overwrites its cache. When the queue still
    has at least as many requests for that prefix as there are slots holding
    it, one of them will have to prefill it again somewhere. Likewise a load
    that evicts the last resident copy of a model the queue still needs
    means a load back later. Those are costs of this choice even though they
    do not delay this request, so they count in the choice (`_Fit.score`),
    not in the timeline.
    """

    def __init__(self, queued: _Counts, models: _Counts, servers: Mapping[str, _Server]) -> None:
        self.queued = queued
        self.held: Counter[str] = Counter(h for server in servers.values() for slot in server.slots for h in slot.chain)
        self.models = models
        self.resident: Counter[str] = Counter(m for server in servers.values() for m in server.resident or ())
        self.slots = sum(len(server.slots) for server in servers.values())
        self._matched: tuple[LeaseRequest, int] | None = None  # `fleet_match`'s last answer, until `held` changes

    def busy(self) -> float:
        """How much a second copy of a prefix costs the rest of the queue, as a fraction of its prefill.

        A prefix the fleet holds elsewhere, prefilled again on another slot, is
        duplicate work. While the queue still has a request for every slot
        (1.0), that work is capacity the queue loses, so it counts on top of
        this request's own delay (in `_Fit.finish`): a hot prefix spills only
        once its wait exceeds two prefills. With a shorter queue some slot will
        idle anyway, so idle capacity pays for the copy and only the delay
        counts (0.0). It was the fraction left / slots: at the end of a run a
        slot with nothing left to do still charged most of a prefill, and a
        specialist's last request queued behind its warm slot on the slowest
        server rather than spill cold to an idle fast one that finished
        sooner; that request ended the run (prefix fleet B, real and replayed).
        """
        left = sum(self.models.base.values()) - sum(self.models.used.values())
        return 1.0 if self.slots and left >= self.slots else 0.0

    def fleet_match(self, req: LeaseRequest) -> int:
        """Prompt tokens of `req` that some slot of the fleet holds (its longest prefix held anywhere).

        Read from `held`, whose chained hashes each cover everything before
        them, so the deepest block held anywhere is the longest prefix held.
        Kept for the request asked last: a search asks it once per server tried.
        """
        if self._matched is not None and self._matched[0] is req:
            return self._matched[1]
        k = 0
        while k < len(req.prefix) and self.held.get(req.prefix[k], 0) > 0:
            k += 1
        match = max(0, min(req.prefix_tokens[k - 1], req.prompt_tokens - 1)) if k else 0
        self._matched = (req, match)
        return match

    @classmethod
    def of(cls, queue: Sequence[Queued], order: Iterable[int], servers: Mapping[str, _Server]) -> _Demand:
        """The demand of the queued requests `order` (indices into `queue`)."""
        order = list(order)
        prefixes = Counter(h for i in order for h in queue[i].req.prefix)
        return cls(_Counts(prefixes), _Counts(Counter(queue[i].req.model for i in order)), servers)

    def evicts_needed(self, server: _Server, req: LeaseRequest) -> bool:
        """Whether loading `req.model` on `server` evicts a model the queue still has requests for.

        Counted even when another server holds that model too: its requests
        then queue on fewer servers, and switching back costs another load,
        so a switch must save more than one load to be made (hysteresis).
        """
        if server.resident is None or len(server.resident) < server.limit:
            return False
        victim = next((m for m in server.resident if m != req.model), None)
        return victim is not None and self.models[victim] > 0

    def switched(self, victim: str | None, model: str) -> None:
        if victim is not None:
            self.resident[victim] -= 1
        self.resident[model] += 1

    def lost(self, slot: _Slot, req: LeaseRequest, cached: int) -> int:
        """Prompt tokens of `slot`'s cache beyond what `req` shares that the queue will want back."""
        same = slot.model == req.model
        for k in range(len(slot.chain) - 1, -1, -1):
            h = slot.chain[k]
            if same and h in req.prefix:
                return 0  # req keeps this block and everything before it
            queued = self.queued[h]
            if queued and queued >= self.held.get(h, 0):
                return max(0, slot.tokens[k] - cached)
        return 0

    def planned(self, req: LeaseRequest) -> None:
        self.queued.subtract(req.prefix)
        self.models.subtract((req.model,))

    def overwrite(self, slot: _Slot, chain: Sequence[str]) -> None:
        self.held.subtract(slot.chain)
        self.held.update(chain)
        self._matched = None


def _fit(
    server: _Server,
    speed: _Speed,
    req: LeaseRequest,
    affinity: bool,
    demand: _Demand,
    lanes: frozenset[int] | None = None,
    spill: tuple[frozenset[int], float] | None = None,
) -> _Fit | None:
    """The slot of `server` where `req` scores best, counting a model switch and each slot's cached prefix;
    only among `lanes` when given (the slots the placement gives `req`'s group), and of `spill` = (slots open to
    it only as spare capacity, the time its group's own slots could start it) not one it would take cold and finish
    on after that."""
    if not server.slots or (lanes is not None and not lanes):
        return None
    switch = affinity and server.resident is not None and req.model not in server.resident
    ready = penalty = 0.0
    if switch:
        full = len(server.resident or ()) >= server.limit
        # A full server unloads a model only after its running requests end (as Ollama does), then loads.
        ready = (max(server.free_times()) if full else 0.0) + speed.load
        penalty = speed.load if demand.evicts_needed(server, req) else 0.0
    elif affinity and server.loading == req.model:
        ready = server.ready_at
    tokens = _tokens(req)
    taken = _server_pick(server, req)
    held, share = demand.fleet_match(req), demand.busy()
    best: _Fit | None = None
    for i, slot in enumerate(server.slots):
        if (slot.free_at <= 0.0 and i != taken) or (lanes is not None and i not in lanes):
            continue  # a request sent now gets the free slot the server picks, not the one we would like
        start = max(slot.free_at, ready)
        cached = 0 if switch else slot.cached(req)
        finish = start + speed.seconds(tokens, max(0, req.prompt_tokens - cached))
        if spill is not None and i in spill[0] and finish > spill[1] and cached < _head_tokens(req):
            continue  # cold, and no sooner done than on its group's own slots: see `_spill`
        # A slot whose lane holds the group was opened to it by the placement, which priced that copy already (each
        # slot it opens costs the group's cold prefill there); charged again as lost capacity, it kept the second
        # 0.5x slot the placement opened for a small group idle, and that group's work on one slot ended the run
        # (prefix fleet B from fleet memory: 1.31x -> 1.14x the bound in the replay).
        own = lanes is not None and (spill is None or i not in spill[0])
        copied = 0.0 if own else share * max(0, held - cached)
        score = finish + penalty + speed.prefill * (demand.lost(slot, req, cached) + copied)
        if best is None or (score, finish, start) < (best.score, best.finish, best.start):
            best = _Fit(score, finish, start, i, switch)
    return best


def _server_pick(server: _Server, req: LeaseRequest) -> int | None:
    """The free slot the server gives `req` (`teamorch.policies.prefix.server_preference`), None if none is free."""
    pick: int | None = None
    best = (-1, False)
    for i, slot in enumerate(server.slots):
        if slot.free_at <= 0.0:
            key = server_preference(slot.model, slot.chain, req.model, req.prefix, req.prefix_tokens)
            if key > best:
                pick, best = i, key
    return pick


def lands_as_planned(server: _Server, slot: int, req: LeaseRequest, demand: _Demand) -> bool:
    """Whether `req`, sent now to the free `slot` of `server`, gets that slot (or one holding the same prefix) even
    if a slot the balancer still sees busy has ended by the time it arrives (LANDING_SECONDS).

    Ollama gives a request the free slot with the longest common prefix and,
    on a tie, the lowest-numbered one (`findLongestCacheSlot` in
    `runner/ollamarunner/cache.go`, used unless OLLAMA_MULTIUSER_CACHE is set;
    `teamorch.sim_model.SlotCaches` does the same). A slot's end reaches the
    balancer a release hop after the server freed it, so a request granted
    in between may find that slot free too; where the server prefers it, the
    request lands there, overwrites the prefix the plan keeps there and
    prefills cold, and the request the plan meant for that slot then takes
    this one, cold as well (replayed on prefix fleet B: two cold prefills on
    the fast server for one). Such a grant waits for the release instead, when
    the other slot holds a prefix the queue still needs (`_Demand.lost`).
    """
    mine = server.slots[slot]
    key = server_preference(mine.model, mine.chain, req.model, req.prefix, req.prefix_tokens)
    for j, other in enumerate(server.slots):
        if j == slot or not (other.landing and other.free_at > 0.0):
            continue
        if (other.model, other.chain[:1]) == (mine.model, mine.chain[:1]) or not demand.lost(other, req, 0):
            continue  # either slot gives it the same prefix, or nothing the queue needs is lost there
        theirs = server_preference(other.model, other.chain, req.model, req.prefix, req.prefix_tokens)
        lower = other.index is not None and mine.index is not None and other.index < mine.index
        if theirs > key or (theirs == key and lower):
            return False
    return True


def _reserve(server: _Server, fit: _Fit, req: LeaseRequest, demand: _Demand) -> None:
    """Book `fit` on the virtual timeline: the slot frees at its finish holding this prompt; a switch evicts."""
    if fit.switch and server.resident is not None:
        victim = next((m for m in server.resident if m != req.model), None)
        demand.switched(victim if len(server.resident) >= server.limit else None, req.model)
        if len(server.resident) >= server.limit and victim is not None:
            server.resident.remove(victim)
            for slot in server.slots:
                slot.free_at = max(slot.free_at, fit.start)  # drained, then busy loading the new model
                if slot.model == victim:
                    demand.overwrite(slot, ())
                    slot.model, slot.chain, slot.tokens = None, (), ()
        server.resident.append(req.model)
        server.loading, server.ready_at = req.model, fit.start
    slot = server.slots[fit.slot]
    demand.overwrite(slot, req.prefix)
    slot.free_at, slot.model, slot.landing = fit.finish, req.model, False
    slot.chain, slot.tokens = tuple(req.prefix), tuple(req.prefix_tokens)


def _earliest_finish(
    queue: Sequence[Queued],
    order: list[int],
    live: Mapping[int, list[ServerLoad]],
    servers: dict[str, _Server],
    speeds: Mapping[str, _Speed],
    affinity: bool,
    rng: random.Random,
) -> dict[int, Decision]:
    """Reserve, request by request in `order`, the slot where each finishes first; start those whose slot is free now.

    "First" is by `_Fit.score`: the finish, plus the prefill the choice makes
    a later request pay, among the servers the placement gives its group
    (`_placed`). Mutates `servers`: each reservation moves its slot's free
    time to the request's expected finish.
    """
    decisions: dict[int, Decision] = {}
    demand = _Demand.of(queue, order, servers)
    placement = _placement(_group_work(queue[i].req for i in order), servers, speeds, affinity, demand)
    for index in order:
        if not any(server.free_now() for server in servers.values()):
            break  # nothing can start now; what is left waits for the next event
        req = queue[index].req
        demand.planned(req)
        names = [s.name for s in live[index]]

        def best_in(placed: bool, req: LeaseRequest = req, names: list[str] = names) -> tuple[str, _Fit] | None:
            best: tuple[float, float, float, float, str] | None = None
            chosen: _Fit | None = None
            start = _lane_start(placement, req, servers) if placed else math.inf
            for name in names:
                lanes = _lanes(placement, req, name, servers[name], demand) if placed else None
                spill = _spill(placement, req, name, lanes, start)
                fit = _fit(servers[name], speeds[name], req, affinity, demand, lanes, spill)
                if fit is None:
                    continue
                key = (fit.score, fit.finish, fit.start, rng.random(), name)  # the rng breaks exact ties
                if best is None or key < best:
                    best, chosen = key, fit
            return None if best is None or chosen is None else (best[4], chosen)

        found = _placed(placement, req, names, servers, best_in)
        if found is None:
            continue
        server = servers[found[0]]
        free_now = server.slots[found[1].slot].free_at <= 0.0
        lands = free_now and lands_as_planned(server, found[1].slot, req, demand)
        _take_lane(placement, req, found, servers, demand)
        _reserve(server, found[1], req, demand)
        if lands:  # one that would not waits (holding its slot in this plan) for the release due any moment
            decisions[index] = found[0]
    return decisions


def _group_work(reqs: Iterable[LeaseRequest]) -> dict[str, GroupWork]:
    groups: dict[str, GroupWork] = {}
    for req in reqs:
        _count_group(groups, req, 1)
    return groups


def _count_group(groups: dict[str, GroupWork], req: LeaseRequest, sign: int) -> None:
    """Add (`sign` 1) or take out (-1) `req`'s work in its group (`teamorch.policies.placement.GroupWork`)."""
    key = _group(req)
    work = groups.setdefault(key, GroupWork(req.model))
    work.add(_tokens(req), req.prompt_tokens, req.prefix, req.prefix_tokens, sign)
    if work.count <= 0:
        del groups[key]


def _placement(
    groups: Mapping[str, GroupWork],
    servers: Mapping[str, _Server],
    speeds: Mapping[str, _Speed],
    affinity: bool,
    demand: _Demand,
) -> Assignment:
    """The queue's groups placed on the virtual servers (`teamorch.policies.placement.place`); nothing placed,
    at the cost of one look at the median server, when no group is worth keeping together (`sticky`)."""
    models = {g.model for g in groups.values()}

    def host(name: str) -> Host:
        server, sp = servers[name], speeds[name]
        return Host(
            name,
            Rate(sp.fixed * sp.penalty, sp.per_token * sp.penalty, sp.prefill * sp.penalty, sp.load),
            tuple(
                (slot.free_at, _group_key(slot.model, slot.chain[0]) if slot.chain else None) for slot in server.slots
            ),
            tuple(server.resident) if affinity and server.resident is not None else None,
            affinity and server.resident is not None and server.limit < len(models),
        )

    # A server not measured yet is left out: its speed is a guess (`_speeds`), so a lane there could leave a
    # group waiting on a slow box's first request; its slots stay open to any group, as the scheduler sees fit.
    usable = [name for name, server in servers.items() if server.slots and speeds[name].measured]
    if not usable:
        return Assignment()
    mid = host(_median(usable, speeds))
    for work in groups.values():
        work.share(demand.queued.__getitem__)
    if not any(sticky(work, mid.rate, mid.bound) for work in groups.values()):
        return Assignment()
    return place(groups, [host(name) for name in usable])


def _median(names: list[str], speeds: Mapping[str, _Speed]) -> str:
    return sorted(names, key=lambda n: (speeds[n].per_token * speeds[n].penalty, n))[len(names) // 2]


def _placed(
    placement: Assignment,
    req: LeaseRequest,
    cands: Iterable[str],
    servers: Mapping[str, _Server],
    best_in: Callable[[bool], tuple[str, _Fit] | None],
) -> tuple[str, _Fit] | None:
    """The best fit (`best_in(placed)`) among the slots `placement` opens to `req`'s group (None: it waits);
    anywhere only when the group has no slot on any of its candidate servers (`Assignment.homeless`)."""
    found = best_in(True)
    if found is None and placement.homeless(_group(req), cands, lambda name: len(servers[name].slots)):
        return best_in(False)
    return found


def _left(demand: _Demand) -> Callable[[str], int]:
    """Requests of a group (`_group`) still queued, planned in this round or not: a slot (a one-model server)
    moves on to the next group of its lane only once the group before has nothing left to grant, so a
    straggler of that group never finds its slots (its model) gone."""

    def left(group: str) -> int:
        model, _, head = group.partition("\x00")
        return demand.queued.base[head] if head else demand.models.base[model]

    return left


def _lanes(
    placement: Assignment, req: LeaseRequest, name: str, server: _Server, demand: _Demand
) -> frozenset[int] | None:
    """The slots of `server` open to `req` (`Assignment.slots`); None: any."""
    if not placement.placed:
        return None
    return placement.slots(_group(req), name, [not slot.chain for slot in server.slots], _left(demand))


def _spill(
    placement: Assignment, req: LeaseRequest, name: str, lanes: frozenset[int] | None, start: float
) -> tuple[frozenset[int], float] | None:
    """The slots of `lanes` open to `req`'s placed group only as spare capacity (their lane does not hold it), with
    `start`, when the group's own slots could start it (`_lane_start`): `_fit` keeps such a slot from a cold
    prefill that ends after that.

    Why: a slot the placement left out is one whose cold prefill does not pay
    for itself, a slow server's most often. A cold request there that ends
    after its group's slots could have started it saves the run less than
    that request's own time, and pays a whole prefill for it: on fleet C the
    0.4x server's (a cold request there lasts most of the run) ended the run
    and cost the hit rate. One that ends sooner still takes the work: a hot
    prefix spills to idle capacity once waiting costs more than a prefill.
    """
    group = _group(req)
    if lanes is None or group not in placement.placed:
        return None
    spare = frozenset(i for i in lanes if group not in placement.lanes.get((name, i), ()))
    return (spare, start) if spare else None


def _lane_start(placement: Assignment, req: LeaseRequest, servers: Mapping[str, _Server]) -> float:
    """When the first slot whose lane holds `req`'s group frees (seconds from now; inf: it has none)."""
    group = _group(req)
    if group not in placement.placed:
        return math.inf
    return min(
        (servers[n].slots[i].free_at for (n, i), lane in placement.lanes.items() if group in lane and n in servers),
        default=math.inf,
    )


def _head_tokens(req: LeaseRequest) -> int:
    """Prompt tokens of `req`'s first prefix block (its group's role prompt): a slot holding fewer is cold for it."""
    return req.prefix_tokens[0] if req.prefix_tokens else 0


def _take_lane(
    placement: Assignment, req: LeaseRequest, found: tuple[str, _Fit], servers: Mapping[str, _Server], demand: _Demand
) -> None:
    """Tell the placement which slot `req` takes (before `_reserve` fills it): `Assignment.took`."""
    if placement.placed:
        name, fit = found
        empty = [not slot.chain for slot in servers[name].slots]
        placement.took(_group(req), name, fit.slot, empty, _left(demand))


def _cold_start_probes(
    queue: Sequence[Queued],
    live: Mapping[int, list[ServerLoad]],
    servers: Mapping[str, _Server],
    speeds: Mapping[str, _Speed],
) -> dict[int, Decision]:
    """Nothing is measured yet: every free slot takes a short waiting request, spread over the prompts' prefixes.

    Short, because the first answers are how the servers' speeds are learned.
    Spread, because each slot's first request is a cold prefill anyway and
    leaves its prefix cached: slot by slot, a prefix group (first block: the
    specialist's role prompt) that has no slot yet, then the one with the most
    expected work (the priors, one cold prefill included) per slot already
    given to it, is served next, its shortest request first. Every group
    first: a group left without a slot pays its cold prefill later, after the
    big groups' work, where it makes the tail (the placement,
    `teamorch.policies.placement`, then sizes each group's slots).
    """
    prior = max(speeds.values(), key=lambda sp: sp.per_token)  # everyone has the priors before any answer
    groups: dict[str, list[int]] = {}
    work: Counter[str] = Counter()
    for i in sorted(live, key=lambda i: (queue[i].order, _tokens(queue[i].req), i)):
        group = _group(queue[i].req)
        groups.setdefault(group, []).append(i)
        work[group] = max(work[group], prior.prefill * queue[i].req.prompt_tokens)  # one cold prefill per group
    for group, idx in groups.items():
        work[group] += sum(prior.seconds(_tokens(queue[i].req)) for i in idx)
    decisions: dict[int, Decision] = {}
    held: Counter[str] = Counter()
    for name, server in servers.items():
        models = list(server.resident) if server.resident is not None else None
        for _slot in range(sum(1 for slot in server.slots if slot.free_at <= 0.0)):
            # A server that holds as many models as it can takes only those: two first requests must not thrash it.
            allowed = models if models is not None and len(models) >= server.limit else None
            firsts = {g: _first_waiting(idx, name, queue, live, decisions, allowed) for g, idx in groups.items()}
            open_ = {g: i for g, i in firsts.items() if i is not None}
            if not open_:
                break
            group = max(open_, key=lambda g: (held[g] == 0, work[g] / (held[g] + 1)))
            decisions[open_[group]] = name
            held[group] += 1
            if models is not None and queue[open_[group]].req.model not in models:
                models.append(queue[open_[group]].req.model)
    return decisions


def _first_waiting(
    indices: list[int],
    name: str,
    queue: Sequence[Queued],
    live: Mapping[int, list[ServerLoad]],
    decided: Mapping[int, Decision],
    models: list[str] | None,
) -> int | None:
    """The first of `indices` not yet decided that server `name` can serve (and, if given, is for one of `models`)."""
    for i in indices:
        if i in decided or (models is not None and queue[i].req.model not in models):
            continue
        if any(s.name == name for s in live[i]):
            return i
    return None


def _slot_group(slot: _Slot) -> str:
    return _group_key(slot.model, slot.chain[0] if slot.chain else "")


def _group(req: LeaseRequest) -> str:
    return _group_key(req.model, req.prefix[0] if req.prefix else "")


def _group_key(model: str | None, head: str) -> str:
    """A prefix group: the model and the first block of the prompt (`_left` splits it again)."""
    return f"{model}\x00{head}"


# ---- the balancer's dispatch ---------------------------------------------------------------


def coalesce_delay(policy: str, loads: Sequence[ServerLoad], req: LeaseRequest, affinity: bool = True) -> float | None:
    """Seconds a new arrival waits for the rest of its wave before the queue is planned; None: do not wait.

    Only peak_ewma plans the whole queue, so only it gains from seeing the
    wave together; and with no slot free there is nothing to plan until a
    release. The wait is COALESCE_SECONDS at most (COLD_COALESCE_SECONDS
    before any server is measured), and at most COALESCE_FRACTION of the
    quickest expected service time of `req`.
    """
    if policy != "peak_ewma" or not any(has_capacity(s) for s in loads):
        return None
    speeds = _speeds(loads)
    tokens = _tokens(req)
    quickest = min(speeds[s.name].seconds(tokens) + _load_wait(s, req.model, affinity) for s in loads)
    cap = COALESCE_SECONDS if any(sp.measured for sp in speeds.values()) else COLD_COALESCE_SECONDS
    return min(cap, COALESCE_FRACTION * quickest)


def wave_deadline(loads: Sequence[ServerLoad], first: float, now: float, delay: float) -> float:
    """When the queue is planned once an arrival at `now` was asked to wait `delay` (`coalesce_delay`), the
    wait having begun with an arrival at `first`: `first` + `delay` while a server is busy; on an idle fleet
    (a cold start, or a run's first wave on speeds from fleet memory), whose plan decides every slot's first
    prefix and model, once the wave stopped arriving. Measured, a lone arrival keeps its short delay: only a
    second one within it shows a wave is coming (a plan of its first few requests spread them over the slots
    the rest of the wave needed)."""
    if not any(s.ewma_token_seconds is not None for s in loads):
        return min(first + COLD_WAVE_SECONDS, max(first + delay, now + COLD_QUIET_SECONDS))
    if any(s.in_flight for s in loads):
        return first + delay
    if all(s.completed <= 1 for s in loads):
        # The fleet's first wave on measured speeds (from fleet memory, or after the speed probes of
        # `balancer.measure_first`: at most one answer per server so far) is held as a cold one is. A plan of a
        # wave missing one specialist's requests placed every first prefix without it (prefix fleet B, live: 53 of
        # 64 requests in the first plan after a 20 ms pause in arrivals, 1.40x the bound where the whole wave
        # gave 1.21x): once per team, the wait costs nothing next to a misplaced prefix.
        return min(first + COLD_WAVE_SECONDS, max(first + COLD_COALESCE_SECONDS, now + COLD_QUIET_SECONDS))
    if now <= first:
        return first + delay
    # Measured, the quiet gap is a few of `delay`s (a small fraction of a request): a fleet that answers in a
    # millisecond (the overhead benchmark's) gains nothing by holding a wave, one of slow prompts everything.
    quiet = min(COLD_QUIET_SECONDS, WAVE_QUIET_DELAYS * delay)
    return min(first + COLD_WAVE_SECONDS, max(first + delay, now + quiet))


def apply_group_diversity(
    decisions: Mapping[int, Decision], queue: Sequence[Queued] | Mapping[int, Queued]
) -> tuple[dict[int, Decision], bool]:
    """Keep one grant per (diversity group, server) in a round; True when one was held back.

    The planner sees each request's group only through `avoid` (the servers its
    group held before this round), so two requests of one group can be planned
    onto the same server in the same round. Only the first (in queue order) is
    granted; the caller plans the queue again, and the second then avoids the
    server the first took. The grants kept stay in the plan's order, which is
    the order the caller grants them in: a server picks a slot for each
    request as it arrives (`_warm_first`).
    """
    dropped: set[int] = set()
    granted: set[tuple[str, str]] = set()
    for index in sorted(decisions):
        decision, group = decisions[index], queue[index].req.group
        if group and isinstance(decision, str):
            if (group, decision) in granted:
                dropped.add(index)
                continue
            granted.add((group, decision))
    return {i: d for i, d in decisions.items() if i not in dropped}, bool(dropped)


# ---- the incremental planner ----------------------------------------------------------------

# Relative slack on the scan's lower bounds, so a rounding difference between the bound and the exact cost can never
# prune a server whose cost equals the best one.
_BOUND_SLACK = 1e-9
# Queued requests x servers up to which a plan from scratch costs about a millisecond (0.6 ms for 4 servers x 100
# queued): `Planner` then plans afresh while a server's first requests run (`Planner._learning`) and where a kept plan
# would switch a slot to another prefix group (`_Tentative._release`).
CHEAP_REPLAN_WORK = 2_000
# Events a kept tentative schedule serves before `Planner` plans the whole queue again: bounds how long a drift of the
# fleet from its estimates (a slot's cache, a speed within the tolerance) can steer grants.
REPLAN_EVENTS = 256
# A release this close to the end the tentative schedule expects is on schedule; any other one re-plans everything.
_ON_TIME = 1e-6
# The same for a live fleet (the balancer actor): a release comes milliseconds off its estimate at best (Ray hops,
# HTTP, the server's own pace), so an exact tolerance would re-plan on every event. Within this many seconds the
# kept plan goes on; the drift it ignores is bounded by REPLAN_EVENTS, after which the queue is planned from scratch.
LIVE_ON_TIME = 0.05
# A live release later or earlier than that, by up to this many seconds, shifts its own slot's reservations by the
# difference and the kept plan goes on: under load a release comes tens of milliseconds off (Ray's queue, the event
# loop), and planning 10,000 queued from scratch for each was most of the balancer's time. Further off, the estimate
# is wrong and the queue is planned again.
LIVE_SHIFT_SECONDS = 0.5
# A live kept plan is continued for at least this many seconds whatever its event count (REPLAN_EVENTS): at
# thousands of events a second, 256 events is a tenth of a second, and a plan from scratch costs tens of ms.
LIVE_KEEP_SECONDS = 1.0
# Relative change of a server's speed estimates that a kept tentative schedule tolerates before it is re-planned.
SPEED_DRIFT = 0.05
# A live server's EWMAs move more than SPEED_DRIFT between requests (a busy host's timings, a gate wait estimated
# from the balancer's side): a kept plan tolerates this much there (relative), and is re-planned at the latest
# after LIVE_KEEP_SECONDS and REPLAN_EVENTS anyway.
LIVE_SPEED_DRIFT = 0.25


@dataclass
class _Entry:
    """One queued request in `Planner`: `base` as asked, `req` with the servers its group holds added to `avoid`,
    `rank` its class's rank (the top one once `Aging` promoted it)."""

    key: int
    base: LeaseRequest
    req: LeaseRequest
    enqueued: float
    capabilities: tuple[str, ...]
    rank: int = TOP_RANK
    bucket: tuple[object, ...] = ()


def _serves(row: ServerLoad, req: LeaseRequest) -> bool:
    return _serves_any([row], req)


def _serves_any(rows: Sequence[ServerLoad], req: LeaseRequest) -> bool:
    try:
        return bool(honour_avoid(eligible(rows, req), req))
    except NoServerAvailable:
        return False


def _bucket(entry: _Entry) -> tuple[object, ...]:
    """Requests with one bucket have the same candidates, rank and size: only their arrival orders them."""
    req = entry.req
    elig = (req.model, tuple(req.requires), tuple(req.exclude), req.server, tuple(req.avoid))
    return (elig, entry.rank, req.priority, _tokens(req))


class Planner:
    """`plan_dispatch` over a queue kept between rounds, so an event costs what it changes, not the queue's size.

    The balancer adds each waiting request once (`add`) and removes it once it
    is granted, refused or cancelled (`remove`); `plan` then gives the same
    decisions as `plan_dispatch` over that queue, keyed by the caller's keys
    (its arrival sequence numbers, which order requests of equal priority).
    Priority classes rank above priority, and `aging` (seconds) is the batch
    class's starvation clock (`teamorch.policies.priority`): `plan` promotes
    the request it names, and `remove(key, granted=now)` tells it of a grant.
    For peak_ewma, what a round of `plan_dispatch` rebuilds from the whole
    queue is kept here instead:

    * the queue ordered as `_longest_first` asks, in buckets of requests with
      the same candidates, priority and size (`_bucket`), each bucket in
      arrival order: a round merges the buckets' heads lazily, so it reads
      only the requests it plans, not the 10,000 behind them (waiting time
      counts toward size, but equally for all, so arrival order within a
      bucket is the planner's order at any time);
    * the counts of queued prefixes and models (`_Demand`), updated per request;
    * eligibility once per bucket, not per request.

    And a request's best slot is searched among servers in order of their
    earliest free slot, skipping a server as soon as its earliest slot plus
    its fastest possible service cannot beat the best fit found, and
    stopping once no server can (`_BestFit`). Exact ties (equal score,
    finish and start) are broken by `rng` among the tied servers, as
    `plan_dispatch` does, with other draws: the same decisions up to ties.
    The cold start and the other policies run `plan_dispatch` itself over
    the queue in order (they plan one request at a time anyway). Past the
    cold start, servers never measured are left out of the plan: each idle
    one takes its probe, the shortest request it can serve, when no measured
    server can start that request now (`_probes`; `plan_dispatch` sends the
    probe where it finishes first, which for a long queue is the same).

    Planning from scratch still costs the requests a round reserves on busy
    slots before the freed one wins one (30 to 4,000 on 100 x 4 slots). So
    the last peak_ewma plan is kept and continued (`_Tentative`) while the
    fleet does what it expected, for up to `keep` events (REPLAN_EVENTS), and while arrivals rank behind
    what it reserved: an event then costs about one request's search. Its
    decisions are those of the reference except where the reference would
    re-plan around a request running past its estimate (OVERDUE_SECONDS) or
    an estimate that drifted within SPEED_DRIFT; `keep=0` plans every event
    from scratch (plan_dispatch's decisions up to ties).
    """

    def __init__(
        self,
        policy: str,
        *,
        affinity: bool = True,
        rng: random.Random | None = None,
        keep: int = REPLAN_EVENTS,
        aging: float = 30.0,
        on_time: float = _ON_TIME,
        shift_within: float = 0.0,
        keep_seconds: float = 0.0,
        drift: float = SPEED_DRIFT,
    ) -> None:
        _check_policy(policy)
        self.policy = policy
        self.on_time = on_time  # a release within this of its expected end keeps the plan (LIVE_ON_TIME: live fleet)
        self.shift_within = shift_within  # ... within this, it shifts its slot's line (LIVE_SHIFT_SECONDS)
        self.keep_seconds = keep_seconds  # a plan younger than this outlives `keep` events (LIVE_KEEP_SECONDS)
        self.drift = drift  # speed estimates within this (relative) keep the plan (LIVE_SPEED_DRIFT: live fleet)
        self.aging = Aging(aging)
        self.keep = keep  # events a plan is continued (`_Tentative`); 0: every event plans from scratch
        self.affinity = affinity
        self.rng = rng or random.Random(0)
        self.entries: dict[int, _Entry] = {}
        self.buckets: dict[tuple[object, ...], list[tuple[float, int]]] = {}
        self.prefixes: Counter[str] = Counter()
        self.models: Counter[str] = Counter()
        self.groups: dict[str, GroupWork] = {}  # the queue's work per prefix group, for `_placement`
        self._ranked: list[tuple[object, ...]] | None = None  # `_order`'s, for `_ranked_for`
        self._ranked_for: tuple[float, frozenset[str] | None] = (0.0, None)
        self._kept: _Tentative | None = None  # the last plan, continued while the fleet follows it
        self._grouped: dict[int, _Entry] = {}  # entries with a diversity group: `regroup` reads only these
        self.fresh_plans = 0  # peak_ewma plans of the whole queue from scratch: what an event costs when not kept

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: int, req: LeaseRequest, enqueued: float, capabilities: Sequence[str] = ()) -> None:
        """Queue `req` under `key` (a larger key arrived later), `enqueued` at that monotonic time."""
        entry = _Entry(key, req, req, enqueued, tuple(capabilities), rank(req.priority_class))
        self.entries[key] = entry
        if req.group:
            self._grouped[key] = entry
        if entry.rank < TOP_RANK:
            self.aging.add(key, enqueued)
        self._file(entry)
        if self._kept is not None and not self._kept.admit(key, self._rank(entry), entry.bucket[0]):
            self._kept = None  # it ranks ahead of requests already reserved: they must be planned again
        self.prefixes.update(req.prefix)
        _count_group(self.groups, req, 1)
        self.models[req.model] += 1

    def remove(self, key: int, granted: float | None = None) -> None:
        """Forget `key` (granted at monotonic time `granted`, or refused or cancelled); unknown keys are ignored."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self._grouped.pop(key, None)
        if rank(entry.base.priority_class) < TOP_RANK:
            self.aging.remove(key, entry.enqueued)
            if granted is not None:
                self.aging.served(granted)
        if self._kept is not None and not self._kept.forget(key, entry.req):
            self._kept = None
        self._unfile(entry)
        self.prefixes.subtract(entry.req.prefix)
        _count_group(self.groups, entry.req, -1)
        self.models[entry.req.model] -= 1

    def _file(self, entry: _Entry) -> None:
        entry.bucket = _bucket(entry)
        bisect.insort(self.buckets.setdefault(entry.bucket, []), (entry.enqueued, entry.key))
        if self._ranked is not None:
            bisect.insort(self._ranked, self._rank(entry))

    def _unfile(self, entry: _Entry) -> None:
        members = self.buckets[entry.bucket]
        del members[bisect.bisect_left(members, (entry.enqueued, entry.key))]
        if not members:
            del self.buckets[entry.bucket]
        if self._ranked is not None:
            del self._ranked[bisect.bisect_left(self._ranked, self._rank(entry))]

    def queue(self, now: float) -> list[tuple[int, Queued]]:
        """The queue in the balancer's order (class rank, priority, then arrival), as `plan_dispatch` takes it."""
        self._promote(now)
        ordered = sorted(self.entries.values(), key=lambda e: (-e.rank, -e.req.priority, e.key))
        return [(e.key, Queued(e.req, now - e.enqueued, e.capabilities, e.rank)) for e in ordered]

    def _promote(self, now: float) -> None:
        """The batch request `Aging` says has starved long enough takes the top rank (one re-filing)."""
        key = self.aging.due(now)
        entry = self.entries.get(key) if key is not None else None
        if entry is not None:
            self._kept = None
            self._unfile(entry)
            entry.rank = TOP_RANK
            self._file(entry)

    def regroup(self, with_avoid: Callable[[LeaseRequest], LeaseRequest]) -> None:
        """Re-derive `avoid` for the requests that have a diversity group (the balancer's `GroupServers`)."""
        for entry in list(self._grouped.values()):
            req = with_avoid(entry.base)
            if req.avoid != entry.req.avoid:
                self._kept = None
                self._unfile(entry)
                entry.req = req
                self._file(entry)

    def plan(
        self,
        loads: Sequence[ServerLoad],
        now: float,
        *,
        caches: Mapping[str, Sequence[SlotState]] | None = None,
        counter: Iterator[int] | None = None,
    ) -> dict[int, Decision]:
        """`plan_dispatch(policy, loads, queue, caches=caches, ...)` for the queue held here, keyed by key.

        Refused requests are removed here; granted ones stay until `remove`.
        """
        self._promote(now)
        # Servers never measured are not in the plan: each takes its probe (`_probes`) and joins once measured.
        measured = [s for s in loads if _measured(s)]
        if self.policy != "peak_ewma" or not measured:
            self._kept = None
            keyed = self.queue(now)
            queue = [q for _, q in keyed]
            done = plan_dispatch(
                self.policy, loads, queue, caches=caches, counter=counter, rng=self.rng, affinity=self.affinity
            )
            decisions = {keyed[i][0]: d for i, d in done.items()}
            for key, decision in decisions.items():
                if isinstance(decision, NoServerAvailable):
                    self.remove(key)
            return decisions
        grants = self._kept.advance(measured, now, self.entries) if self._kept is not None else None
        if grants is None:  # the cost models only now: rebuilding 100 of them per event was a fifth of a kept plan's
            grants = self._fresh(loads, measured, _speeds(loads), now, caches)
        if self._probing(loads):
            grants.update(self._probes(loads, grants))
        return grants

    def _fresh(
        self,
        loads: Sequence[ServerLoad],
        measured: Sequence[ServerLoad],
        speeds: Mapping[str, _Speed],
        now: float,
        caches: Mapping[str, Sequence[SlotState]] | None,
    ) -> dict[int, Decision]:
        """Plan the queue from scratch on the measured servers (`_Tentative`), and keep the plan.

        Eligibility is decided on the whole fleet: a request only a server not
        yet measured can serve waits for its probe's answer, it is not refused.
        """
        self._kept = None
        self.fresh_plans += 1
        refused, cands = self._eligibility(loads)
        unmeasured = {s.name for s in loads if not speeds[s.name].measured}
        cands = {elig: names - unmeasured for elig, names in cands.items()}
        if not any(cands.values()) or not any(has_capacity(s) for s in measured):
            return refused
        servers = _virtual_slots(measured, speeds, {}, caches or {})
        queued = {group: work.count for group, work in self.groups.items()}
        ranks = _warm_first(
            list(self._order(speeds, servers)), lambda rank: self.entries[rank[-1]].req, servers, queued
        )
        demand = _Demand(_Counts(self.prefixes), _Counts(self.models), servers)
        search = _BestFit(servers, speeds, self.affinity, self.rng)
        placement = _placement(self.groups, servers, speeds, self.affinity, demand)
        live = {"shift_within": self.shift_within, "keep_seconds": self.keep_seconds, "drift": self.drift}
        cheap = len(self.entries) * len(loads) <= CHEAP_REPLAN_WORK
        kept = _Tentative(
            now,
            measured,
            ranks,
            cands,
            servers,
            demand,
            search,
            self.keep,
            self.on_time,
            placement,
            **live,
            switches=cheap,
        )
        refused.update(kept.extend(self.entries))
        self._kept = kept if self.keep and not self._learning(loads, speeds) else None
        return refused

    def _learning(self, loads: Sequence[ServerLoad], speeds: Mapping[str, _Speed]) -> bool:
        """Whether a plan just made is not to be kept: a server's first requests still run, and planning from
        scratch at every event is cheap (CHEAP_REPLAN_WORK).

        The plan gave those requests' groups to the measured servers without
        the slots that hold their prefixes, and the next release would follow
        it (prefix fleet B, live planner: the fast server's second slot
        switched to another specialist 5 ms after the first answer, and back
        later: 11 cold prefills where planning at each event paid 8). On a big
        queue the plan is kept all the same: planning it at every event until
        a probe answers had stalled a 100-server balancer.
        """
        if len(self.entries) * len(loads) > CHEAP_REPLAN_WORK:
            return False
        return any(not speeds[s.name].measured and s.in_flight for s in loads)

    def _probes(self, loads: Sequence[ServerLoad], granted: Mapping[int, Decision]) -> dict[int, Decision]:
        """Each idle server never measured takes the shortest waiting request it can serve (`_probe_shortest`'s
        rule), one each, unless a measured server that can serve it has a slot free after this round's grants
        (where a request finishes first, as `plan_dispatch` would send it): the whole queue is not planned for it.
        """
        taken = Counter(d for d in granted.values() if isinstance(d, str))
        free = [s for s in loads if _measured(s) and has_capacity(s, taken[s.name])]
        out: dict[int, Decision] = {}
        by_size = sorted(self.buckets, key=lambda bucket: bucket[-1])  # the bucket key ends with the size
        for row in loads:
            if _measured(row) or row.in_flight or not has_capacity(row) or row.circuit == "open":
                continue
            for bucket in by_size:
                key = next((k for _, k in reversed(self.buckets[bucket]) if k not in granted and k not in out), None)
                if key is None or not _serves(row, self.entries[key].req):
                    continue
                if not _serves_any(free, self.entries[key].req):
                    out[key] = row.name
                break
        return out

    def _probing(self, loads: Sequence[ServerLoad]) -> bool:
        """Whether a server never measured could take its probe now (`_probes`). One whose probe is running takes
        nothing more until it answers."""
        return any(
            not _measured(s)
            and s.in_flight == 0
            and has_capacity(s)
            and s.circuit != "open"
            and (s.models_present is None or any(self.models[m] > 0 for m in s.models_present))
            for s in loads
        )

    def _eligibility(self, loads: Sequence[ServerLoad]) -> tuple[dict[int, Decision], dict[object, set[str]]]:
        """Refuse every request no server can serve (removing it); candidates per eligibility key for the rest."""
        refused: dict[int, Decision] = {}
        cands: dict[object, set[str]] = {}
        for bucket in list(self.buckets):
            elig = bucket[0]
            if elig in cands or bucket not in self.buckets:  # done, or refused with an earlier bucket
                continue
            req = self.entries[self.buckets[bucket][0][1]].req
            try:
                cands[elig] = {s.name for s in honour_avoid(eligible(loads, req), req)}
            except NoServerAvailable as exc:
                for other in [b for b in self.buckets if b[0] == elig]:
                    for _, key in list(self.buckets[other]):
                        refused[key] = exc
                        self.remove(key)
        return refused, cands

    def _order(self, speeds: Mapping[str, _Speed], servers: Mapping[str, _Server]) -> list[tuple[object, ...]]:
        """The queue in `_longest_first`'s order, kept between rounds while its inputs stay the same.

        `_longest_first` ranks by size + seconds waited = size + now - enqueued:
        `now` shifts every request alike, so ranking by size - enqueued is the
        same order at any time (up to float rounding), and only a new fastest
        per-token speed or a change in which models are held re-sorts it.
        """
        best_tok = min((sp.per_token for sp in speeds.values()), default=PRIOR_TOKEN_SECONDS)
        held: frozenset[str] | None = frozenset(m for server in servers.values() for m in server.resident or ())
        if any(server.resident is None for server in servers.values()):
            held = None
        if self._ranked is None or self._ranked_for != (best_tok, held):
            self._ranked_for = (best_tok, held)
            self._ranked = sorted(self._rank(e) for e in self.entries.values())
        return self._ranked

    def _rank(self, entry: _Entry) -> tuple[object, ...]:
        best_tok, held = self._ranked_for
        req = entry.req
        homeless = held is not None and req.model not in held
        return (-entry.rank, -req.priority, homeless, entry.enqueued - best_tok * _tokens(req), entry.key)


class _BestFit:
    """The best slot for a request, searching servers by their earliest free slot and pruning by lower bounds.

    A request's score on a server is at least that server's earliest slot plus
    its service time with every prompt token cached (`_Speed.seconds(tokens)`;
    prefill, loads and lost caches only add), and that is at least the
    earliest slot plus the fleet's cheapest fixed and per-token costs. So in
    order of earliest slot, a server is skipped when the first bound cannot
    beat the best fit found, and the search ends when the second cannot.
    A slot's cache can only hold part of a prompt that starts with the same
    first block (`matched_tokens`), so the first bound is tightened by
    `warm`: per server, the earliest slot holding each (model, first block);
    any other slot prefills the whole prompt, and pays `_fit`'s charge for
    copying the prefix the fleet holds elsewhere (`copied`, while the queue is
    long: `_Demand.busy`); without that term, servers that could not win were
    costed, 14 fits per search on 100 x 4 slots.

    The bound is computed in the scan itself, from what each entry of
    `ranked` carries (earliest slot, name, the server's rates, its `warm`):
    as a method call it was a fifth of a 100-server balancer's CPU, ~50
    servers checked per search.
    """

    def __init__(
        self, servers: dict[str, _Server], speeds: Mapping[str, _Speed], affinity: bool, rng: random.Random
    ) -> None:
        self.servers, self.speeds, self.affinity, self.rng = servers, speeds, affinity, rng
        # Per server, seconds per unit of `_Speed.seconds`'s terms with its penalty (fixed, per token, per uncached
        # prompt token), and per token of a copied prefix (`_fit`'s `copied`, charged at the bare prefill rate).
        self.rates = {
            name: (sp.fixed * sp.penalty, sp.per_token * sp.penalty, sp.prefill * sp.penalty, sp.prefill)
            for name, sp in speeds.items()
            if name in servers
        }
        self.ranked = sorted(self._entry(name) for name in servers)
        self.free = sum(self._free(name) for name in servers)
        self.fits = 0  # servers whose slots were costed (`_fit`): what a search costs, beyond the bounds it checks
        usable = [self.rates[name] for name, server in servers.items() if server.slots]
        self.min_fixed = min((rate[0] for rate in usable), default=0.0)
        self.min_tok = min((rate[1] for rate in usable), default=0.0)

    def _entry(self, name: str) -> tuple[float, str, tuple[float, float, float, float], dict[object, float]]:
        """`name`'s place in `ranked`: its earliest slot (then its name) orders it; its rates and `_warm` bound it."""
        return (self._earliest(name), name, self.rates[name], self._warm(name))

    def _earliest(self, name: str) -> float:
        return min((slot.free_at for slot in self.servers[name].slots), default=float("inf"))

    def _free(self, name: str) -> int:
        return sum(1 for slot in self.servers[name].slots if slot.free_at <= 0.0)

    def _warm(self, name: str) -> dict[object, float]:
        warm: dict[object, float] = {}
        for slot in self.servers[name].slots:
            if slot.chain:
                head = (slot.model, slot.chain[0])
                warm[head] = min(warm.get(head, slot.free_at), slot.free_at)
        return warm

    def best(
        self, req: LeaseRequest, cands: set[str], demand: _Demand, placement: Assignment | None = None
    ) -> tuple[str, _Fit] | None:
        """`placement`: only the slots it opens to `req`'s group."""
        tokens, prompt = _tokens(req), max(0, req.prompt_tokens)
        # `_fit` charges a cold slot the copy of the prefix the fleet holds, except on slots a placement opens.
        copied = int(demand.busy() * demand.fleet_match(req)) if placement is None or not placement.placed else 0
        floor = (self.min_fixed + self.min_tok * tokens) * (1.0 - _BOUND_SLACK)
        head = (req.model, req.prefix[0]) if req.prefix else None
        best: tuple[str, _Fit] | None = None
        score = math.inf  # the best fit's
        ties = 0
        start: float | None = None  # `_lane_start`, found once a server's slots are looked at
        for earliest, name, (fixed, per_token, prefill, copy), warm in self.ranked:
            if earliest + floor > score:
                break
            if name not in cands:
                continue
            served = fixed + per_token * tokens
            bound = earliest + served + prefill * prompt + copy * copied  # a slot holding none of its prompt
            at = warm.get(head)
            if at is not None and at + served < bound:
                bound = at + served
            if bound * (1.0 - _BOUND_SLACK) > score:
                continue
            lanes = _lanes(placement, req, name, self.servers[name], demand) if placement is not None else None
            if placement is not None and start is None:
                start = _lane_start(placement, req, self.servers)
            spill = _spill(placement, req, name, lanes, start) if placement is not None and start is not None else None
            self.fits += 1
            fit = _fit(self.servers[name], self.speeds[name], req, self.affinity, demand, lanes, spill)
            if fit is None:
                continue
            rank = (fit.score, fit.finish, fit.start)
            if best is None or rank < (best[1].score, best[1].finish, best[1].start):
                best, ties = (name, fit), 1
            elif rank == (best[1].score, best[1].finish, best[1].start):
                ties += 1
                if self.rng.random() * ties < 1.0:  # each of the tied servers equally likely
                    best = (name, fit)
            score = best[1].score
        return best

    def reserve(self, name: str, fit: _Fit, req: LeaseRequest, demand: _Demand) -> None:
        """Book `fit` (`_reserve`) and re-rank its server."""
        self._rerank(name, partial(_reserve, self.servers[name], fit, req, demand))

    def move(self, name: str, slot: int, free_at: float) -> None:
        """Slot `slot` of `name` now frees at `free_at` (what runs there ended off its estimate)."""
        self._rerank(name, partial(setattr, self.servers[name].slots[slot], "free_at", free_at))

    def _rerank(self, name: str, change: Callable[[], object]) -> None:
        self.free -= self._free(name)
        at = bisect.bisect_left(self.ranked, (self._earliest(name), name))  # unique: its own entry, as it ranked
        if self.ranked[at][1] != name:
            raise ValueError(f"{name} is not where its slots rank it: a slot changed outside `_rerank`")
        del self.ranked[at]
        change()
        self.free += self._free(name)
        bisect.insort(self.ranked, self._entry(name))


def _shape(row: ServerLoad) -> tuple[object, ...]:
    """What of a load row decides eligibility and slots: any change there invalidates a kept schedule."""
    return (
        row.name,
        row.healthy,
        row.circuit,
        row.effective_slots,
        row.models_present,
        row.models_loaded,
        row.tags,
        row.resident_limit,
        row.loading_model,
        row.load_remaining,
        row.error_rate,
    )


def _drifted(row: ServerLoad, base: ServerLoad, tolerance: float = SPEED_DRIFT) -> bool:
    """Whether `row` left what the kept schedule assumed: its shape, or a speed estimate by more than `tolerance`."""
    if _shape(row) != _shape(base):
        return True
    for now, then in (
        (row.ewma_token_seconds, base.ewma_token_seconds),
        (row.ewma_ttft, base.ewma_ttft),
        (row.ewma_prefill_seconds, base.ewma_prefill_seconds),
        (row.ewma_load_seconds, base.ewma_load_seconds),
    ):
        if (now is None) != (then is None) or (now is not None and then and abs(now - then) > tolerance * then):
            return True
    return False


class _Tentative:
    """One peak_ewma plan of the whole queue, kept and continued while the fleet does what it expected.

    A round of `_earliest_finish` reserves requests on busy slots (their
    expected end plus the reservations before them) until no slot is free
    now. When the fleet follows those estimates, the next round from
    scratch rebuilds the same reservations: only the times shift, and the
    first request reserved on the slot that was just released is the one
    that starts there. So a release here pops that slot's first reservation,
    and only a release onto an empty line continues the list scheduling from
    where it stopped (`extend`). Times are seconds after `t0`, the time of
    the full plan. `advance` gives up (the caller plans from scratch) when a
    release is not where and when expected (within `on_time` seconds; within `shift_within`, the
    slot's reservations shift by the difference instead), a grant was not applied, a
    server's eligibility, slots or models changed, its speeds drifted by more
    than SPEED_DRIFT (`drift`), or after `events` events (`Planner.keep`) once `keep_seconds` have passed. A request that
    arrives meanwhile joins the order when it ranks behind every request planned
    so far (`admit`): those reservations stand whatever it is. A request that
    would not land on its free slot (`lands_as_planned`) waits for its server's
    next release (`parked`) rather than the whole queue being planned again at
    that event, unless planning from scratch is cheap (`switches`).
    """

    def __init__(
        self,
        t0: float,
        loads: Sequence[ServerLoad],
        ranks: list[tuple[object, ...]],
        cands: dict[object, set[str]],
        servers: dict[str, _Server],
        demand: _Demand,
        search: _BestFit,
        events: int,
        on_time: float = _ON_TIME,
        placement: Assignment | None = None,
        *,
        shift_within: float = 0.0,
        keep_seconds: float = 0.0,
        drift: float = SPEED_DRIFT,
        switches: bool = False,
    ) -> None:
        self.placement = placement or Assignment()
        self.t0, self.events, self.pos, self.cands = t0, events, 0, cands
        self.shift_within, self.keep_seconds, self.drift = shift_within, keep_seconds, drift  # see `Planner`
        self.ranks, self.keys = ranks, [rank[-1] for rank in ranks]  # the planning order (`Planner._rank`)
        self.on_time = on_time
        self.servers, self.demand, self.search = servers, demand, search
        self.rows = {row.name: row for row in loads}  # as planned: drift is measured from these
        self.seen = dict(self.rows)  # as last checked
        self.in_flight = {row.name: row.in_flight for row in loads}
        self.ends = {n: {i: s.free_at for i, s in enumerate(sv.slots) if s.free_at > 0.0} for n, sv in servers.items()}
        self.idle = {(n, i) for n, sv in servers.items() for i, s in enumerate(sv.slots) if s.free_at <= 0.0}
        # Requests already past their estimate: `_virtual_slots` expects them in OVERDUE_SECONDS, they may end any time.
        self.due = {(n, i) for n, e in self.ends.items() for i, end in e.items() if end <= OVERDUE_SECONDS}
        self.booked: dict[tuple[str, int], deque[tuple[int, float]]] = {}  # per slot: (key, expected finish)
        self.planned: set[int] = set()  # keys out of `demand`'s counts
        self.waiting: set[int] = set()  # keys reserved, not granted
        self.groups: dict[int, str] = {}  # the prefix group (`_group`) of each key reserved
        self.holds = {  # the prefix group each slot's cache holds now (None: nothing)
            (n, i): _slot_group(s) if s.chain else None for n, sv in servers.items() for i, s in enumerate(sv.slots)
        }
        self.switches = switches  # cheap to plan afresh: where a plan from scratch would decide otherwise, it does
        # Per server, requests that would not have landed on their free slot: (key, slot, expected finish, when
        # parked), granted at the server's next release (the one `lands_as_planned` waited for, or another: the
        # server then picks), their slot's line shifted by the wait.
        self.parked: dict[str, list[tuple[int, int, float, float]]] = {}
        self.stale = False

    def admit(self, key: int, rank: tuple[object, ...], elig: object) -> bool:
        """A request that arrived after the plan joins its order when it ranks behind every request planned so
        far (and its candidates are known); False when the plan would change ahead of it."""
        if elig not in self.cands or (self.pos and rank < self.ranks[self.pos - 1]):
            return False
        at = bisect.bisect_left(self.ranks, rank, lo=self.pos)
        self.ranks.insert(at, rank)
        self.keys.insert(at, key)
        return True

    def forget(self, key: int, req: LeaseRequest) -> bool:
        """`key` leaves the queue; False when the plan relied on it waiting (a reserved request was cancelled)."""
        if key in self.waiting:
            return False
        if key in self.planned:
            self.planned.discard(key)
            self.demand.queued.used.subtract(req.prefix)  # the queue's own counts drop it now
            self.demand.models.used.subtract((req.model,))
        return True

    def advance(
        self, loads: Sequence[ServerLoad], now: float, entries: Mapping[int, _Entry]
    ) -> dict[int, Decision] | None:
        """The grants of this event, or None when the fleet left the plan and the queue must be planned again."""
        self.events -= 1
        r = now - self.t0
        if self.stale or (self.events < 0 and r >= self.keep_seconds) or len(loads) != len(self.rows):
            return None
        grants: dict[int, Decision] = {}
        released = []
        for row in loads:
            base = self.rows.get(row.name)
            if base is None or (row is not self.seen[row.name] and _drifted(row, base, self.drift)):
                return None
            self.seen[row.name] = row
            gap = self.in_flight[row.name] - row.in_flight
            if gap < 0 and not self._reoccupy(row.name, -gap, r):
                return None
            self.in_flight[row.name] = row.in_flight
            for _ in range(gap):
                if not self._release(row.name, r, grants):
                    return None
            if gap > 0 and row.name in self.parked:
                released.append(row.name)
        grants.update(self.extend(entries, r))
        for name in released:  # after the slots' own lines and the new starts: those are the warm ones
            self._unpark(name, r, grants)
        return grants

    def _reoccupy(self, name: str, count: int, r: float) -> bool:
        """`count` slots of `name` the plan saw released are busy again (the balancer's early slot closed: its
        request ran too far past its estimate, `due_soon`): idle ones of the plan's become busy for OVERDUE_SECONDS
        more, then the slots its parked requests wait on (`parked`). False when the plan has not that many there
        (it started requests on them): plan afresh."""
        idle = sorted(at for at in self.idle if at[0] == name)[:count]
        parked = self.parked.get(name, [])
        if len(idle) + len(parked) < count:
            return False
        for at in idle:
            self.idle.discard(at)
            self.ends[name][at[1]] = r + OVERDUE_SECONDS
            self.search.move(name, at[1], r + OVERDUE_SECONDS)
        for _ in range(count - len(idle)):
            self._rebook(name, parked.pop(0), r + OVERDUE_SECONDS)
        if not parked:
            self.parked.pop(name, None)
        return True

    def _rebook(self, name: str, held: tuple[int, int, float, float], busy_until: float) -> None:
        """A request parked on a slot that is busy again until `busy_until` heads that slot's line instead: it
        starts at that slot's release, not at any release of its server (planning the queue afresh for it had
        been half the plans from scratch of a 100-server balancer)."""
        key, slot, finish, parked = held
        delta = busy_until - parked
        self._shift(name, slot, delta)  # its slot, and the line booked behind it, start that much later
        self.booked.setdefault((name, slot), deque()).appendleft((key, finish + delta))
        self.ends[name][slot] = busy_until

    def _unpark(self, name: str, r: float, grants: dict[int, Decision]) -> None:
        """A release on `name` at `r`: the requests parked there for one go out now (`parked`)."""
        for key, slot, finish, parked in self.parked.pop(name):
            self.waiting.discard(key)
            self.holds[(name, slot)] = self.groups[key]
            grants[key] = name
            self.in_flight[name] += 1
            self.ends[name][slot] = finish + r - parked
            self._shift(name, slot, r - parked)

    def _release(self, name: str, r: float, grants: dict[int, Decision]) -> bool:
        """The slot of `name` expected to end nearest `r` ended: its first reservation starts, or it waits idle.

        Nearest, not first: the plan's slots are virtual (a server gives out its
        own), so with a tolerance (`on_time`) the request that ended is the one
        whose end is closest; exact times make it the first to end, as before.
        When two slots could have ended and they hold different prefixes (or
        what starts next on them differs), a wrong guess sends a request to the
        slot holding the other prefix (a cold prefill): the queue is planned
        again instead, from the balancer's slot index, which knows which slot freed.
        Only while the placement keeps groups together (`Assignment.placed`):
        otherwise a prefix is cheap to prefill again, and re-planning is not.
        """
        ends = self.ends[name]
        if not ends:
            return False
        if self.placement.placed and self._ambiguous(name, r):
            return False
        slot = min(ends, key=lambda i: (abs(ends[i] - r), ends[i]))
        end = ends.pop(slot)
        due = (name, slot) in self.due and r <= end + self.on_time
        self.due.discard((name, slot))
        if abs(end - r) > self.on_time and not due:
            if abs(end - r) > self.shift_within:
                return False
            self._shift(name, slot, r - end)
        line = self.booked.get((name, slot))
        held = self.holds.get((name, slot))
        # A plan from scratch serves the group the slot holds first if it has requests left (`_warm_first`).
        if self.switches and held is not None and (not line or self.groups[line[0][0]] != held):
            return False
        if line:
            key, finish = line.popleft()
            self.holds[(name, slot)] = self.groups[key]
            self.waiting.discard(key)
            grants[key] = name
            self.in_flight[name] += 1
            ends[slot] = finish
        else:
            self.idle.add((name, slot))
        return True

    def _ambiguous(self, name: str, r: float) -> bool:
        """Whether more than one slot of `name` could have ended at `r` and they differ in what they hold or
        what starts next on them."""
        ends, slots = self.ends[name], self.servers[name].slots
        could = [
            i
            for i, end in ends.items()
            if abs(end - r) <= self.on_time or ((name, i) in self.due and r <= end + self.on_time)
        ]
        return len({(self._next_group(name, i), slots[i].model, slots[i].chain[:1]) for i in could}) > 1

    def _next_group(self, name: str, slot: int) -> str | None:
        """The prefix group of the request reserved next on `slot` of `name` (None: it goes idle)."""
        line = self.booked.get((name, slot))
        return self.groups[line[0][0]] if line else None

    def _shift(self, name: str, slot: int, delta: float) -> None:
        """The request on a slot ended `delta` seconds after its expected end: so do the ones reserved behind it."""
        line = self.booked.get((name, slot))
        if line:
            self.booked[(name, slot)] = deque((key, finish + delta) for key, finish in line)
        self.search.move(name, slot, self.servers[name].slots[slot].free_at + delta)

    def extend(self, entries: Mapping[int, _Entry], r: float = 0.0) -> dict[int, Decision]:
        """`_earliest_finish` from where it stopped, until no slot is idle: those whose slot is idle start."""
        grants: dict[int, Decision] = {}
        while self.idle and self.pos < len(self.keys):
            key = self.keys[self.pos]
            self.pos += 1
            entry = entries.get(key)
            if entry is None or entry.bucket[0] not in self.cands:
                continue
            self.demand.planned(entry.req)
            self.planned.add(key)
            req = entry.req
            cands = self.cands[entry.bucket[0]]
            found = _placed(
                self.placement,
                req,
                cands,
                self.servers,
                lambda placed, req=req, cands=cands: self.search.best(  # type: ignore[misc]
                    req, cands, self.demand, self.placement if placed else None
                ),
            )
            if found is None:
                # Its group's slots are still another group's: they open as that group's queue empties, which
                # this plan does not follow. The next event plans the queue again.
                self.stale = self.stale or _group(req) in self.placement.placed
                continue
            name, fit = found
            at = (name, fit.slot)
            starts = at in self.idle
            lands = not starts or lands_as_planned(self.servers[name], fit.slot, req, self.demand)
            _take_lane(self.placement, req, found, self.servers, self.demand)
            self.search.reserve(name, fit, entry.req, self.demand)
            if fit.switch:  # the load drains the server's other slots: later releases there are not predicted
                self.stale = True
                slots = self.servers[name].slots
                self.idle -= {(name, i) for i, slot in enumerate(slots) if slot.free_at > r}
            self.idle.discard(at)
            if not lands and self.switches:
                self.stale = True  # it waits for the release due any moment; that event plans the queue afresh
            elif not lands:
                self.parked.setdefault(name, []).append((key, fit.slot, fit.finish, r))
                self.groups[key] = _group(entry.req)
                self.waiting.add(key)
            elif starts:
                grants[key] = name
                self.in_flight[name] += 1
                self.ends[name][fit.slot] = fit.finish
            else:
                self.booked.setdefault(at, deque()).append((key, fit.finish))
                self.groups[key] = _group(entry.req)
                self.waiting.add(key)
        return grants
