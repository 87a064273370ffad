"""The batched lease path on a real balancer: fewer Ray calls than leases, and nothing lost when the balancer dies.

Real parts: a `LoadBalancer` actor on the local Ray cluster (given no server actors, so nothing is sent
anywhere) and a `LeaseClient` in this test's event loop, as a specialist holds one. The balancer counts the
calls it answered (`lease_counters`) and the slots it has out (`snapshot`): the truth comes from its side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import ray

from teamorch.actors import TurnBatch
from teamorch.actors.balancer import LoadBalancer
from teamorch.actors.leases import LeaseClient
from teamorch.config import TeamConfig
from teamorch.errors import NoServerAvailable
from teamorch.messages import Lease, LeaseOutcome, LeaseRequest

REQ = LeaseRequest(model="m", expected_tokens=16)


def _team(slots: int, policy: str = "peak_ewma") -> TeamConfig:
    return TeamConfig.model_validate(
        {
            "servers": [{"name": "only", "url": "http://127.0.0.1:9", "slots": slots}],  # never contacted
            "default_model": "m",
            "specialists": [{"name": "A"}],
            "balancer": {"policy": policy},
        }
    )


def _done(lease: Lease) -> LeaseOutcome:
    return LeaseOutcome(lease_id=lease.lease_id, outcome="ok", model="m", latency=0.1, ttft=0.02, tokens=16)


async def _in_flight(balancer: Any) -> int:
    return sum(row.in_flight for row in await balancer.snapshot.remote())


async def _restarted(balancer: Any, old_epoch: str | None, timeout: float = 30.0) -> None:
    """Return once Ray has restarted `balancer`: it answers with an epoch other than `old_epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ray.exceptions.RayError):
            if await balancer.__ray_call__.remote(lambda b: b.epoch) != old_epoch:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the balancer did not come back within {timeout:g}s")


@pytest.mark.parametrize("policy", ["peak_ewma", "least_loaded"])
def test_asks_of_one_turn_are_granted_with_fewer_calls_than_leases(ray_cluster: None, policy: str) -> None:
    # least_loaded does not wait for a wave (`coalesce_delay`): its arrivals were a planning round each.
    balancer = ray.remote(LoadBalancer).options(num_cpus=0, max_concurrency=100).remote(_team(8, policy), {})

    async def run() -> None:
        client = LeaseClient(balancer)
        leases = await asyncio.gather(*(client.acquire(REQ) for _ in range(8)))
        assert len({lease.lease_id for lease in leases}) == 8
        assert await _in_flight(balancer) == 8
        counters = await balancer.lease_counters.remote()
        assert counters.asks == 8 and counters.acquire_calls == 0
        assert counters.lease_calls == 1 and counters.delivered == 8 and counters.polls <= 2, counters
        assert counters.rounds == 1  # the batch is planned once
        for lease in leases:
            client.release(_done(lease))
        await client.drain()
        assert await _in_flight(balancer) == 0
        assert (await balancer.lease_counters.remote()).lease_calls == 2  # eight releases, one call

    try:
        asyncio.run(run())
    finally:
        ray.kill(balancer)


def test_a_caller_that_times_out_or_is_cancelled_leaves_no_ask_behind(ray_cluster: None) -> None:
    balancer = ray.remote(LoadBalancer).options(num_cpus=0, max_concurrency=100).remote(_team(1), {})

    async def run() -> None:
        client = LeaseClient(balancer)
        held = await client.acquire(REQ)
        with pytest.raises(NoServerAvailable, match=r"within 0\.3s"):
            await client.acquire(REQ, timeout=0.3)
        cancelled = asyncio.ensure_future(client.acquire(REQ))  # a task cancelled while it waits (a hedge lost)
        await asyncio.sleep(0.1)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        client.release(_done(held))
        await client.drain()
        # Had a withdrawn ask stayed queued, it would take the freed slot and this one would wait.
        after = await asyncio.wait_for(client.acquire(REQ), 10)
        assert after.lease_id != held.lease_id and await _in_flight(balancer) == 1
        assert (await balancer.lease_counters.remote()).delivered == 2  # the withdrawn asks were never granted

    try:
        asyncio.run(run())
    finally:
        ray.kill(balancer)


def test_a_dispatch_key_asked_again_by_a_new_client_gets_the_same_lease(ray_cluster: None) -> None:
    """A specialist restarted by Ray is a new client asking with its predecessor's dispatch keys: it must get the
    lease held (or the grant awaited) for each key, never a second slot nobody would release."""
    balancer = ray.remote(LoadBalancer).options(num_cpus=0, max_concurrency=100).remote(_team(1), {})

    async def run() -> None:
        dead, restarted = LeaseClient(balancer), LeaseClient(balancer)
        held = await dead.acquire(REQ, key="run/t1")
        assert (await restarted.acquire(REQ, key="run/t1")).lease_id == held.lease_id
        waiting = asyncio.ensure_future(dead.acquire(REQ, key="run/t2"))  # the only slot is taken
        await asyncio.sleep(0.1)
        again = asyncio.ensure_future(restarted.acquire(REQ, key="run/t2"))
        await asyncio.sleep(0.1)
        restarted.release(_done(held))
        first, second = await asyncio.wait_for(asyncio.gather(waiting, again), 10)
        assert first.lease_id == second.lease_id != held.lease_id  # one grant served both
        assert await _in_flight(balancer) == 1

    try:
        asyncio.run(run())
    finally:
        ray.kill(balancer)


def test_a_balancer_killed_mid_batch_loses_no_ask_and_grants_none_twice(ray_cluster: None) -> None:
    options = {"num_cpus": 0, "max_concurrency": 100, "max_restarts": 1, "max_task_retries": 3}
    balancer = ray.remote(LoadBalancer).options(**options).remote(_team(2), {})

    async def run() -> None:
        client = LeaseClient(balancer)
        held = await asyncio.gather(client.acquire(REQ), client.acquire(REQ))
        waiting = [asyncio.ensure_future(client.acquire(REQ)) for _ in range(2)]
        await asyncio.sleep(0.2)  # these two wait in the first incarnation's queue
        waiting += [asyncio.ensure_future(client.acquire(REQ)) for _ in range(2)]
        await asyncio.sleep(0)  # their asks leave in this turn's call...
        old = client.book.epoch
        ray.kill(balancer, no_restart=False)  # ...to a balancer killed now
        # The kill is asynchronous: a release sent at once could still reach the old incarnation, and the new one
        # would then count its slot busy for `read_timeout` (120 s), as designed (`record_restart`). So the held
        # leases come back once the new incarnation answers, which is what this test is about.
        await _restarted(balancer, old)
        for lease in held:  # the new incarnation counts every slot busy until these come back
            client.release(_done(lease))
        await asyncio.wait(waiting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.5)  # any grant beyond the two free slots would show up now
        first = [t for t in waiting if t.done()]
        assert len(first) == 2, first
        assert await _in_flight(balancer) == 2
        for task in first:
            client.release(_done(task.result()))
        leases = [await asyncio.wait_for(task, 30) for task in waiting]
        assert len({lease.lease_id for lease in leases}) == 4  # every ask granted, once
        later = [task.result() for task in waiting if task not in first]
        assert await _in_flight(balancer) == 2
        for lease in later:
            client.release(_done(lease))
        await client.drain()
        assert await _in_flight(balancer) == 0

    try:
        asyncio.run(run())
    finally:
        ray.kill(balancer)


def test_turn_batches_are_spaced_under_a_burst_and_flushed_on_demand() -> None:
    """What makes a burst one call: after a send of several messages the next follows it by `spacing` at least;
    after a send of one it leaves at the end of its turn (a lone task waits for no timer); `flush` sends at once
    (a caller about to wait on what it sent)."""

    async def run() -> list[list[int]]:
        sent: list[list[int]] = []
        batch: TurnBatch[int] = TurnBatch(sent.append, spacing=0.05)
        batch.add(0)
        await asyncio.sleep(0)
        batch.add(1)
        batch.add(2)
        await asyncio.sleep(0)
        assert sent == [[0], [1, 2]]  # each at the end of its turn: no burst before either
        for n in (3, 4):
            batch.add(n)
            await asyncio.sleep(0.01)
        assert sent == [[0], [1, 2]]  # within the spacing after a burst: held, gathering
        await asyncio.sleep(0.06)
        batch.add(5)
        batch.flush()
        return sent

    assert asyncio.run(run()) == [[0], [1, 2], [3, 4], [5]]
