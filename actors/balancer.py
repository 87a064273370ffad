"""The live load table and the lease desk.

Specialists `acquire` a lease before calling a server and `release` it with
the outcome. The balancer never lets a server have more than its `slots`
requests in flight; everything else waits here, in priority-then-FIFO order,
because a loaded Ollama model would queue the excess without bound. Which
server a request gets, and which waiting request goes first, is decided by
`policies.balancing.plan_dispatch` over the whole queue at once; this actor
only keeps the table it needs: per lease, when it started and how long it was
expected to take, so a busy server's next free slot can be predicted.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from policies.balancing import Queued, eligible, has_capacity, plan_dispatch, planned_seconds
from policies.retry import CircuitBreaker
from teamorch.config import ServerConfig, TeamConfig
from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseRequest, ServerLoad

EWMA_ALPHA = 0.3
ERROR_WINDOW = 20
TICK_SECONDS = 0.25
# peak_ewma plans the whole queue; a wave of a plan reaches the balancer as requests a millisecond or
# two apart, so an arrival that finds a free slot waits a moment for the rest of its wave instead of
# taking the slot just because it came first. The wait is capped at a small fraction of the request's
# expected service time, so it never matters for the request itself.
COALESCE_SECONDS = 0.005
COALESCE_FRACTION = 0.01
MAX_GROUPS = 1000


@dataclass
class _Server:
    config: ServerConfig
    breaker: CircuitBreaker
    in_flight: int = 0
    healthy: bool = True
    models_present: list[str] | None = None
    models_loaded: list[str] | None = None
    ewma_token_seconds: float | None = None
    ewma_ttft: float | None = None
    ewma_latency: float | None = None
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=ERROR_WINDOW))
    completed: int = 0
    failed: int = 0
    busy_until: float = 0.0
    slot_penalty: int = 0
    last_check: float | None = None
    last_error: str | None = None

    def snapshot(self, now: float, waiting: int) -> ServerLoad:
        if self.busy_until and now >= self.busy_until:
            self.slot_penalty, self.busy_until = 0, 0.0
        outcomes = list(self.outcomes)
        return ServerLoad(
            name=self.config.name,
            slots=self.config.slots,
            effective_slots=max(1, self.config.slots - self.slot_penalty),
            in_flight=self.in_flight,
            waiting=waiting,
            healthy=self.healthy,
            circuit=self.breaker.state(now),
            models_present=self.models_present,
            models_loaded=self.models_loaded,
            tags=self.config.tags,
            ewma_token_seconds=self.ewma_token_seconds,
            ewma_ttft=self.ewma_ttft,
            ewma_latency=self.ewma_latency,
            error_rate=(outcomes.count(False) / len(outcomes)) if outcomes else 0.0,
            completed=self.completed,
            failed=self.failed,
            last_check=self.last_check,
            last_error=self.last_error,
        )


@dataclass
class _Lease:
    """A granted slot. `cold`: the model was not loaded when granted, so this request paid the load."""

    server: str
    granted: float
    expected: float
    cold: bool


@dataclass
class _Waiter:
    req: LeaseRequest
    capabilities: list[str]
    seq: int
    enqueued: float
    future: asyncio.Future[dict[str, Any]]


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new


class LoadBalancer:
    def __init__(self, team: TeamConfig, servers: dict[str, Any] | None = None) -> None:
        self.team = team
        self.policy = team.balancer.policy
        self.servers = {
            s.name: _Server(
                config=s,
                breaker=CircuitBreaker(team.retry.circuit_failures, team.retry.circuit_reset),
                models_present=list(s.models) if s.models is not None else None,
            )
            for s in team.servers
        }
        self.handles = servers or {}
        self.waiters: list[_Waiter] = []
        self.leases: dict[str, _Lease] = {}
        # Servers already given to each diversity group (e.g. one consensus round), newest groups last.
        self.groups: OrderedDict[str, set[str]] = OrderedDict()
        self._seq = itertools.count()
        self._rr = itertools.count()
        self._rng = random.Random(0)
        self._tasks: list[asyncio.Task[None]] = []
        self._coalescing: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Start the health/model poll loop and the re-dispatch tick (needs the actor's loop)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._poll_forever()), asyncio.create_task(self._tick_forever())]
            await self.poll_once()

    # ---- leases -------------------------------------------------------------------------

    async def acquire(self, req: LeaseRequest, capabilities: list[str] | None = None) -> dict[str, Any]:
        """Wait for a server with a free slot; returns {"lease_id", "server"}."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(req, list(capabilities or []), next(self._seq), time.monotonic(), loop.create_future())
        self.waiters.append(waiter)
        self.waiters.sort(key=lambda w: (-w.req.priority, w.seq))
        self._dispatch(arrived=waiter)
        try:
            return await waiter.future
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    async def release(
        self,
        lease_id: str,
        ok: bool,
        kind: str = "ok",
        latency: float | None = None,
        ttft: float | None = None,
        tokens: int = 0,
        eval_seconds: float | None = None,
        model: str | None = None,
        error: str | None = None,
    ) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        server = self.servers[lease.server]
        server.in_flight -= 1
        now = time.monotonic()
        if kind != "cancelled":
            server.breaker.record(ok, kind, now)
        if ok:
            server.completed += 1
            server.outcomes.append(True)
            if tokens and (eval_seconds or latency):
                per_token = (eval_seconds if eval_seconds else (latency or 0.0) - (ttft or 0.0)) / tokens
                server.ewma_token_seconds = _ewma(server.ewma_token_seconds, max(per_token, 1e-6))
            # The fixed cost of a request is everything but generating tokens: prompt eval, transport,
            # Ray hops. latency - eval_seconds measures exactly that; the client-side ttft would also
            # include the first streamed chunk's tokens. A request that paid a model load is not a
            # sample of the steady state, so it does not move the estimate.
            fixed = ttft
            if latency is not None and eval_seconds:
                fixed = max(0.0, latency - eval_seconds)
            if fixed is not None and not lease.cold:
                server.ewma_ttft = _ewma(server.ewma_ttft, fixed)
            if latency is not None:
                server.ewma_latency = _ewma(server.ewma_latency, latency)
            if model and server.models_loaded is not None and model not in server.models_loaded:
                server.models_loaded = [*server.models_loaded, model]
        elif kind == "busy":
            # 503: the server's own queue is full (someone else is using it). Back off its slots for a while.
            server.slot_penalty = min(server.config.slots - 1, server.slot_penalty + 1)
            server.busy_until = now + self.team.balancer.backoff_seconds
        elif kind != "cancelled":
            server.failed += 1
            server.outcomes.append(False)
            server.last_error = error
            if kind == "unreachable":
                server.healthy = False
        self._dispatch()

    def _grant(self, waiter: _Waiter, name: str, loads: list[ServerLoad], now: float) -> None:
        lease_id = f"{name}-{next(self._seq)}"
        server = self.servers[name]
        row = next(s for s in loads if s.name == name)
        cold = server.models_loaded is not None and waiter.req.model not in server.models_loaded
        expected = planned_seconds(row, waiter.req, loads, self.team.balancer.model_affinity)
        self.leases[lease_id] = _Lease(name, now, expected, cold)
        server.in_flight += 1
        server.breaker.on_acquire(now)
        if waiter.req.group:
            self.groups.setdefault(waiter.req.group, set()).add(name)
            self.groups.move_to_end(waiter.req.group)
            while len(self.groups) > MAX_GROUPS:
                self.groups.popitem(last=False)
        waiter.future.set_result({"lease_id": lease_id, "server": name})

    def _with_group_avoid(self, req: LeaseRequest) -> LeaseRequest:
        used = self.groups.get(req.group or "")
        return req.model_copy(update={"avoid": [*req.avoid, *sorted(used)]}) if used else req

    def _running(self, now: float) -> dict[str, list[float]]:
        """Per server, the expected remaining seconds of each request in flight (0 once overdue)."""
        out: dict[str, list[float]] = {}
        for lease in self.leases.values():
            out.setdefault(lease.server, []).append(max(0.0, lease.expected - (now - lease.granted)))
        return out

    def _dispatch(self, arrived: _Waiter | None = None) -> None:
        """Grant, refuse or keep waiting every queued request, as `plan_dispatch` decides.

        The load table is built once per round (not once per waiter): a round
        runs at every acquire and release, and with hundreds of waiters
        rebuilding it per waiter made granting a slot cost more than the
        request it granted. For the same reason a request that `arrived` while
        every slot is taken is only checked for eligibility: nothing else in
        the queue can have changed. Under peak_ewma an arrival with slots free
        is planned a moment later (at most COALESCE_SECONDS, and at most
        COALESCE_FRACTION of its expected service time), with the rest of its wave.
        """
        now = time.monotonic()
        loads = self.snapshot_now(now) if arrived is not None else []
        coalesce = self.policy == "peak_ewma" and COALESCE_SECONDS > 0
        if arrived is not None and (coalesce or not any(has_capacity(s) for s in loads)):
            try:
                eligible(loads, arrived.req)  # only whether it can ever be served: no need to plan the queue
            except NoServerAvailable as exc:
                arrived.future.set_exception(exc)
                self.waiters.remove(arrived)
                return
            if coalesce and self._coalescing is None and any(has_capacity(s) for s in loads):
                affinity = self.team.balancer.model_affinity
                quickest = min(planned_seconds(s, arrived.req, loads, affinity) for s in loads)
                delay = min(COALESCE_SECONDS, COALESCE_FRACTION * quickest)
                self._coalescing = asyncio.get_running_loop().call_later(delay, self._coalesced)
            return
        for _round in range(len(self.waiters) + 1):
            self.waiters = [w for w in self.waiters if not w.future.done()]
            if not self.waiters or not self._dispatch_round(now):
                return

    def _coalesced(self) -> None:
        self._coalescing = None
        self._dispatch()

    def _dispatch_round(self, now: float) -> bool:
        """One planning round; True if a grant was held back and the queue must be planned again.

        A request of a diversity group (`req.group`) is planned avoiding the
        servers its group already holds; when two requests of one group are
        planned onto the same server in the same round, only the first is
        granted and the round is redone, so the second sees the first.
        """
        loads = self.snapshot_now(now)
        queue = [Queued(self._with_group_avoid(w.req), now - w.enqueued, tuple(w.capabilities)) for w in self.waiters]
        decisions = plan_dispatch(
            self.policy,
            loads,
            queue,
            running=self._running(now),
            counter=self._rr if self.policy == "round_robin" else None,
            rng=self._rng,
            affinity=self.team.balancer.model_affinity,
        )
        held_back = False
        granted_groups: set[tuple[str, str]] = set()
        for index in sorted(decisions):
            waiter, decision = self.waiters[index], decisions[index]
            if isinstance(decision, NoServerAvailable):
                waiter.future.set_exception(NoServerAvailable(decision.message))
                continue
            group = waiter.req.group
            if group and ((group, decision) in granted_groups):
                held_back = True
                continue
            if group:
                granted_groups.add((group, decision))
            self._grant(waiter, decision, loads, now)
        return held_back

    # ---- observation ----------------------------------------------------------------------

    def snapshot_now(self, now: float | None = None) -> list[ServerLoad]:
        now = time.monotonic() if now is None else now
        waiting = len(self.waiters)
        return [s.snapshot(now, waiting) for s in self.servers.values()]

    async def snapshot(self) -> list[ServerLoad]:
        return self.snapshot_now()

    async def poll_once(self) -> None:
        async def one(name: str) -> None:
            handle = self.handles.get(name)
            if handle is None:
                return
            try:
                info = await handle.probe.remote()
            except Exception as exc:  # the server actor itself died
                info = {"healthy": False, "error": f"server actor lost: {exc}", "checked_at": time.time()}
            server = self.servers[name]
            server.healthy = bool(info.get("healthy"))
            server.last_check = info.get("checked_at")
            if not server.healthy:
                server.last_error = info.get("error")
                return
            if info.get("models_present") is not None:
                server.models_present = info["models_present"]
            if info.get("models_loaded") is not None:
                server.models_loaded = info["models_loaded"]

        await asyncio.gather(*(one(name) for name in self.servers))
        self._dispatch()

    async def _poll_forever(self) -> None:
        interval = min(s.config.poll_interval for s in self.servers.values()) if self.servers else 10.0
        while True:
            await asyncio.sleep(interval)
            await self.poll_once()

    async def _tick_forever(self) -> None:
        # Circuits turn half-open and waiting requests time out of their preference without any release.
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if self.waiters:
                self._dispatch()
