"""Hedging the tail: when a running call has become a straggler, and where its one duplicate goes.

The rule is the one of "The Tail at Scale" (Dean and Barroso, 2013) and of
Envoy's and gRPC's hedging policies: a request still running past a high
quantile (p95) of the latency its server usually shows gets a second copy on
another server; the first answer wins and the other is cancelled. What a
model fleet changes is "usual latency": requests differ in size by 100x, so
the quantile is kept of the *ratio* actual / expected seconds, where expected
is the balancer's own cost model for that request on that server
(`policies.balancing.planned_seconds`). A ratio is comparable across sizes and
servers; it is still kept per size class (`LatencyTail`), because a cost model
is rarely equally wrong for a 20-token answer and a 1,000-token one.

`hedge_delay` says, at grant time, how long a call may run before it counts as
a straggler: expected seconds x the ratio's quantile on its server, never above
the fleet's quantile for the same size (a server slow so often that its slow
spells own its p95 would otherwise never be hedged), never below
`hedge_min_seconds`. `decide_hedge` says, once that time has passed, whether a
duplicate starts now and where, or when to ask again, weighing the copy's
expected time against how long the straggler is likely to run on
(`remaining_seconds`, from the same ratios). `wasted_tokens` puts a number on
what a cancelled loser cost.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from teamorch.config import BalancerConfig
from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import (
    DEFAULT_EXPECTED_TOKENS,
    eligible,
    has_capacity,
    honour_avoid,
    planned_seconds,
)

# Ratios kept per size class and server: enough for a p95 to be a real sample, small enough to follow change.
WINDOW = 64
# Size classes by expected output tokens: < 32, 32-63, 64-127, ..., >= 1024.
SIZE_CLASSES = 7
# How soon to ask again when nothing can take a hedge right now (the balancer's re-planning tick).
RECHECK_SECONDS = 0.25


def size_class(tokens: int) -> int:
    """The class of a request expecting `tokens` output tokens (powers of two from 32 up)."""
    return min(SIZE_CLASSES - 1, max(0, int(math.log2(max(tokens, 1))) - 4))


def expected_tokens(req: LeaseRequest) -> int:
    """The size the planner assumes for `req` (its `num_predict`, else the planner's default)."""
    return req.expected_tokens or DEFAULT_EXPECTED_TOKENS


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: the answer is a ratio that was measured)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


@dataclass
class LatencyTail:
    """Bounded windows of latency ratios (actual / expected seconds), one per size class.

    Memory is `SIZE_CLASSES x window` floats whatever the run length; the
    oldest ratios fall out first, so the tail follows a server that changes.
    """

    window: int = WINDOW
    classes: list[deque[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = [deque(maxlen=self.window) for _ in range(SIZE_CLASSES)]

    def add(self, tokens: int, ratio: float) -> None:
        self.classes[size_class(tokens)].append(ratio)

    def quantile(self, tokens: int, q: float, min_samples: int) -> float | None:
        """The `q` quantile of ratios for requests of this size; all sizes pooled while the class has too few
        samples; None while even the pool has fewer than `min_samples` (an unknown tail is never hedged)."""
        own = self.classes[size_class(tokens)]
        if len(own) >= min_samples:
            return quantile(own, q)
        pooled = [r for c in self.classes for r in c]
        return quantile(pooled, q) if len(pooled) >= min_samples else None

    def excess(self, ratio: float) -> float | None:
        """How much longer (in expected durations) calls that ran past `ratio` went on, on average; None when
        none ever ran that long. All sizes pooled: slow spells are rare, and a spell slows every size alike."""
        beyond = [r - ratio for c in self.classes for r in c if r > ratio]
        return sum(beyond) / len(beyond) if beyond else None


def hedge_delay(
    server: LatencyTail, fleet: LatencyTail, expected: float, tokens: int, cfg: BalancerConfig
) -> float | None:
    """Seconds into a call (expected to take `expected` s, `tokens` long) after which it is a straggler.

    None: do not hedge it (hedging off, or its server's tail not measured yet).
    """
    if not cfg.hedge or expected <= 0:
        return None
    own = server.quantile(tokens, cfg.hedge_quantile, cfg.hedge_min_samples)
    if own is None:
        return None
    wide = fleet.quantile(tokens, cfg.hedge_quantile, cfg.hedge_min_samples)
    ratio = min(own, wide) if wide is not None else own
    return max(cfg.hedge_min_seconds, expected * ratio)


@dataclass(frozen=True)
class HedgeDecision:
    """Start the duplicate on `server` now, or (server None) ask again after `check_after` s (None: never)."""

    server: str | None
    check_after: float | None
    reason: str


def remaining_seconds(tail: LatencyTail, elapsed: float, expected: float) -> float:
    """How much longer a call that has run `elapsed` s (expected: `expected` s) is likely to run.

    From its server's own history: the calls there that ran at least this long
    (as a multiple of what was expected of them) ran on by `LatencyTail.excess`
    on average. A server whose slow spells run at a fraction of its speed ends
    them after a bounded time, and a copy on a slower server would lose the
    race; this says so. When no call there ever ran this long, nothing bounds
    it: as long again as it has run (the heavy-tail rule, right for a stall).
    """
    excess = tail.excess(elapsed / expected) if expected > 0 else None
    return elapsed if excess is None else excess * expected


def decide_hedge(
    loads: Sequence[ServerLoad],
    req: LeaseRequest,
    primary: str,
    remaining: float,
    waiting: int,
    already_hedged: bool,
    affinity: bool = True,
) -> HedgeDecision:
    """Whether a straggling call on `primary`, expected to run `remaining` s more, gets its duplicate now.

    * One hedge per attempt, ever: a second duplicate of a request whose two
      copies are both slow points at the request, not at a server.
    * Never while `waiting` requests are queued at the balancer: a hedge is
      paid for with idle capacity only. A free slot that a queued task could
      take belongs to that task; the straggler is asked about again later.
    * Only on another server that could run the request on its own: healthy,
      circuit not open, model present, required tags, not excluded by the
      task's failures, the task's pin honoured (a pinned task is never
      hedged), diversity groups preferred, and a slot free now.
    * Only if the copy is expected to finish before the primary
      (`remaining_seconds`): a copy that would lose the race only takes a
      slot. Its remaining time changes as it runs, so ask again shortly.
    """
    if already_hedged:
        return HedgeDecision(None, None, "already hedged once")
    if waiting:
        return HedgeDecision(None, RECHECK_SECONDS, f"{waiting} requests are queued: their slots come first")
    others = req.model_copy(update={"exclude": [*req.exclude, primary]})
    try:
        cands = honour_avoid(eligible(loads, others), others)
    except NoServerAvailable:
        return HedgeDecision(None, None, "no other server can run it")
    free = [s for s in cands if has_capacity(s)]
    if not free:
        return HedgeDecision(None, RECHECK_SECONDS, "no other server has a free slot")
    seconds = {s.name: planned_seconds(s, req, loads, affinity) for s in free}
    best = min(free, key=lambda s: (seconds[s.name], s.name)).name
    if seconds[best] >= remaining:
        why = f"a copy on {best} needs {seconds[best]:.2f}s; the call should end in {remaining:.2f}s"
        return HedgeDecision(None, RECHECK_SECONDS, why)
    return HedgeDecision(best, None, f"{remaining:.2f}s to go; a copy on {best} needs {seconds[best]:.2f}s")


def wasted_tokens(elapsed: float, expected: float | None, tokens: int) -> int:
    """What a cancelled race loser cost, in output tokens: the share of the answer (`tokens` long) its slot
    could have generated in `elapsed` seconds at the speed the balancer expected of it (all of it when the
    expectation is unknown). A slot held by a stalled server is capacity lost all the same."""
    if not expected or expected <= 0:
        return tokens
    return round(tokens * min(1.0, max(0.0, elapsed) / expected))
