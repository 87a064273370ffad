"""The live load table and the lease desk.

Specialists `acquire` a lease before calling a server and `release` it with
the outcome. The balancer never lets a server have more than its `slots`
requests in flight; everything else waits here, in class-then-priority-then-FIFO
order (`teamorch.policies.priority`: interactive runs before batch ones, with
aging), because a loaded Ollama model would queue the excess without bound. Every
decision is a policy's: which server a request gets and which waiting request
goes first (`teamorch.policies.balancing.Planner`: `plan_dispatch`'s decisions
over the whole queue, kept between events so an event costs what it changes,
with each server's slots and what their prefix caches hold), how long an arrival waits for its wave (`coalesce_delay`), one
server per diversity group (`apply_group_diversity`), and what an outcome says
about a server (`teamorch.policies.fleet.record_outcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import ray

from teamorch.actors import settle_heap
from teamorch.actors.leases import GrantBoxes, lease_outcome
from teamorch.actors.metrics import fleet_metrics
from teamorch.config import TeamConfig
from teamorch.errors import NoServerAvailable, ServerError, unwrap
from teamorch.messages import (
    ChatRequest,
    ChatResponse,
    HedgeAsk,
    HedgeGrant,
    Lease,
    LeaseAsk,
    LeaseCalls,
    LeaseCounters,
    LeaseGrant,
    LeaseGrants,
    LeaseOutcome,
    LeaseRequest,
    ProbeResult,
    ServerLoad,
)
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
    due_in,
    due_soon,
    early_lands,
    early_slot,
    eligible,
    has_capacity,
    plan_dispatch,
    planned_seconds,
    wave_deadline,
)
from teamorch.policies.fleet import (
    PROBE_TOKENS,
    FleetMemory,
    GroupServers,
    Placement,
    ServerStats,
    free_slot,
    learn_outcome,
    load_fresh_until,
    newest,
    parse_memory,
    probe_model,
    probe_prompt,
    recall,
    record_grant,
    record_latency,
    record_orphan_release,
    record_probe,
    record_restart,
    remember,
    to_load,
)
from teamorch.policies.hedging import (
    WINDOW,
    LatencyTail,
    decide_hedge,
    expected_tokens,
    hedge_delay,
    remaining_seconds,
)
from teamorch.policies.prefix import SlotState, count_tokens
from teamorch.policies.retry import restarting_verdict

# Circuits turn half-open and requests age on the clock, not on events: the queue is re-planned this often.
TICK_SECONDS = 0.25
# The event loop sleeps in epoll, whose timeout is whole milliseconds: a shorter timer fires a millisecond late.
LOOP_TIMER_RESOLUTION = 0.001
# A long-lived team saves its fleet memory at least this often while it learns (and whenever the fleet goes idle).
MEMORY_SAVE_SECONDS = 60.0
# Releases are planned together when they come less than this apart (`_dispatch_soon`): a grant waits this at most.
ROUND_SECONDS = 0.002
# The longest the first plan waits for `measure_first`'s speed probes. A box still answering by then is slow: its
# probe runs on, holding its slot, and it joins the plan when it answers, as a never-measured server does (fleet B's
# slowest probe: ~0.3 s).
MEASURE_SECONDS = 2.0

log = logging.getLogger(__name__)


@dataclass
class _Lease:
    """A granted slot, and where on its server the request was predicted to go (`Placement`: slot, cache, load).

    An early grant (`policies.balancing.early_slot`) waits `behind` another
    lease on its slot: it starts (`granted`) when that one is expected to end,
    and `gate` records how long it really waited at the server actor, which
    is not the server's time and is taken out of what its outcome teaches.
    """

    server: str
    granted: float  # monotonic seconds it started, or is expected to start
    expected: float  # seconds the plan expected it to take
    placed: Placement
    key: str | None = None  # the (run, task, attempt) it was granted for, if the caller named one
    size: int = 0  # expected output tokens, kept for the hedging tail (0: hedging off, nothing to learn)
    hedged: bool = False  # a duplicate of its call was granted elsewhere (one per attempt)
    behind: str | None = None  # the lease whose slot it waits for, while that one runs
    issued: float = 0.0  # monotonic seconds it was granted
    gate: float = 0.0  # seconds it waited behind that lease
    ask: str | None = None  # the batched ask it was granted for: a re-sent copy of that ask is not granted again


@dataclass
class _Waiter:
    req: LeaseRequest
    capabilities: list[str]
    seq: int
    enqueued: float  # monotonic seconds
    future: asyncio.Future[Lease]
    key: str | None = None
    ask: str | None = None  # its batched ask's id (`lease_calls`), None for an `acquire`


class _OnFirstRead(Mapping[str, list[SlotState]]):
    """Every slot's cache state, built only if the planner reads it: a kept plan does not, and building it for
    hundreds of slots was a sixth of the balancer's time per event."""

    def __init__(self, build: Callable[[], dict[str, list[SlotState]]]) -> None:
        self._build = build
        self._data: dict[str, list[SlotState]] | None = None

    def _get(self) -> dict[str, list[SlotState]]:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, name: str) -> list[SlotState]:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class LoadBalancer:
    """The one owner of the fleet's live state; one per team.

    It exists because admission has to be decided in one place: many
    specialists share few slots, and only a single table of what is in flight
    keeps every server at or under its `slots`. It owns:

    * `servers`: per server, what has been measured (`ServerStats`: in flight,
      EWMAs, errors, circuit, models, what each slot's prefix cache holds),
      updated only through `policies.fleet`;
    * `waiters`: requests waiting for a slot, each with the future its
      `acquire` call awaits, by arrival number; `planner` holds the same
      queue in the order the policy plans it (and its last plan);
    * `leases`: granted slots not yet released, with when each was granted,
      how long it was expected to take and which server slot it took, so a
      plan can predict when a busy slot frees up and what it will hold;
    * `groups`: which servers each diversity group already holds;
    * `keyed` / `pending`: the lease held, or the request waiting, for each
      dispatch key, so a specialist that Ray restarted mid-task, asking again
      for the same task, gets the slot its dead predecessor held (or waits
      for the same grant) instead of taking a second one that nobody releases;
    * `epoch`: this incarnation's id, part of every lease id, so a lease
      granted before a restart is recognised when it comes back (and never
      mistaken for a new lease with the same number);
    * the health poll loop, the re-planning tick and the coalescing timer, and
      the server actors' `handles` it polls.
    """

    def __init__(self, team: TeamConfig, servers: dict[str, Any] | None = None) -> None:
        self.team = team
        self.policy = team.balancer.policy
        self.servers = {s.name: ServerStats.new(s, team.retry) for s in team.servers}
        self.handles = servers or {}
        self._restarting: dict[str, float] = {}  # server -> when its actor was first seen restarting
        self.waiters: dict[int, _Waiter] = {}
        cfg = team.balancer
        self.planner = Planner(
            self.policy,
            affinity=cfg.model_affinity,
            rng=random.Random(0),
            aging=cfg.aging_seconds,
            on_time=LIVE_ON_TIME,
            shift_within=LIVE_SHIFT_SECONDS,
            keep_seconds=LIVE_KEEP_SECONDS,
            drift=LIVE_SPEED_DRIFT,
        )
        self.leases: dict[str, _Lease] = {}
        self._on: dict[str, dict[str, _Lease]] = {name: {} for name in self.servers}  # `leases` by server
        self.groups = GroupServers()
        self.keyed: dict[str, str] = {}
        self.pending: dict[str, _Waiter] = {}
        self.epoch = uuid.uuid4().hex[:8]
        self.boxes = GrantBoxes(self.epoch)
        self.counters = LeaseCounters()
        self._asked: dict[str, tuple[asyncio.Future[Lease], bool]] = {}  # open batched asks: their future, own or not
        self._seq = itertools.count()
        self._rr = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._probing: set[asyncio.Task[None]] = set()
        self._coalescing: asyncio.Handle | None = None
        self._wave = (0.0, 0.0)  # monotonic seconds of the coalescing wait's first arrival, and when it plans
        self._soon: asyncio.Handle | None = None  # the round planned for the releases since the last one
        self._planned_at = 0.0  # monotonic seconds of the last planning round
        self._rows: dict[str, tuple[ServerLoad, float]] = {}  # `_table`'s rows, each with when the clock changes it
        self._shown_rows: dict[str, tuple[ServerLoad, ServerLoad]] = {}  # `_shown`: a `_table` row, and as shown
        self._next_due: float | None = None  # monotonic seconds when the next running lease becomes due
        self._ahead: dict[str, str] = {}  # lease id -> the early grant waiting behind it on its slot
        self._opened: dict[str, str] = {}  # server -> the due lease whose slot the last view showed free
        self._due_timer: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[None] | None = None
        self.tail = LatencyTail(window=4 * WINDOW)  # the whole fleet's latency ratios: caps each server's own
        fleet_memory = team.balancer.fleet_memory
        self._memory_path = Path(fleet_memory) if isinstance(fleet_memory, str) else None
        self._memory = self._recall()
        self._saving: asyncio.Task[None] | None = None
        self._learned = False  # an answer came back since the last save
        self._saved_at = time.monotonic()
        self._full = False  # an arrival found no free slot, and nothing has been released since
        if ray.get_runtime_context().was_current_actor_reconstructed:
            now = time.monotonic()
            for stats in self.servers.values():
                record_restart(stats, now)  # it cannot know what was in flight: every slot may be busy
        settle_heap()

    async def start(self) -> None:
        """Start the health/model poll loop and the re-dispatch tick (needs the actor's loop).

        Ray restarts a dead balancer by running its constructor again, not
        this; so every entry point calls it, and a restarted balancer probes
        the fleet before it grants anything.
        """
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._ready)  # every caller waits for the first probes, none cancels them

    async def _begin(self) -> None:
        self._tasks = [asyncio.create_task(self._poll_forever()), asyncio.create_task(self._tick_forever())]
        await self.poll_once()
        if self.team.balancer.measure_first and self.policy == "peak_ewma":  # the policy that plans by speeds
            await self._measure_first()

    async def _measure_first(self) -> None:
        """Each healthy server not yet measured answers one short speed probe before anything else is granted.

        Why: a planner that knows no server's speed gives each server's first
        slot a request blind, in the order the servers are listed, and where a
        specialist's long prompt lands first is where it stays cached. Replayed
        over every listing order of the shared-prefix fleets, that start met
        issue 10's targets in 1 of 6 orders of fleet B (20 of 24 of fleet D);
        measured first, in all of them, with one result per fleet whatever the
        order (`python -m benchmarks.replay --live --orders`, against
        `--blind`). The probes are real requests (they show in the server's
        log and the attempt metric). Not probed: a one-server fleet (nothing
        to choose), a server known from fleet memory, and one that holds none
        of the team's models yet (the probe would pay, and maybe evict for, a load).
        """
        if len(self.servers) < 2:
            return
        models = [s.model for s in self.team.specialists if s.model]
        targets = {name: probe_model(stats, models) for name, stats in self.servers.items() if name in self.handles}
        targets = {name: model for name, model in targets.items() if model is not None}
        if not targets:
            return
        probes = [asyncio.create_task(self._speed_probe(name, model)) for name, model in targets.items()]
        _done, late = await asyncio.wait(probes, timeout=MEASURE_SECONDS)
        for probe in late:  # held until it answers: the loop keeps only weak references to tasks
            self._probing.add(probe)
            probe.add_done_callback(self._probing.discard)

    async def _speed_probe(self, name: str, model: str) -> None:
        """One short request on `name` through the lease path (so its slot is accounted for), learned from as a
        specialist's attempt is; a failure is learned from too (the server's health)."""
        prompt = probe_prompt(name)
        req = LeaseRequest(model=model, server=name, expected_tokens=PROBE_TOKENS, prompt_tokens=count_tokens(prompt))
        future, _own = self._ask(req, None, None)
        try:
            lease = await future
        except NoServerAvailable:  # it went down or out of rotation since the health poll: nothing to measure
            return
        started = time.monotonic()
        chat = ChatRequest(
            model=model, messages=[{"role": "user", "content": prompt}], options={"num_predict": PROBE_TOKENS}
        )
        try:
            response: ChatResponse = await self.handles[name].chat.remote(chat)
            done = lease_outcome(lease.lease_id, "ok", model, started, response, None)
        except Exception as exc:
            cause = unwrap(exc)
            outcome = cause.error_class if isinstance(cause, ServerError) else "unreachable"
            done = lease_outcome(lease.lease_id, outcome, model, started, None, str(cause))
        if self._release(done):
            self._dispatch_soon()

    # ---- leases -------------------------------------------------------------------------

    async def acquire(self, req: LeaseRequest, capabilities: list[str] | None = None, key: str | None = None) -> Lease:
        """Wait for a server with a free slot; the lease already held for `key` if there is one.

        One Ray call per lease: the batched path (`lease_calls` + `granted`,
        `teamorch.actors.leases`) is what specialists use; both ask `_ask`.
        """
        await self.start()
        self.counters.acquire_calls += 1
        future, own = self._ask(req, capabilities, key)
        # A future shared with a dead incarnation's call is shielded: cancelling this call must not cancel that one.
        return self._hedgeable(await (future if own else asyncio.shield(future)), req)

    async def lease_calls(self, calls: LeaseCalls) -> None:
        """One client's loop turn of lease traffic, one way: releases first (they free slots the asks may take),
        then withdrawals, then asks, whose answers wait in the client's box for its poll (`granted`).

        An ask id already open here is a re-send (the client saw a new epoch, or Ray re-sent this call to a
        restarted balancer) and is dropped: each ask is granted once per incarnation.
        """
        await self.start()
        self.counters.lease_calls += 1
        self.counters.asks += len(calls.asks)
        if calls.released:
            await self.release_many(calls.released)
        for ask_id in calls.withdrawn:
            future, own = self._asked.get(ask_id, (None, False))
            if future is not None and own:
                # Still queued: it leaves the queue. Already granted: the grant still goes to the client's box
                # (it may be on its way), and the client, no longer asking, releases it unused.
                future.cancel()
        arrived: list[_Waiter] = []
        for ask in calls.asks:
            if ask.ask_id in self._asked:
                continue
            future, own = self._ask(ask.req, ask.capabilities, ask.key, ask.ask_id, arrived)
            self._asked[ask.ask_id] = (future, own)
            future.add_done_callback(partial(self._answer, calls.client, ask))
        # Planned once all are queued: the first arrival's round plans the whole batch (a burst of asks was a
        # planning round per ask until the slots were full), and the rest only check their eligibility.
        for waiter in arrived:
            if not waiter.future.done():
                self._dispatch(arrived=waiter)

    async def granted(self, client: str, epoch: str) -> LeaseGrants:
        """The long poll (`teamorch.actors.leases.GrantBoxes.collect`): every answer for `client` since its last
        poll, waiting while there is none; at once when `epoch` is not this incarnation's."""
        await self.start()
        return await self.boxes.collect(client, epoch)

    async def lease_counters(self) -> LeaseCounters:
        await self.start()
        return self.counters.model_copy(update={"polls": self.boxes.polls, "delivered": self.boxes.delivered})

    def _ask(
        self,
        req: LeaseRequest,
        capabilities: list[str] | None,
        key: str | None,
        ask: str | None = None,
        arrived: list[_Waiter] | None = None,
    ) -> tuple[asyncio.Future[Lease], bool]:
        """Queue one request (or find its key's lease or waiting twin); its future, and whether it is its own.

        A future that is not its own belongs to the waiting call of a dead
        incarnation with the same key (Ray does not cancel it): one grant serves both.
        A queued request is dispatched at once, or added to `arrived` for the caller to dispatch.
        """
        loop = asyncio.get_running_loop()
        held = self.keyed.get(key or "")
        if held in self.leases:
            done = loop.create_future()
            done.set_result(Lease(lease_id=held, server=self.leases[held].server))
            return done, True
        twin = self.pending.get(key or "")
        if twin is not None and not twin.future.done():
            return twin.future, False
        waiter = _Waiter(
            req, list(capabilities or []), next(self._seq), time.monotonic(), loop.create_future(), key, ask
        )
        if key:
            self.pending[key] = waiter
        self.waiters[waiter.seq] = waiter
        self.planner.add(waiter.seq, waiter.req, waiter.enqueued, waiter.capabilities)
        waiter.future.add_done_callback(partial(self._answered, waiter))
        if arrived is None:
            self._dispatch(arrived=waiter)
        else:
            arrived.append(waiter)
        return waiter.future, True

    def _answered(self, waiter: _Waiter, _future: asyncio.Future[Lease]) -> None:
        """Granted, refused or given up on: the request leaves the queue (the round may have taken it out already)."""
        self._unqueue(waiter)
        if waiter.key and self.pending.get(waiter.key) is waiter:
            del self.pending[waiter.key]

    def _answer(self, client: str, ask: LeaseAsk, future: asyncio.Future[Lease]) -> None:
        """Put a batched ask's grant or refusal in its client's box (nothing if it was withdrawn while queued).

        The ask stays known (`_asked`) while the lease granted for it is out:
        after a restart, Ray re-sends the lost call and the client its open
        asks, and the copy that comes second must not take a second slot.
        """
        if future.cancelled():
            self._asked.pop(ask.ask_id, None)
            return
        exc = future.exception()
        if exc is None:
            lease = future.result()
            if getattr(self.leases.get(lease.lease_id), "ask", None) != ask.ask_id:
                self._asked.pop(ask.ask_id, None)  # a lease of its key's, granted for another ask
            grant = LeaseGrant(ask_id=ask.ask_id, lease=self._hedgeable(lease, ask.req))
        else:
            self._asked.pop(ask.ask_id, None)
            grant = LeaseGrant(ask_id=ask.ask_id, refused=getattr(exc, "message", str(exc)))
        self.boxes.put(client, grant)

    def _hedgeable(self, lease: Lease, req: LeaseRequest) -> Lease:
        """With hedging on, `lease` says when its call becomes a straggler (`policies.hedging.hedge_delay`)."""
        held = self.leases.get(lease.lease_id)
        if not self.team.balancer.hedge or held is None:
            return lease
        held.size = expected_tokens(req)
        stats = self.servers[held.server]
        after = hedge_delay(stats.tail, self.tail, held.expected, held.size, self.team.balancer)
        return lease.model_copy(update={"hedge_after": after, "expected_seconds": held.expected})

    async def hedge(self, ask: HedgeAsk) -> HedgeGrant:
        """A duplicate for a straggling call, if `policies.hedging.decide_hedge` allows one now.

        The specialist asks (it holds the call and its deadline; the balancer
        only knows leases), at most once per `hedge_after`/`check_after`, so a
        call that ends in time costs no extra Ray hop. The duplicate gets an
        ordinary lease under its own key: asked again for that key (a
        restarted specialist), the same lease comes back.
        """
        await self.start()
        held = self.keyed.get(ask.key or "")
        if held in self.leases:
            return HedgeGrant(lease=Lease(lease_id=held, server=self.leases[held].server), reason="already granted")
        primary = self.leases.get(ask.lease_id)
        if not self.team.balancer.hedge or primary is None:
            return HedgeGrant(reason="hedging is off" if primary else "the call is over")
        now = time.monotonic()
        loads = self.snapshot_now(now)
        req = self.groups.with_avoid(ask.req)
        affinity = self.team.balancer.model_affinity
        remaining = remaining_seconds(self.servers[primary.server].tail, ask.elapsed, primary.expected)
        decision = decide_hedge(loads, req, primary.server, remaining, len(self.waiters), primary.hedged, affinity)
        if decision.server is None:
            return HedgeGrant(check_after=decision.check_after, reason=decision.reason)
        primary.hedged = True
        waiter = _Waiter(ask.req, [], next(self._seq), now, asyncio.get_running_loop().create_future(), ask.key)
        self._grant(waiter, decision.server, loads, now)
        lease = waiter.future.result()
        self.leases[lease.lease_id].size = primary.size
        return HedgeGrant(lease=lease, reason=decision.reason)

    async def release(self, done: LeaseOutcome) -> None:
        """Hand a slot back; the outcome updates the server's speed and health. Releasing twice is harmless."""
        await self.release_many([done])

    async def release_many(self, outcomes: list[LeaseOutcome]) -> None:
        """Several releases (a specialist sends those of one loop turn together), then one planning round for
        all the slots they free: per release, both the Ray call and the round were most of this actor's CPU.

        Each slot is free whatever goes wrong afterwards: an error while
        learning from an outcome is logged, never a slot lost (the requests
        waiting for it would wait until their deadline).
        """
        await self.start()
        freed = [self._release(done) for done in outcomes]  # every one released before planning
        if any(freed):
            self._dispatch_soon()

    def _release(self, done: LeaseOutcome) -> bool:
        """One release; True if it changed what can be granted (the caller plans the queue again)."""
        lease = self.leases.pop(done.lease_id, None)
        if lease is None:
            return self._orphan(done.lease_id)
        self._on[lease.server].pop(done.lease_id, None)
        try:
            self._settle(done, lease, time.monotonic())
        except Exception:
            log.exception(
                "lease %s on %s: its outcome was not learned from; its slot is free", done.lease_id, lease.server
            )
        return True

    def _settle(self, done: LeaseOutcome, lease: _Lease, now: float) -> None:
        """Free the lease's slot first (`free_slot`), then learn from its outcome."""
        stats = self.servers[lease.server]
        self._rows.pop(lease.server, None)
        placed = lease.placed
        try:
            if lease.key:
                self.keyed.pop(lease.key, None)
            if lease.ask:
                self._asked.pop(lease.ask, None)
            placed = self._hand_over(done.lease_id, lease, now)
        finally:
            free_slot(stats, done, placed)
        fleet_metrics().lease_released(lease.server, done)
        if lease.gate and done.latency is not None:  # the seconds at the gate were not the server's
            # Only the latency counts them: the time to first token is measured from the HTTP send, past the gate.
            done = done.model_copy(update={"latency": max(0.0, done.latency - lease.gate)})
        if lease.size:
            record_latency((stats.tail, self.tail), done, lease.expected, lease.size, lease.hedged)
        backoff = self.team.balancer.backoff_seconds
        learn_outcome(stats, done, lease.placed.cold, now, backoff, placed, gated=lease.gate > 0)
        self._learned = self._learned or done.ok
        if not self.leases and not self.waiters:
            self._save_memory()  # the fleet went idle (a cold run's end): keep what it taught
        if done.load_seconds:
            # A load may have evicted another model: ask the server now rather than at the next poll.
            probe = asyncio.create_task(self._probe(lease.server))
            self._probing.add(probe)  # held until done: the loop keeps only weak references to tasks
            probe.add_done_callback(self._probing.discard)

    def _dispatch_soon(self) -> None:
        """Plan once for the releases that arrive close together, not once per release.

        Each round reads the whole load table, so at thousands of releases a
        second one round per release was most of the balancer's time; Ray
        hands an actor each call in its own loop turn, so rounds are spaced
        ROUND_SECONDS apart at most: an idle balancer plans a release at once,
        a busy one plans each burst together (each round plans every freed slot).
        """
        if self._soon is None:
            self._soon = _after(self._planned_at + ROUND_SECONDS - time.monotonic(), self._dispatch_now)

    def _dispatch_now(self) -> None:
        self._soon = None
        self._dispatch()

    def _hand_over(self, lease_id: str, lease: _Lease, now: float) -> Placement:
        """A lease ends: an early grant waiting at its server's gate leaves it now (and keeps its slot if it was
        queued behind this one).

        Returns the placement to release: without its slot while another lease
        is placed on that slot, so the prefix index frees a slot only when no
        lease holds it.
        """
        follower = self.leases.get(self._ahead.pop(lease_id, ""))
        if follower is not None:
            follower.behind, follower.granted, follower.gate = None, now, now - follower.issued
            return replace(lease.placed, slot=None)
        if lease.behind is not None:  # it ended before the request it waited for: that one keeps the slot
            self._ahead.pop(lease.behind, None)
            return replace(lease.placed, slot=None)
        ahead_id = next((a for a in self._ahead if a in self.leases and self.leases[a].server == lease.server), None)
        if ahead_id is not None:
            # The gate is first come, first served: the early grant waiting on this server takes this slot now,
            # not the one it was queued behind. That lease then leaves its slot to it in the prefix index.
            follower = self.leases[self._ahead.pop(ahead_id)]
            follower.behind, follower.granted, follower.gate = None, now, now - follower.issued
            ahead = self.leases[ahead_id]
            ahead.placed = replace(ahead.placed, slot=None)
        return lease.placed

    def _orphan(self, lease_id: str) -> bool:
        """A lease this balancer never granted: one from before a restart frees a slot (True); a repeat release
        is moot."""
        parts = lease_id.rsplit("-", 2)  # server-epoch-seq (a server name may hold dashes itself)
        if len(parts) == 3 and parts[1] != self.epoch and parts[0] in self.servers:
            record_orphan_release(self.servers[parts[0]], time.monotonic())
            self._rows.pop(parts[0], None)
            return True
        return False

    def _unqueue(self, waiter: _Waiter, granted: float | None = None) -> None:
        """`waiter` leaves the queue: granted (at monotonic `granted`), refused or cancelled. Twice is harmless."""
        self.waiters.pop(waiter.seq, None)
        self.planner.remove(waiter.seq, granted)

    def _grant(self, waiter: _Waiter, name: str, loads: list[ServerLoad], now: float) -> None:
        self._unqueue(waiter, now)
        lease_id = f"{name}-{self.epoch}-{next(self._seq)}"
        stats = self.servers[name]
        row = next(s for s in loads if s.name == name)
        drain = self._drain(name, now)
        # No free slot left: this is the early grant the view offered, queued behind the lease that is due.
        ahead_id = self._opened.pop(name, None) if stats.in_flight >= row.effective_slots else None
        ahead = self.leases[ahead_id] if ahead_id else None
        placed = record_grant(stats, now, waiter.req, drain, ahead.placed.slot if ahead else None)
        self._rows.pop(name, None)
        expected = planned_seconds(row, waiter.req, loads, self.team.balancer.model_affinity, placed.cached)
        start = now + _left(ahead, now) if ahead else now
        self.leases[lease_id] = self._on[name][lease_id] = _Lease(
            name, start, expected, placed, waiter.key, behind=ahead_id, issued=now, ask=waiter.ask
        )
        if ahead_id:
            self._ahead[ahead_id] = lease_id
        elif self._next_due is None or now + due_in(expected) < self._next_due:
            self._next_due = now + due_in(expected)  # when this one becomes due (`_view` found the rest)
        if waiter.key:
            self.keyed[waiter.key] = lease_id
        fleet_metrics().lease_granted(name, now - waiter.enqueued)
        if waiter.req.group:
            self.groups.add(waiter.req.group, name)
        waiter.future.set_result(Lease(lease_id=lease_id, server=name))

    def _drain(self, name: str, now: float) -> float:
        """Expected seconds until every request in flight on `name` has ended (0 once overdue)."""
        return max((_left(lease, now) for lease in self._on[name].values()), default=0.0)

    def _caches(self, now: float) -> dict[str, list[SlotState]]:
        """Per server, each slot's prefix cache and, when busy, its request's expected remaining seconds."""
        remaining: dict[str, dict[int, float]] = {name: {} for name in self.servers}
        for lease in self.leases.values():
            if lease.placed.slot is not None:  # an early grant shares its slot with the lease ahead: the later end
                left = _left(lease, now)
                remaining[lease.server][lease.placed.slot] = max(
                    left, remaining[lease.server].get(lease.placed.slot, 0)
                )
        return {name: stats.prefix.states(remaining[name]) for name, stats in self.servers.items()}

    def _view(self, now: float) -> tuple[list[ServerLoad], Callable[[], dict[str, list[SlotState]]]]:
        """The fleet as the planners see it: the load table, and how to build the slot caches, with each server's
        early slot open.

        A server may take one request behind a running one that is due
        (`early_slot`): that slot is shown free now, with what the due request
        leaves in its cache; a request already queued behind one is not a
        slot in flight (the slot is counted once, busy until the later end).
        Which lease is due on each server is kept for `_grant`. The caches are
        built only if a planner reads them (`_OnFirstRead`).
        """
        loads = self._table(now)
        behind = self._behind()
        due, upcoming = self._due(now, behind)
        self._next_due = None if upcoming is None else now + upcoming
        self._opened = {}
        rows = []
        for row in loads:
            opened = early_slot(row, row.name in due, behind[row.name]) and early_lands(
                self.servers[row.name].prefix.slots,
                self.leases[due[row.name][1]].placed.slot or 0,
                row.ewma_prefill_seconds,
            )
            if opened:
                self._opened[row.name] = due[row.name][1]
            rows.append(self._shown(row, row.in_flight - behind[row.name] - opened))
        return rows, partial(self._open_caches, now, dict(self._opened))

    def _shown(self, row: ServerLoad, in_flight: int) -> ServerLoad:
        """`row` with `in_flight` slots in flight, the same object while neither changes: copying a row per round
        was a twentieth of the balancer's time, and a kept plan checks a new row's speeds for drift."""
        if in_flight == row.in_flight:
            return row
        kept = self._shown_rows.get(row.name)
        if kept is None or kept[0] is not row or kept[1].in_flight != in_flight:
            kept = self._shown_rows[row.name] = (row, row.model_copy(update={"in_flight": in_flight}))
        return kept[1]

    def _table(self, now: float) -> list[ServerLoad]:
        """The load table the planners read, each row kept until an event on its server or the clock changes it
        (`load_fresh_until`): building 100 rows per planning round was a fifth of the balancer's time.

        `waiting` is not filled in (no planner reads it; `snapshot_now` does).
        An unchanged row is the same object, which a kept plan checks first.
        """
        rows = []
        for name, stats in self.servers.items():
            kept = self._rows.get(name)
            if kept is None or now >= kept[1]:
                kept = self._rows[name] = (to_load(stats, now, 0), load_fresh_until(stats, now))
            rows.append(kept[0])
        return rows

    def _open_caches(self, now: float, opened: dict[str, str]) -> dict[str, list[SlotState]]:
        caches = self._caches(now)
        for name, lease_id in opened.items():
            slot = self.leases[lease_id].placed.slot or 0
            caches[name][slot] = replace(caches[name][slot], free_in=None)
        return caches

    def _behind(self) -> Counter[str]:
        """Per server, how many early grants wait behind a running lease (at most one per server)."""
        return Counter(self.leases[ahead].server for ahead in self._ahead)

    def _due(self, now: float, behind: Counter[str]) -> tuple[dict[str, tuple[float, str]], float | None]:
        """Per server with no request queued behind another yet, its running lease due soonest (seconds left, id);
        and the seconds until the next lease not yet due becomes due (None: none will)."""
        due: dict[str, tuple[float, str]] = {}
        upcoming: float | None = None
        for lease_id, lease in self.leases.items():
            if lease.placed.slot is None or lease.behind or lease_id in self._ahead or behind[lease.server]:
                continue
            left = lease.expected - (now - lease.granted)
            if due_soon(left, lease.expected):
                if left < due.get(lease.server, (float("inf"), ""))[0]:
                    due[lease.server] = (left, lease_id)
            elif due_in(left) > 0 and (upcoming is None or due_in(left) < upcoming):
                upcoming = due_in(left)
        return due, upcoming

    def _dispatch(self, arrived: _Waiter | None = None) -> None:
        """Grant, refuse or keep waiting every queued request, as `plan_dispatch` decides.

        A request that `arrived` is planned now only when no policy asks it to
        wait for its wave (`coalesce_delay`) and a slot is free; otherwise it is
        only checked for eligibility, which is all that can have changed for
        the rest of the queue. Once an arrival (or a round) found every slot
        taken, later arrivals skip even that until the next release, probe or
        tick (which refuses an ineligible one): with thousands queued, building
        the load table per arrival was the balancer's main cost.
        """
        now = time.monotonic()
        if arrived is not None:
            if self._full:
                return
            loads, _ = self._view(now)
            delay = coalesce_delay(self.policy, loads, arrived.req, self.team.balancer.model_affinity)
            if delay is not None or not any(has_capacity(s) for s in loads):
                try:
                    eligible(loads, arrived.req)  # only whether it can ever be served: no need to plan the queue
                except NoServerAvailable as exc:
                    arrived.future.set_exception(exc)
                    self._unqueue(arrived)
                    return
                if delay is not None:
                    self._coalesce(loads, now, delay)
                self._full = delay is None
                self._arm_due_timer()
                return
        self._full = False
        self._planned_at = now
        for _round in range(len(self.waiters) + 1):
            if not self.waiters or not self._dispatch_round(now):
                break
        self._arm_due_timer()

    def _arm_due_timer(self) -> None:
        """Plan again when the next running request becomes due, if anyone waits: no event marks that moment."""
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if not self.waiters or self._next_due is None:
            return
        wait = max(0.0, self._next_due - time.monotonic())
        self._due_timer = asyncio.get_running_loop().call_later(wait, self._became_due)

    def _became_due(self) -> None:
        self._due_timer = None
        self._dispatch()

    def _coalesce(self, loads: list[ServerLoad], now: float, delay: float) -> None:
        """Plan the queue when its wave has arrived (`wave_deadline`): arm the timer, or move it later."""
        first = self._wave[0] if self._coalescing is not None else now
        at = wave_deadline(loads, first, now, delay)
        if self._coalescing is not None:
            if at <= self._wave[1]:
                return
            self._coalescing.cancel()
        self._wave = (first, at)
        self._coalescing = _after(at - now, self._coalesced)

    def _coalesced(self) -> None:
        self._coalescing = None
        self._dispatch()

    def _dispatch_round(self, now: float) -> bool:
        """One planning round; True if a grant was held back and the queue must be planned again."""
        self.counters.rounds += 1
        loads, caches = self._view(now)
        self.planner.regroup(self.groups.with_avoid)
        decisions = self._plan(loads, caches, now)
        queue = {key: Queued(self.waiters[key].req) for key in decisions}  # for the groups: `avoid` plays no part
        decisions, held_back = apply_group_diversity(decisions, queue)
        for key, decision in decisions.items():
            waiter = self.waiters[key]
            if waiter.future.done():  # its acquire was cancelled and has not left the queue yet: nothing to grant
                self._unqueue(waiter)
            elif isinstance(decision, NoServerAvailable):
                self._unqueue(waiter)
                waiter.future.set_exception(NoServerAvailable(decision.message))
            else:
                self._grant(waiter, decision, loads, now)
        # The queue is planned: until a slot frees, an arrival changes nothing but its own eligibility.
        taken = Counter(d for d in decisions.values() if isinstance(d, str))
        self._full = bool(self.waiters) and not any(has_capacity(row, taken[row.name]) for row in loads)
        return held_back

    def _plan(
        self, loads: list[ServerLoad], caches: Callable[[], dict[str, list[SlotState]]], now: float
    ) -> dict[int, Decision]:
        """The planner's decisions by arrival number; `planner: reference` plans the whole queue from scratch."""
        counter = self._rr if self.policy == "round_robin" else None
        if self.team.balancer.planner == "incremental":
            return self.planner.plan(loads, now, caches=_OnFirstRead(caches), counter=counter)
        keyed = self.planner.queue(now)
        done = plan_dispatch(
            self.policy,
            loads,
            [q for _, q in keyed],
            caches=caches(),
            counter=counter,
            rng=self.planner.rng,
            affinity=self.team.balancer.model_affinity,
        )
        return {keyed[i][0]: d for i, d in done.items()}

    # ---- observation ----------------------------------------------------------------------

    def snapshot_now(self, now: float | None = None) -> list[ServerLoad]:
        now = time.monotonic() if now is None else now
        waiting = len(self.waiters)
        return [to_load(s, now, waiting) for s in self.servers.values()]

    async def snapshot(self) -> list[ServerLoad]:
        await self.start()
        return self.snapshot_now()

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._probe(name, dispatch=False) for name in self.servers))
        self._replan()

    async def _probe(self, name: str, dispatch: bool = True) -> None:
        handle = self.handles.get(name)
        if handle is None:
            return
        try:
            probe: ProbeResult = await handle.probe.remote()
            self._restarting.pop(name, None)
        except ray.exceptions.ActorUnavailableError:
            # Ray is restarting the server actor: it says nothing about the box, the next poll will; unless it
            # has been gone too long (its node lost), when it is out of rotation like any unreachable server.
            since = self._restarting.setdefault(name, time.monotonic())
            if restarting_verdict(since, time.monotonic()) == "busy":
                return
            why = f"server actor not back after {time.monotonic() - since:.0f}s (its node may be gone)"
            probe = ProbeResult(healthy=False, error=why, checked_at=time.time())
        except Exception as exc:  # the server actor itself died
            probe = ProbeResult(healthy=False, error=f"server actor lost: {exc}", checked_at=time.time())
        record_probe(self.servers[name], probe, time.monotonic())
        self._rows.pop(name, None)
        if dispatch:
            self._replan()

    async def _poll_forever(self) -> None:
        interval = min(s.config.poll_interval for s in self.servers.values()) if self.servers else 10.0
        while True:
            await asyncio.sleep(interval)
            await self.poll_once()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            fleet_metrics().fleet(self.snapshot_now())
            if time.monotonic() - self._saved_at > MEMORY_SAVE_SECONDS:
                self._save_memory()
            if self.waiters:
                self._replan()

    def _replan(self) -> None:
        """A tick's or a health poll's planning round: none while a wave is being gathered (`_coalesce`).

        The coalescing timer plans the wave whole soon after (COLD_WAVE_SECONDS
        at most). A tick that fell inside a team's first wave planned it
        partial: measured prefix fleet B, a first plan of 13 or 24 of the 64
        requests placed every slot's first prefix without the rest (1.35-1.41x
        the bound, 1.21x when the wave was planned whole).
        """
        if self._coalescing is None:
            self._dispatch()

    # ---- fleet memory ---------------------------------------------------------------------

    def _recall(self) -> FleetMemory | None:
        """Start every server from the fleet memory file, if there is a usable one; a bad file is only a warning."""
        path = self._memory_path
        if path is None or not path.exists():
            return None
        try:
            memory = parse_memory(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("fleet memory %s ignored (starting unmeasured; it is rewritten after this run): %s", path, exc)
            return None
        now = time.time()
        for stats in self.servers.values():
            recall(stats, memory, now)
        return memory

    def _save_memory(self) -> None:
        """Write what was learned in the background; one write at a time, the file replaced whole."""
        if self._memory_path is None or not self._learned or (self._saving is not None and not self._saving.done()):
            return
        self._learned = False
        self._saved_at = time.monotonic()
        self._memory = remember(self.servers.values(), self._memory, time.time())
        self._saving = asyncio.create_task(asyncio.to_thread(_write_memory, self._memory_path, self._memory))


def _after(delay: float, callback: Callable[[], None]) -> asyncio.Handle:
    """Run `callback` in `delay` seconds; a delay under the loop's timer resolution waits one loop turn instead.

    A wave's requests that reached this actor together are all queued by the
    next turn; a sub-millisecond timer waited a whole millisecond for nothing
    more, on every acquire of a fast fleet (measured: +1 ms per task).
    """
    loop = asyncio.get_running_loop()
    return loop.call_later(delay, callback) if delay >= LOOP_TIMER_RESOLUTION else loop.call_soon(callback)


def _left(lease: _Lease, now: float) -> float:
    """A lease's expected remaining seconds at `now` (0 once overdue)."""
    return max(0.0, lease.expected - (now - lease.granted))


def _write_memory(path: Path, memory: FleetMemory) -> None:
    """Merged with what is in the file now (`newest`), under a lock, so teams sharing the file keep each other's
    servers; written atomically (a temporary file renamed over it), so a reader or a crash never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_name(f".{path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):  # none yet, or `_recall` warned
                memory = newest(memory, parse_memory(path.read_text(encoding="utf-8")))
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(memory.model_dump_json(indent=1), encoding="utf-8")
            tmp.replace(path)
    except OSError as exc:
        log.warning("fleet memory %s not saved: %s", path, exc)
