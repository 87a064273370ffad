"""The batched lease path: asks and releases go one way, grants come back in batches through one long poll.

One Ray actor call costs about half a millisecond of CPU between its two ends
on 2 cores, and an awaited `acquire` is one call per lease plus its reply; at
thousands of grants a second the calls, not the decisions, were the balancer's
ceiling (measured: 1,376 grants/s for a desk deciding nothing, one acquire and
one release per grant). So a client (`LeaseClient`, one per specialist actor or
benchmark process) sends everything of one loop turn as ONE one-way call
(`LoadBalancer.lease_calls`: asks, withdrawals, releases) and keeps ONE long
poll outstanding (`LoadBalancer.granted`), which returns every grant and
refusal made for it since its last poll and waits while there are none. This
is Ray Serve's LongPollClient/LongPollHost shape (one listen call per client,
answered when something changed, re-issued at once), chosen over pushing to
the client actor because a benchmark client or a driver is no actor, and
because a poll reply carries the balancer's incarnation (`epoch`) for free.

What `acquire` promised, kept: a restarted balancer's new incarnation answers
a poll from a client that knew the old one at once, with its own epoch, and
the client sends every ask still open again (the balancer ignores an ask id it
already holds, so Ray re-sending the one-way call too costs nothing); a
dispatch key still maps to one lease; a caller that times out or is cancelled
withdraws its ask, and a lease granted after it gave up goes back unused
(`teamorch.policies.leases.AskBook` decides which answer is which).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from typing import TYPE_CHECKING

import ray

from teamorch.actors import TurnBatch
from teamorch.errors import NoServerAvailable
from teamorch.messages import (
    ChatResponse,
    Lease,
    LeaseAsk,
    LeaseCalls,
    LeaseGrant,
    LeaseGrants,
    LeaseOutcome,
    LeaseRequest,
    Outcome,
)
from teamorch.policies.leases import AskBook

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

# A balancer Ray is restarting refuses calls for a moment: the poll asks again after this.
RESTART_RETRY_SECONDS = 0.05
# During a burst a client's calls to the balancer are at least this far apart (`TurnBatch` spacing): under load a
# loop turn held one or two releases, so a call per turn was a Ray call per two grants (measured at 10,000 queued:
# 0.56-0.59 ms of balancer CPU per grant, 0.37-0.44 ms spaced 2 ms). The balancer plans releases in rounds this far
# apart anyway (`ROUND_SECONDS`); outside a burst a call leaves at the end of its turn.
SEND_SPACING = 0.002


class GrantBoxes:
    """The balancer's side of the long poll: per client, the answers not yet collected and its waiting poll.

    Kept apart from the balancer so a desk that decides nothing (the
    benchmarks' ceiling) answers polls the same way.
    """

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self._boxes: dict[str, list[LeaseGrant]] = {}
        self._polls: dict[str, asyncio.Future[None]] = {}
        self.polls = 0
        self.delivered = 0

    def put(self, client: str, grant: LeaseGrant) -> None:
        self._boxes.setdefault(client, []).append(grant)
        poll = self._polls.pop(client, None)
        if poll is not None and not poll.done():
            poll.set_result(None)  # it resumes after this turn's other answers are in the box too

    async def collect(self, client: str, epoch: str) -> LeaseGrants:
        """Every answer for `client` since its last poll; waits while there are none.

        A poll that names another epoch (sent to, or re-sent by Ray from, a
        dead incarnation) is answered at once, so the client learns of the
        restart; an empty epoch is a client's first poll.
        """
        if epoch in ("", self.epoch) and not self._boxes.get(client):
            stale = self._polls.pop(client, None)
            if stale is not None and not stale.done():
                stale.set_result(None)  # one poll per client: an older one answers (empty) and is not asked again
            poll = self._polls[client] = asyncio.get_running_loop().create_future()
            await poll  # a cancelled poll leaves its box as it is, for the next one
        grants = self._boxes.pop(client, [])
        self.polls += 1
        self.delivered += len(grants)
        return LeaseGrants(epoch=self.epoch, grants=grants)


class LeaseClient:
    """Leases for one process's tasks over the batched path: `acquire`, `release`, `drain`.

    `book` holds the open asks and leases in use (plain data, decided by
    `AskBook`); `_waiting` the future each open ask's caller awaits; `_calls`
    batches one loop turn's asks, withdrawals and releases into one call.
    The poll runs while the process does (a parked call costs the balancer
    nothing but a future) and stops when the balancer is gone for good.
    """

    spacing = SEND_SPACING

    def __init__(self, balancer: ActorHandle) -> None:
        self.balancer = balancer
        self.client = uuid.uuid4().hex
        self.book = AskBook()
        self._waiting: dict[str, asyncio.Future[Lease]] = {}
        self._calls: TurnBatch[LeaseAsk | str | LeaseOutcome] = TurnBatch(self._send, self.spacing)
        self._numbers = itertools.count()
        self._poll: asyncio.Task[None] | None = None
        self._poll_ref: ObjectRef[LeaseGrants] | None = None  # the `granted` call outstanding (`stop`)
        self._last_call: ObjectRef[None] | None = None  # the newest call sent (`drain`)
        self.calls = 0  # Ray calls made to the balancer (batches and polls), for benchmarks and diagnosis

    async def acquire(
        self,
        req: LeaseRequest,
        capabilities: list[str] | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Lease:
        """A lease, as `LoadBalancer.acquire` grants it; `NoServerAvailable` when none came within `timeout`
        seconds (or the balancer refused). A caller that stops waiting leaves no ask and no lease behind.

        The future is awaited bare (no `wait_for`/`shield`, each a loop turn
        more before the caller runs): a lease granted just as the caller was
        cancelled stays in the future, and `_give_up` releases it.
        """
        ask = LeaseAsk(ask_id=f"{self.client}-{next(self._numbers)}", req=req, capabilities=capabilities or [], key=key)
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.book.ask(ask)
        self._waiting[ask.ask_id] = future
        self._calls.add(ask)
        if self._poll is None or self._poll.done():
            self._poll = asyncio.create_task(self._listen())
        try:
            async with asyncio.timeout(timeout):
                return await future
        except BaseException as exc:
            self._give_up(ask.ask_id, future)
            if isinstance(exc, TimeoutError):
                raise NoServerAvailable(f"no server slot became free within {timeout or 0:.1f}s") from None
            raise

    def release(self, done: LeaseOutcome) -> None:
        """Hand a lease back with its outcome; one way, with the rest of this loop turn's calls."""
        self.book.release(done.lease_id)
        self._calls.add(done)

    async def drain(self) -> None:
        """Return once every call this client sent has reached the balancer (calls from one caller run in order,
        so waiting for the newest is waiting for all)."""
        self._calls.flush()
        if self._last_call is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                await self._last_call

    def stop(self) -> None:
        """End the long poll (the team is stopping; the next acquire polls again).

        A poll left waiting when the balancer is killed is retried by Ray,
        which logs the retry on the driver's terminal: into `teamorch plan`'s
        YAML on stdout. A cancelled call is not retried.
        """
        if self._poll is not None:
            self._poll.cancel()
        if self._poll_ref is not None:
            ray.cancel(self._poll_ref)

    def _give_up(self, ask_id: str, future: asyncio.Future[Lease]) -> None:
        """The caller stopped waiting: withdraw its ask, or release the lease granted in the meantime."""
        self._waiting.pop(ask_id, None)
        if self.book.withdraw(ask_id):
            self._calls.add(ask_id)
        elif future.done() and not future.cancelled() and future.exception() is None:
            self.release(_unused(future.result()))

    def _send(self, items: list[LeaseAsk | str | LeaseOutcome]) -> None:
        calls = LeaseCalls(client=self.client)
        for item in items:
            if isinstance(item, LeaseAsk):
                calls.asks.append(item)
            elif isinstance(item, str):
                calls.withdrawn.append(item)
            else:
                calls.released.append(item)
        self._last_call = self.balancer.lease_calls.remote(calls)
        self.calls += 1

    async def _listen(self) -> None:
        """The long poll: one outstanding `granted` call, re-issued as soon as it answers."""
        while True:
            self.calls += 1
            try:
                self._poll_ref = self.balancer.granted.remote(self.client, self.book.epoch or "")
                answer = await self._poll_ref
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(RESTART_RETRY_SECONDS)  # Ray is restarting it: the next poll finds the new one
                continue
            except ray.exceptions.RayError as exc:
                # Every caller waiting sees the error, as its own acquire call would have (each withdraws its ask).
                for future in self._waiting.values():
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, ray.exceptions.RayActorError):
                    return  # gone for good (killed, or out of restarts): the next acquire polls again
                await asyncio.sleep(RESTART_RETRY_SECONDS)
                continue
            self._receive(answer)
            # The callers given a lease go first (the next poll is a Ray call to submit, ~0.1-0.3 ms of CPU):
            # each sends its request to its server before this process re-polls. Two turns: in the first the
            # callers resume and queue their requests (`TurnBatch`), in the second those batches leave (a chain
            # step's lease-to-chat time, 0.25-0.56 -> 0.06 ms p50 measured in session 6).
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _receive(self, answer: LeaseGrants) -> None:
        receipt = self.book.receive(answer)
        for grant in receipt.deliver:
            future = self._waiting.pop(grant.ask_id, None)
            if future is not None and not future.done():
                if grant.lease is not None:
                    future.set_result(grant.lease)
                else:
                    future.set_exception(NoServerAvailable(grant.refused or "no server available"))
            elif grant.lease is not None:  # its caller was already failed (a poll error): the lease goes back
                self.release(_unused(grant.lease))
        for lease in receipt.unused:
            self.release(_unused(lease))
        for ask in receipt.resend:
            self._calls.add(ask)


def _unused(lease: Lease) -> LeaseOutcome:
    """The release of a lease granted after its caller gave up: no request was sent, nothing to learn."""
    return LeaseOutcome(
        lease_id=lease.lease_id, outcome="cancelled", model="", error="granted after its caller gave up", sent=False
    )


def lease_outcome(
    lease_id: str,
    outcome: Outcome,
    model: str,
    started: float,
    response: ChatResponse | None,
    error: str | None,
    wasted: int = 0,
) -> LeaseOutcome:
    """What the balancer learns from one attempt: its speed, prefill and load figures come from the response
    (`wasted`: the tokens a cancelled hedge race loser is estimated to have generated)."""
    return LeaseOutcome(
        lease_id=lease_id,
        outcome=outcome,
        model=model,
        latency=time.monotonic() - started,
        ttft=response.ttft if response else None,
        tokens=response.tokens if response else wasted,
        eval_seconds=response.eval_seconds if response else None,
        error=error,
        prompt_tokens=response.prompt_tokens if response else 0,
        cached_tokens=response.prompt_cached_tokens if response else None,
        prompt_eval_seconds=response.prompt_eval_seconds if response else None,
        load_seconds=response.load_seconds if response else None,
    )
