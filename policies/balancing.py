"""Which server gets the next request: pure functions over a load snapshot.

The balancer actor owns the live table and calls `choose()`; everything here is
plain Python so each rule can be tested in microseconds with hand-built
snapshots. `choose()` answers with a server name, or `None` meaning "wait":
admission control lives here too, because a loaded Ollama model queues excess
requests without bound and its 503 arrives too late to help.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseRequest, ServerLoad

POLICIES = ("round_robin", "least_loaded", "capability", "peak_ewma")

# Priors for a server nobody has measured yet: optimistic, so new servers get tried.
PRIOR_TOKEN_SECONDS = 0.02
PRIOR_TTFT = 0.2
DEFAULT_EXPECTED_TOKENS = 256
# A model that is present but not loaded costs a load before the first token.
LOAD_PENALTY_SECONDS = 5.0
# Above this many candidates peak_ewma samples two (power of two choices) instead of scanning all.
P2C_THRESHOLD = 8


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


def expected_seconds(s: ServerLoad, req: LeaseRequest, fleet: Sequence[ServerLoad] = ()) -> float:
    """Service time of `req` on `s` alone: time to first token + tokens x seconds/token (+ a model load)."""
    known_tps = [f.ewma_token_seconds for f in fleet if f.ewma_token_seconds is not None]
    known_ttft = [f.ewma_ttft for f in fleet if f.ewma_ttft is not None]
    tps = s.ewma_token_seconds
    if tps is None:
        tps = min(known_tps) if known_tps else PRIOR_TOKEN_SECONDS
    ttft = s.ewma_ttft
    if ttft is None:
        ttft = min(known_ttft) if known_ttft else PRIOR_TTFT
    tokens = req.expected_tokens or DEFAULT_EXPECTED_TOKENS
    seconds = ttft + tps * tokens
    if s.models_loaded is not None and req.model not in s.models_loaded:
        seconds += LOAD_PENALTY_SECONDS
    return seconds * (1.0 + 4.0 * s.error_rate)


def peak_ewma_cost(s: ServerLoad, req: LeaseRequest, fleet: Sequence[ServerLoad] = ()) -> float:
    """Expected completion time: EWMA latency x (in-flight + 1) / slots.

    A full server still gets a cost, so a fast busy server can beat a slow idle
    one: the caller then waits for the fast server instead of starting a
    request that will finish later anyway.
    """
    slots = max(1, s.effective_slots)
    return expected_seconds(s, req, fleet) * max(1.0, (s.in_flight + 1) / slots)


def _prefer(cands: list[ServerLoad], keep: list[ServerLoad]) -> list[ServerLoad]:
    return keep if keep else cands


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
    cands = eligible(loads, req)
    if req.avoid:
        cands = _prefer(cands, [s for s in cands if s.name not in req.avoid])
    free = [s for s in cands if has_capacity(s)]
    if affinity:
        loaded = [s for s in free if s.models_loaded is not None and req.model in s.models_loaded]
        free = _prefer(free, loaded)

    if policy == "peak_ewma":
        pool = list(cands)
        if len(pool) > P2C_THRESHOLD:
            pool = rng.sample(pool, 2) + [s for s in free[:1]]
        if not pool:
            return None
        best = min(pool, key=lambda s: (peak_ewma_cost(s, req, loads), rng.random()))
        if has_capacity(best):
            return best.name
        if free:
            fallback = min(free, key=lambda s: peak_ewma_cost(s, req, loads))
            if waited >= peak_ewma_cost(best, req, loads):
                return fallback.name
            # An idle server that finishes sooner than the busy favourite is still a win.
            if expected_seconds(fallback, req, loads) < peak_ewma_cost(best, req, loads):
                return fallback.name
        return None

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
