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
import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray

from teamorch.actors.metrics import fleet_metrics
from teamorch.config import TeamConfig
from teamorch.errors import NoServerAvailable
from teamorch.messages import Lease, LeaseOutcome, LeaseRequest, ProbeResult, ServerLoad
from teamorch.policies.balancing import (
    LIVE_ON_TIME,
    Decision,
    Planner,
    Queued,
    apply_group_diversity,
    coalesce_delay,
    eligible,
    has_capacity,
    plan_dispatch,
    planned_seconds,
)
from teamorch.policies.fleet import (
    GroupServers,
    Placement,
    ServerStats,
    record_grant,
    record_orphan_release,
    record_outcome,
    record_probe,
    record_restart,
    to_load,
)
from teamorch.policies.prefix import SlotState
from teamorch.policies.retry import restarting_verdict

# Circuits turn half-open and requests age on the clock, not on events: the queue is re-planned this often.
TICK_SECONDS = 0.25


@dataclass
class _Lease:
    """A granted slot, and where on its server the request was predicted to go (`Placement`: slot, cache, load)."""

    server: str
    granted: float  # monotonic seconds
    expected: float  # seconds the plan expected it to take
    placed: Placement
    key: str | None = None  # the (run, task, attempt) it was granted for, if the caller named one


@dataclass
class _Waiter:
    req: LeaseRequest
    capabilities: list[str]
    seq: int
    enqueued: float  # monotonic seconds
    future: asyncio.Future[Lease]
    key: str | None = None


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
        )
        self.leases: dict[str, _Lease] = {}
        self.groups = GroupServers()
        self.keyed: dict[str, str] = {}
        self.pending: dict[str, _Waiter] = {}
        self.epoch = uuid.uuid4().hex[:8]
        self._seq = itertools.count()
        self._rr = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._probing: set[asyncio.Task[None]] = set()
        self._coalescing: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[None] | None = None
        self._full = False  # an arrival found no free slot, and nothing has been released since
        if ray.get_runtime_context().was_current_actor_reconstructed:
            now = time.monotonic()
            for stats in self.servers.values():
                record_restart(stats, now)  # it cannot know what was in flight: every slot may be busy

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

    # ---- leases -------------------------------------------------------------------------

    async def acquire(self, req: LeaseRequest, capabilities: list[str] | None = None, key: str | None = None) -> Lease:
        """Wait for a server with a free slot; the lease already held for `key` if there is one."""
        await self.start()
        held = self.keyed.get(key or "")
        if held in self.leases:
            return Lease(lease_id=held, server=self.leases[held].server)
        twin = self.pending.get(key or "")
        if twin is not None and not twin.future.done():
            # The dead incarnation's call still waits here (Ray does not cancel it): one grant serves both.
            return await asyncio.shield(twin.future)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(req, list(capabilities or []), next(self._seq), time.monotonic(), loop.create_future(), key)
        if key:
            self.pending[key] = waiter
        self.waiters[waiter.seq] = waiter
        self.planner.add(waiter.seq, waiter.req, waiter.enqueued, waiter.capabilities)
        self._dispatch(arrived=waiter)
        try:
            return await waiter.future
        finally:
            self._unqueue(waiter)
            if key and self.pending.get(key) is waiter:
                del self.pending[key]

    async def release(self, done: LeaseOutcome) -> None:
        """Hand a slot back; the outcome updates the server's speed and health. Releasing twice is harmless."""
        await self.start()
        lease = self.leases.pop(done.lease_id, None)
        if lease is None:
            self._orphan(done.lease_id)
            return
        if lease.key:
            self.keyed.pop(lease.key, None)
        stats = self.servers[lease.server]
        fleet_metrics().lease_released(lease.server, done)
        record_outcome(
            stats, done, lease.placed.cold, time.monotonic(), self.team.balancer.backoff_seconds, lease.placed
        )
        if done.load_seconds:
            # A load may have evicted another model: ask the server now rather than at the next poll.
            probe = asyncio.create_task(self._probe(lease.server))
            self._probing.add(probe)  # held until done: the loop keeps only weak references to tasks
            probe.add_done_callback(self._probing.discard)
        self._dispatch()

    def _orphan(self, lease_id: str) -> None:
        """A lease this balancer never granted: one from before a restart frees a slot; a repeat release is moot."""
        parts = lease_id.rsplit("-", 2)  # server-epoch-seq (a server name may hold dashes itself)
        if len(parts) == 3 and parts[1] != self.epoch and parts[0] in self.servers:
            record_orphan_release(self.servers[parts[0]], time.monotonic())
            self._dispatch()

    def _unqueue(self, waiter: _Waiter, granted: float | None = None) -> None:
        """`waiter` leaves the queue: granted (at monotonic `granted`), refused or cancelled. Twice is harmless."""
        self.waiters.pop(waiter.seq, None)
        self.planner.remove(waiter.seq, granted)

    def _grant(self, waiter: _Waiter, name: str, loads: list[ServerLoad], now: float) -> None:
        self._unqueue(waiter, now)
        lease_id = f"{name}-{self.epoch}-{next(self._seq)}"
        stats = self.servers[name]
        row = next(s for s in loads if s.name == name)
        drain = max(self._running(now).get(name, []), default=0.0)
        placed = record_grant(stats, now, waiter.req, drain)
        expected = planned_seconds(row, waiter.req, loads, self.team.balancer.model_affinity, placed.cached)
        self.leases[lease_id] = _Lease(name, now, expected, placed, waiter.key)
        if waiter.key:
            self.keyed[waiter.key] = lease_id
        fleet_metrics().lease_granted(name, now - waiter.enqueued)
        if waiter.req.group:
            self.groups.add(waiter.req.group, name)
        waiter.future.set_result(Lease(lease_id=lease_id, server=name))

    def _running(self, now: float) -> dict[str, list[float]]:
        """Per server, the expected remaining seconds of each request in flight (0 once overdue)."""
        out: dict[str, list[float]] = {}
        for lease in self.leases.values():
            out.setdefault(lease.server, []).append(max(0.0, lease.expected - (now - lease.granted)))
        return out

    def _caches(self, now: float) -> dict[str, list[SlotState]]:
        """Per server, each slot's prefix cache and, when busy, its request's expected remaining seconds."""
        remaining: dict[str, dict[int, float]] = {name: {} for name in self.servers}
        for lease in self.leases.values():
            if lease.placed.slot is not None:
                remaining[lease.server][lease.placed.slot] = max(0.0, lease.expected - (now - lease.granted))
        return {name: stats.prefix.states(remaining[name]) for name, stats in self.servers.items()}

    def _dispatch(self, arrived: _Waiter | None = None) -> None:
        """Grant, refuse or keep waiting every queued request, as `plan_dispatch` decides.

        A request that `arrived` is planned now only when no policy asks it to
        wait for its wave (`coalesce_delay`) and a slot is free; otherwise it is
        only checked for eligibility, which is all that can have changed for
        the rest of the queue. Once an arrival found every slot taken, later
        arrivals skip even that until the next release, probe or tick (which
        refuses an ineligible one): with thousands queued, building the load
        table per arrival was the balancer's main cost.
        """
        now = time.monotonic()
        if arrived is not None:
            if self._full:
                return
            loads = self.snapshot_now(now)
            delay = coalesce_delay(self.policy, loads, arrived.req, self.team.balancer.model_affinity)
            if delay is not None or not any(has_capacity(s) for s in loads):
                try:
                    eligible(loads, arrived.req)  # only whether it can ever be served: no need to plan the queue
                except NoServerAvailable as exc:
                    arrived.future.set_exception(exc)
                    self._unqueue(arrived)
                    return
                if delay is not None and self._coalescing is None:
                    self._coalescing = asyncio.get_running_loop().call_later(delay, self._coalesced)
                self._full = delay is None
                return
        self._full = False
        for _round in range(len(self.waiters) + 1):
            if not self.waiters or not self._dispatch_round(now):
                return

    def _coalesced(self) -> None:
        self._coalescing = None
        self._dispatch()

    def _dispatch_round(self, now: float) -> bool:
        """One planning round; True if a grant was held back and the queue must be planned again."""
        loads = self.snapshot_now(now)
        self.planner.regroup(self.groups.with_avoid)
        decisions = self._plan(loads, now)
        queue = {key: Queued(self.waiters[key].req) for key in decisions}  # for the groups: `avoid` plays no part
        decisions, held_back = apply_group_diversity(decisions, queue)
        for key, decision in decisions.items():
            waiter = self.waiters[key]
            if isinstance(decision, NoServerAvailable):
                self._unqueue(waiter)
                waiter.future.set_exception(NoServerAvailable(decision.message))
            else:
                self._grant(waiter, decision, loads, now)
        return held_back

    def _plan(self, loads: list[ServerLoad], now: float) -> dict[int, Decision]:
        """The planner's decisions by arrival number; `planner: reference` plans the whole queue from scratch."""
        counter = self._rr if self.policy == "round_robin" else None
        if self.team.balancer.planner == "incremental":
            return self.planner.plan(loads, now, caches=_OnFirstRead(lambda: self._caches(now)), counter=counter)
        keyed = self.planner.queue(now)
        done = plan_dispatch(
            self.policy,
            loads,
            [q for _, q in keyed],
            caches=self._caches(now),
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
        self._dispatch()

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
        if dispatch:
            self._dispatch()

    async def _poll_forever(self) -> None:
        interval = min(s.config.poll_interval for s in self.servers.values()) if self.servers else 10.0
        while True:
            await asyncio.sleep(interval)
            await self.poll_once()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            fleet_metrics().fleet(self.snapshot_now())
            if self.waiters:
                self._dispatch()
