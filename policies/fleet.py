"""What the balancer knows about each server, and how each event changes it.

The balancer actor owns one `ServerStats` per server and calls these functions
on its events: a grant (`record_grant`), a lease coming back (`record_outcome`),
a health check (`record_probe`). Each server's `SlotIndex` (what its slots'
prefix caches hold, `teamorch.policies.prefix`) and its resident models are
kept here too: a grant takes the slot the server will choose and, for a model
not resident, predicts the load and the eviction it causes; a load reported
back clears that model's other slots; a health check drops what was evicted. Planning never reads `ServerStats` directly:
it reads the `ServerLoad` row `to_load` builds, which is a copy, so a plan can
neither see a half-updated server nor change one. Reading is pure: the 503 slot
penalty expires by the clock inside `to_load` (and `slot_penalty`), not by a
write when someone happens to look.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teamorch.config import RetryConfig, ServerConfig
from teamorch.messages import LeaseOutcome, LeaseRequest, ProbeResult, ServerLoad
from teamorch.policies.balancing import LOAD_PENALTY_SECONDS
from teamorch.policies.hedging import LatencyTail
from teamorch.policies.prefix import SlotIndex
from teamorch.policies.retry import CircuitBreaker

EWMA_ALPHA = 0.3
# Recent outcomes kept per server for its error rate (which the planner turns into a cost penalty).
ERROR_WINDOW = 20
# Diversity groups remembered (one per consensus round); the oldest are forgotten first.
MAX_GROUPS = 1000
# A prefill sample needs this many uncached prompt tokens: below it the fixed cost drowns the per-token rate.
MIN_PREFILL_SAMPLE = 32

OutcomeKind = Literal["ok", "busy", "cancelled", "failure"]


@dataclass
class ServerStats:
    """One server as the balancer has measured it.

    The fields named like `ServerLoad`'s are copied into every load row as they
    are (see `to_load`); the rest is state the row only shows derived:
    `outcomes` becomes `error_rate`, `slot_penalty`/`busy_until` become
    `effective_slots`, `breaker` becomes `circuit`, `ready_at` becomes
    `load_remaining`; `prefix` is read by planners through `SlotIndex.states`.
    `models_loaded` is kept least recently used first.
    """

    config: ServerConfig
    breaker: CircuitBreaker
    in_flight: int = 0
    healthy: bool = True
    models_present: list[str] | None = None
    models_loaded: list[str] | None = None
    ewma_token_seconds: float | None = None  # server-side seconds per output token
    ewma_ttft: float | None = None  # fixed cost of a warm request: everything but generating tokens
    ewma_latency: float | None = None  # whole request, client side (shown, not planned with)
    completed: int = 0
    failed: int = 0
    last_check: float | None = None
    last_error: str | None = None
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=ERROR_WINDOW))
    # Slots taken away after a 503 (someone else is using the box), until `busy_until` (monotonic seconds).
    slot_penalty: int = 0
    busy_until: float = 0.0
    ewma_prefill_seconds: float | None = None  # server-side seconds per uncached prompt token
    ewma_load_seconds: float | None = None
    resident_limit: int = 1
    loading_model: str | None = None
    ready_at: float = 0.0  # monotonic seconds when `loading_model` is expected to be ready
    prefix: SlotIndex = field(default_factory=lambda: SlotIndex(1))
    # Slots a restarted balancer cannot account for (leases granted before it died), until `unaccounted_until`.
    unaccounted: int = 0
    unaccounted_until: float = 0.0
    tail: LatencyTail = field(default_factory=LatencyTail)  # latency / expected, per size class (hedging)
    remembered: bool = False  # the EWMAs are a previous run's (`recall`) until this run's first answer

    @classmethod
    def new(cls, config: ServerConfig, retry: RetryConfig) -> ServerStats:
        """A server nothing is known about yet, except the models its config lists."""
        return cls(
            config=config,
            breaker=CircuitBreaker(retry.circuit_failures, retry.circuit_reset),
            models_present=list(config.models) if config.models is not None else None,
            prefix=SlotIndex(config.slots),
        )


# The ServerLoad fields a stats record holds under the same name, copied as they are.
_SHARED_FIELDS = tuple(
    name for name in ServerLoad.model_fields if name in {f.name for f in dataclasses.fields(ServerStats)}
)


def slot_penalty(stats: ServerStats, now: float) -> int:
    """Slots withheld right now after 503s: none once the back-off has run out."""
    return stats.slot_penalty if now < stats.busy_until else 0


def unaccounted(stats: ServerStats, now: float) -> int:
    """Slots still held by leases from before a balancer restart, as far as anyone can tell at `now`."""
    return stats.unaccounted if now < stats.unaccounted_until else 0


def to_load(stats: ServerStats, now: float, waiting: int) -> ServerLoad:
    """The row planners read: a copy of `stats` at `now`, with the derived fields worked out.

    Slots a restarted balancer cannot account for count as in flight, so no
    planner hands them out twice.
    """
    outcomes = stats.outcomes
    shared = {name: getattr(stats, name) for name in _SHARED_FIELDS}
    shared["in_flight"] = stats.in_flight + unaccounted(stats, now)
    return ServerLoad(
        name=stats.config.name,
        slots=stats.config.slots,
        tags=stats.config.tags,
        effective_slots=max(1, stats.config.slots - slot_penalty(stats, now)),
        waiting=waiting,
        circuit=stats.breaker.state(now),
        error_rate=(outcomes.count(False) / len(outcomes)) if outcomes else 0.0,
        load_remaining=max(0.0, stats.ready_at - now) if stats.loading_model else 0.0,
        **shared,
    )


def load_fresh_until(stats: ServerStats, now: float) -> float:
    """Until when (monotonic seconds) `to_load(stats, now, ...)` reads the same if nothing happens to `stats`.

    The clock alone changes a row when a 503 back-off, an unaccounted slot or
    an open circuit runs out, and while a model loads (its remaining time).
    So the balancer can keep a row between events and rebuild it only then.
    """
    if stats.loading_model:
        return now
    ends = [stats.busy_until, stats.unaccounted_until]
    if stats.breaker.opened_at is not None:
        ends.append(stats.breaker.opened_at + stats.breaker.reset)
    return min((end for end in ends if end > now), default=float("inf"))


def record_restart(stats: ServerStats, now: float) -> None:
    """The balancer came back from a crash knowing nothing of the leases it had granted.

    Those requests may still be running, and granting their slots again would
    put more than `slots` requests on the server, the one thing admission
    control promises never to do. So every slot counts as busy until it is
    shown free: each pre-restart lease that comes back (`record_orphan_release`)
    frees one. A lease whose specialist died too never comes back; after
    `read_timeout` (the longest a stalled request holds its slot before its
    owner gives up on it) the rest are assumed free, so a lost lease costs
    capacity for a bounded time, not forever. Erring this way costs some idle
    seconds; erring the other way costs a server queueing without bound.
    """
    stats.unaccounted = stats.config.slots
    stats.unaccounted_until = now + stats.config.read_timeout


def record_orphan_release(stats: ServerStats, now: float) -> None:
    """A lease granted before the balancer restarted came back: one unaccounted slot is free."""
    stats.unaccounted = max(0, unaccounted(stats, now) - 1)


def is_cold(stats: ServerStats, model: str) -> bool:
    """Whether a request for `model` granted now pays a model load (known to be not loaded)."""
    return stats.models_loaded is not None and model not in stats.models_loaded


@dataclass(frozen=True)
class Placement:
    """Where a granted request went on its server, as the balancer predicts it.

    `slot`: the slot the server will give it (None: not tracked); `cached`: its
    prompt tokens that slot already holds; `cold`: the model was not loaded,
    so the request pays a load; `prompt_tokens`: its whole prompt.
    """

    slot: int | None = None
    cached: int = 0
    cold: bool = False
    prompt_tokens: int = 0


def record_grant(
    stats: ServerStats, now: float, req: LeaseRequest | None = None, drain: float = 0.0, after: int | None = None
) -> Placement:
    """A slot is taken for `req`: the slot its prompt will use, and the model load it causes.

    `drain`: seconds until the requests running there now end; a load that
    evicts a model waits for them (as Ollama does). `after`: the busy slot
    whose request it was granted behind (an early grant), else it takes the
    free slot the server would choose.
    """
    stats.in_flight += 1
    stats.breaker.on_acquire(now)
    if req is None:
        return Placement()
    cold = is_cold(stats, req.model)
    _hold_model(stats, req.model, now, drain)
    if after is not None:
        slot, cached = after, stats.prefix.follow(after, req.model, req.prefix, req.prefix_tokens)
    else:
        slot, cached = stats.prefix.take(req.model, req.prefix, req.prefix_tokens)
    return Placement(slot, cached, cold, req.prompt_tokens)


def _base(model: str) -> str:
    return model.removesuffix(":latest")


def _hold_model(stats: ServerStats, model: str, now: float, drain: float) -> None:
    """`model` becomes the most recently used; loading it evicts the least recently used beyond `resident_limit`."""
    loaded = stats.models_loaded
    if loaded is None:
        return
    if model in loaded:
        stats.models_loaded = [m for m in loaded if _base(m) != _base(model)] + [
            m for m in loaded if _base(m) == _base(model)
        ]
        return
    kept = list(loaded)
    evicted = False
    while kept and len({_base(m) for m in kept}) >= stats.resident_limit:
        victim = _base(kept[0])
        kept = [m for m in kept if _base(m) != victim]
        stats.prefix.forget([victim, f"{victim}:latest"])
        evicted = True
    stats.models_loaded = [*kept, model]
    stats.loading_model = model
    load = stats.ewma_load_seconds if stats.ewma_load_seconds is not None else LOAD_PENALTY_SECONDS
    stats.ready_at = now + (drain if evicted else 0.0) + load


def outcome_kind(outcome: LeaseOutcome) -> OutcomeKind:
    """What a lease's end says about its server.

    busy (a 503): the server works but someone else fills it, so back off, do
    not blame it. cancelled: the caller gave up, which says nothing about the
    server. Every other error is the server's failure.
    """
    if outcome.outcome in ("ok", "busy", "cancelled"):
        return outcome.outcome
    return "failure"


def ewma(old: float | None, new: float, alpha: float = EWMA_ALPHA) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


def fixed_cost(outcome: LeaseOutcome) -> float | None:
    """Seconds of a request that were not spent generating tokens: prompt eval, transport, Ray hops.

    latency - eval_seconds measures exactly that; the client-side ttft would
    also include the first streamed chunk's tokens, so it is only the fallback
    when the server did not report its eval time. A model load the request
    waited for is not part of it: the planner charges loads on their own
    (`ewma_load_seconds`), and counted here it would make every later request
    on that server look that much slower.
    """
    if outcome.latency is not None and outcome.eval_seconds:
        return max(0.0, outcome.latency - outcome.eval_seconds - (outcome.load_seconds or 0.0))
    return outcome.ttft


def per_token_seconds(outcome: LeaseOutcome) -> float | None:
    """Generation seconds per output token: the server's own eval time, else client time after the first token."""
    if not outcome.tokens or not (outcome.eval_seconds or outcome.latency):
        return None
    seconds = outcome.eval_seconds if outcome.eval_seconds else (outcome.latency or 0.0) - (outcome.ttft or 0.0)
    return max(seconds / outcome.tokens, 1e-6)


def record_outcome(
    stats: ServerStats,
    outcome: LeaseOutcome,
    cold: bool,
    now: float,
    backoff_seconds: float,
    placed: Placement | None = None,
) -> None:
    """Account a lease that came back: its slot frees, and the server's speed and health are updated.

    `cold`: the model was not loaded when the lease was granted, so the request
    paid a model load and is not a sample of the server's fixed cost.
    `placed`: what `record_grant` predicted for it (slot, cached tokens).
    """
    placed = placed or Placement(cold=cold)
    free_slot(stats, outcome, placed)
    learn_outcome(stats, outcome, cold, now, backoff_seconds, placed)


def free_slot(stats: ServerStats, outcome: LeaseOutcome, placed: Placement) -> None:
    """The slot of a lease that came back is free again (forgetting its cache if the request failed).

    Apart from what the outcome teaches (`learn_outcome`), so the balancer can
    free it first: an error in the learning must not keep a slot, or every
    request waiting for it waits until its deadline.
    """
    stats.in_flight -= 1
    stats.prefix.release(placed.slot, known=outcome.ok)


def learn_outcome(
    stats: ServerStats,
    outcome: LeaseOutcome,
    cold: bool,
    now: float,
    backoff_seconds: float,
    placed: Placement,
    gated: bool = False,
) -> None:
    """What an outcome says about its server (speed, health, residency); its slot is freed by `free_slot`.

    `gated`: the request waited at its server actor's gate (an early grant).
    That wait is known only as the balancer saw it, lease delivery and event
    loop lag included, which for a short request is as long as its fixed
    cost; so its fixed cost is read from its time to first token (measured
    past the gate), as when a server reports no eval time (`fixed_cost`).
    """
    kind = outcome_kind(outcome)
    _record_residency(stats, outcome, placed)
    if kind != "cancelled":
        stats.breaker.record(outcome.ok, outcome.outcome, now)
    if kind == "ok":
        _record_success(stats, outcome, cold, placed, gated)
    elif kind == "busy":
        # 503: the server's own queue is full (someone else is using it). Back off its slots for a while;
        # a penalty whose back-off has run out no longer counts.
        stats.slot_penalty = min(stats.config.slots - 1, slot_penalty(stats, now) + 1)
        stats.busy_until = now + backoff_seconds
    elif kind == "failure":
        stats.failed += 1
        stats.outcomes.append(False)
        stats.last_error = outcome.error
        if outcome.outcome == "unreachable":
            stats.healthy = False


def _record_residency(stats: ServerStats, outcome: LeaseOutcome, placed: Placement) -> None:
    """A load done clears the model's other slots."""
    if stats.loading_model == outcome.model and (placed.cold or outcome.load_seconds):
        stats.loading_model = None
    if outcome.load_seconds:  # the model was (re)loaded for this request: its other slots start empty
        stats.ewma_load_seconds = ewma(stats.ewma_load_seconds, outcome.load_seconds)
        stats.prefix.forget([outcome.model], keep=placed.slot)


def uncached_tokens(outcome: LeaseOutcome, placed: Placement) -> int | None:
    """Prompt tokens the server evaluated, in teamorch's token count (None: not known).

    The server counts its own tokens; the fraction it did not find cached is
    applied to teamorch's count, so prefill seconds per token are in the unit
    the planner multiplies them by.
    """
    if outcome.prompt_tokens and outcome.cached_tokens is not None:
        fraction = max(0, outcome.prompt_tokens - outcome.cached_tokens) / outcome.prompt_tokens
        return round((placed.prompt_tokens or outcome.prompt_tokens) * fraction)
    if placed.prompt_tokens:
        return placed.prompt_tokens - placed.cached
    return None


def _record_success(
    stats: ServerStats, outcome: LeaseOutcome, cold: bool, placed: Placement, gated: bool = False
) -> None:
    stats.completed += 1
    stats.outcomes.append(True)
    alpha = REMEMBERED_ALPHA if stats.remembered else EWMA_ALPHA  # this run's first answer outweighs the last run's
    stats.remembered = False
    per_token = per_token_seconds(outcome)
    if per_token is not None:
        stats.ewma_token_seconds = ewma(stats.ewma_token_seconds, per_token, alpha)
    uncached = uncached_tokens(outcome, placed)
    if outcome.prompt_eval_seconds is not None and uncached is not None and uncached >= MIN_PREFILL_SAMPLE:
        stats.ewma_prefill_seconds = ewma(stats.ewma_prefill_seconds, outcome.prompt_eval_seconds / uncached, alpha)
    fixed = outcome.ttft if gated else fixed_cost(outcome)
    if fixed is not None and uncached and stats.ewma_prefill_seconds is not None:
        fixed = max(0.0, fixed - uncached * stats.ewma_prefill_seconds)  # the planner adds prefill per token itself
    if fixed is not None and not cold:
        stats.ewma_ttft = ewma(stats.ewma_ttft, fixed, alpha)
    if outcome.latency is not None:
        stats.ewma_latency = ewma(stats.ewma_latency, outcome.latency)
    if outcome.model and is_cold(stats, outcome.model):
        stats.models_loaded = [*(stats.models_loaded or []), outcome.model]


def record_latency(
    tails: Sequence[LatencyTail], outcome: LeaseOutcome, expected: float, tokens: int, hedged: bool = False
) -> None:
    """One call's latency against what was expected of it, for the hedging tail (`policies.hedging`).

    Answers count; so does a call cancelled because a hedge beat it (`hedged`):
    it ran at least that long, and leaving stragglers out would pull the tail
    down after every hedge and hedge ever more. Other failures say nothing
    about how long a request takes. `tokens` is the size the call was expected
    to have, the one a hedge decision knows.
    """
    if expected <= 0 or outcome.latency is None or not (outcome.ok or (hedged and outcome.outcome == "cancelled")):
        return
    for tail in tails:
        tail.add(tokens, outcome.latency / expected)


def record_probe(stats: ServerStats, probe: ProbeResult, now: float | None = None) -> None:
    """Take in one health check; a model list the protocol cannot report (None) keeps what is known.

    `now` (monotonic seconds) lets a healthy answer end an open circuit early
    (`CircuitBreaker.answered`): a server that came back is in rotation again
    within one `poll_interval` rather than after the whole `circuit_reset`.
    """
    stats.healthy = probe.healthy
    stats.last_check = probe.checked_at
    if not probe.healthy:
        stats.last_error = probe.error
        return
    if now is not None:
        stats.breaker.answered(now)
    if probe.models_present is not None:
        stats.models_present = probe.models_present
    if probe.models_loaded is not None and stats.loading_model is None:
        # While a granted load is under way the server may not list the model yet: the prediction stands.
        now_loaded = probe.models_loaded
        stats.resident_limit = max(stats.resident_limit, len({_base(m) for m in now_loaded}))
        stats.prefix.forget(stats.prefix.models() - set(now_loaded))
        known = [m for m in stats.models_loaded or () if m in now_loaded]
        stats.models_loaded = known + [m for m in now_loaded if m not in known]  # least recently used first


# ---- fleet memory: what one run learned, as the next run's prior -----------------------------------------------

MEMORY_VERSION = 1
# Remembered figures older than this are dropped: a box may have been upgraded, moved or given other work since.
MEMORY_MAX_AGE = 7 * 24 * 3600.0
# Weight of this run's first answer against a remembered figure (an ordinary update gives a new sample EWMA_ALPHA):
# the prior only has to get the first plans right, and fresh measurements should take over at once.
REMEMBERED_ALPHA = 0.7


# `balancer.measure_first`: the speed probe a server never measured answers before the first plan. Enough prompt and
# output for a prefill and a token rate, little enough to cost the run one tiny request per server.
PROBE_WORDS, PROBE_TOKENS = 32, 8


def probe_prompt(server: str) -> str:
    """The probe's prompt: named after its server (its request log says what it was), shared with no task."""
    return f"Speed probe for {server}: " + " ".join(f"w{i}" for i in range(PROBE_WORDS))


def probe_model(stats: ServerStats, models: Sequence[str]) -> str | None:
    """The model a server's speed probe uses: the first of the team's `models` it holds already; None when it is
    not to be probed (unhealthy, measured already, or holding none of them: the probe would pay, and maybe evict
    for, a load). The balancer actor and `benchmarks.replay` both ask this."""
    if not stats.healthy or stats.ewma_token_seconds is not None:
        return None
    loaded = stats.models_loaded
    return next((m for m in models if loaded is None or m in loaded), None)


class RememberedServer(BaseModel):
    """What is carried from one run to the next for one server: its speeds, nothing about its health.

    Speeds are properties of the box and its model, stable across runs; an
    open circuit, an error rate or a 503 back-off describe a moment and would
    keep a recovered server out of the next run, so they start fresh.
    """

    model_config = ConfigDict(extra="ignore")
    token_seconds: float = Field(gt=0)  # seconds per output token
    ttft: float | None = Field(default=None, ge=0)  # fixed cost of a warm request
    prefill_seconds: float | None = Field(default=None, ge=0)  # seconds per uncached prompt token
    load_seconds: float | None = Field(default=None, ge=0)  # one model load
    samples: int = Field(default=0, ge=0)  # answers behind these figures in the run that saved them
    measured_at: float  # epoch seconds of that run's save


class FleetMemory(BaseModel):
    """The file: per server key (`memory_key`: name, protocol and address), its remembered speeds."""

    model_config = ConfigDict(extra="ignore")
    version: Literal[1] = MEMORY_VERSION
    servers: dict[str, RememberedServer] = Field(default_factory=dict)


def memory_key(config: ServerConfig) -> str:
    """Name, protocol and where it is: a server renamed, moved or switched to another box is not trusted."""
    return f"{config.name} {config.protocol} {config.url or config.model_path or 'embedded'}"


def parse_memory(text: str) -> FleetMemory:
    """The memory file's contents; `ValueError` saying what is wrong when it is not one this version wrote."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict) or raw.get("version") != MEMORY_VERSION:
        found = raw.get("version") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"version {found!r}, this teamorch reads version {MEMORY_VERSION}")
    try:
        return FleetMemory.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None


def recall(stats: ServerStats, memory: FleetMemory, now: float) -> bool:
    """Start `stats` from what the memory holds for its server, if that is not older than MEMORY_MAX_AGE.

    Only a server not measured yet is primed, so a restarted balancer's
    fresh figures are never overwritten. `now` is epoch seconds.
    """
    entry = memory.servers.get(memory_key(stats.config))
    if entry is None or now - entry.measured_at > MEMORY_MAX_AGE or stats.ewma_token_seconds is not None:
        return False
    stats.ewma_token_seconds = entry.token_seconds
    stats.ewma_ttft = entry.ttft
    stats.ewma_prefill_seconds = entry.prefill_seconds
    stats.ewma_load_seconds = entry.load_seconds
    stats.remembered = True
    return True


def remember(servers: Iterable[ServerStats], memory: FleetMemory | None, now: float) -> FleetMemory:
    """The memory to save: `memory` with every server that answered in this run updated, stale entries dropped.

    A server with no answer in this run keeps its entry as it was (with its
    age), so a server idle for a week is forgotten, not kept fresh by copies;
    other teams' servers in the same file are kept.
    """
    kept = {k: v for k, v in (memory.servers if memory else {}).items() if now - v.measured_at <= MEMORY_MAX_AGE}
    for stats in servers:
        if stats.completed and stats.ewma_token_seconds is not None:
            kept[memory_key(stats.config)] = RememberedServer(
                token_seconds=stats.ewma_token_seconds,
                ttft=stats.ewma_ttft,
                prefill_seconds=stats.ewma_prefill_seconds,
                load_seconds=stats.ewma_load_seconds,
                samples=stats.completed,
                measured_at=now,
            )
    return FleetMemory(servers=kept)


def newest(ours: FleetMemory, theirs: FleetMemory) -> FleetMemory:
    """Both files' servers, each from whichever measured it last.

    Two teams (or two `teamorch run`s) may share one memory file; each read it
    at its start, so writing its own copy back would drop what the other
    saved in between. Merging with the file as it is at write time keeps both.
    """
    merged = dict(theirs.servers)
    for key, entry in ours.servers.items():
        if key not in merged or entry.measured_at >= merged[key].measured_at:
            merged[key] = entry
    return FleetMemory(servers=merged)


class GroupServers:
    """Which servers each diversity group (e.g. one consensus round) already holds, newest groups last.

    Bounded (`limit` groups): a group is only useful while its round runs, and
    the balancer never learns when that ends.
    """

    def __init__(self, limit: int = MAX_GROUPS) -> None:
        self.limit = limit
        self._held: OrderedDict[str, set[str]] = OrderedDict()

    def with_avoid(self, req: LeaseRequest) -> LeaseRequest:
        """`req`, asked to avoid the servers its group already holds (itself when it has no group or none)."""
        used = self._held.get(req.group or "")
        return req.model_copy(update={"avoid": [*req.avoid, *sorted(used)]}) if used else req

    def add(self, group: str, server: str) -> None:
        self._held.setdefault(group, set()).add(server)
        self._held.move_to_end(group)
        while len(self._held) > self.limit:
            self._held.popitem(last=False)
