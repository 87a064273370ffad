"""A release is never lost: an error while the balancer learns from an outcome still frees the slot.

Real parts: a `LoadBalancer` actor on the local Ray cluster (given no server actors, so nothing is sent
anywhere). The failure is injected where a bug would sit, in what the outcome teaches (the hedging tail).
Before the slot was freed first, such an error left the server's only slot taken forever, and every
request waiting for it waited until its run's deadline.
"""

from __future__ import annotations

import ray

from teamorch.actors.balancer import LoadBalancer
from teamorch.config import TeamConfig
from teamorch.messages import LeaseOutcome, LeaseRequest
from teamorch.policies.hedging import LatencyTail


class _BrokenTail(LatencyTail):
    def add(self, tokens: int, ratio: float) -> None:
        raise RuntimeError("a bug in what an outcome teaches")


@ray.remote(num_cpus=0)
class _FragileBalancer(LoadBalancer):
    def __init__(self, team: TeamConfig) -> None:
        super().__init__(team, {})
        self.tail = _BrokenTail()  # every lease's latency is recorded here when hedging is on


def test_an_error_while_learning_from_an_outcome_does_not_lose_the_slot(ray_cluster: None) -> None:
    team = TeamConfig.model_validate(
        {
            "servers": [{"name": "only", "url": "http://127.0.0.1:9", "slots": 1}],  # never contacted
            "default_model": "m",
            "specialists": [{"name": "A"}],
            "balancer": {"hedge": True},
        }
    )
    balancer = _FragileBalancer.remote(team)
    req = LeaseRequest(model="m", expected_tokens=16)
    first = ray.get(balancer.acquire.remote(req), timeout=30)
    outcome = LeaseOutcome(lease_id=first.lease_id, outcome="ok", model="m", latency=0.1, ttft=0.02, tokens=16)
    ray.get(balancer.release.remote(outcome), timeout=30)
    second = ray.get(balancer.acquire.remote(req), timeout=10)  # the one slot came back
    assert second.server == "only" and second.lease_id != first.lease_id
    assert [row.in_flight for row in ray.get(balancer.snapshot.remote())] == [1]
    ray.kill(balancer)
