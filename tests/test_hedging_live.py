"""Hedging through real actors: a real local Ray cluster and two Ollama-API simulators (teamorch.sim, real HTTP
on loopback), one of which turns very slow for the request under test (the simulator's slow-tail fault)."""

from __future__ import annotations

import time

import httpx

from teamorch import api
from tests.helpers import fan, sim_team

TOKENS = 40


def test_a_straggler_is_hedged_on_the_other_server_and_the_loser_is_closed(sims, coordinator) -> None:
    fast = sims(name="fast", tokens_per_second=400, ttft=0.01)
    other = sims(name="other", tokens_per_second=200, ttft=0.01)
    hedging = {"hedge": True, "hedge_min_samples": 3, "hedge_min_seconds": 0.05}
    handle = coordinator(sim_team([(fast, 1), (other, 1)], [{"name": "A"}], balancer=hedging))
    assert api.execute(handle, fan(12, TOKENS)).success  # the balancer learns both servers' speed and latency tail

    # From now on `fast` generates at 2% of its speed: 40 tokens take 5 s there instead of 0.1 s.
    httpx.post(f"{fast.url}/sim/config", json={"slow_rate": 1.0, "slow_factor": 0.02}).raise_for_status()
    for sim in (fast, other):
        httpx.post(f"{sim.url}/sim/reset").raise_for_status()
    began = time.monotonic()
    report = api.execute(handle, fan(1, TOKENS))
    took = time.monotonic() - began

    assert report.success and took < 2.5, (took, report.tasks[0].attempts)  # not the 5 s of the slow request
    (task,) = report.tasks  # recorded once
    assert task.server == "other" and task.hedged and task.tokens == TOKENS
    primary, hedge = task.attempts
    assert (primary.server, primary.outcome, primary.hedge) == ("fast", "cancelled", False)
    assert (hedge.server, hedge.outcome, hedge.hedge) == ("other", "ok", True)
    assert "answered first" in (primary.error or "") and primary.wasted_tokens > 0
    stats = report.statistics
    assert (stats.hedges, stats.hedge_wins, stats.wasted_tokens) == (1, 1, primary.wasted_tokens)

    # What the servers saw: the slow request's HTTP stream was closed, unfinished; one answer was generated.
    deadline = time.monotonic() + 5
    while fast.stats()["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = fast.stats()
    assert (seen["requests"], seen["slowed"], seen["completed"], seen["cancelled"]) == (1, 1, 0, 1)
    assert [e["completed"] for e in seen["requests_log"]] == [False]
    assert (other.stats()["requests"], other.stats()["completed"]) == (1, 1)
