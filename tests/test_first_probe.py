"""No blind first probes: a server never measured is first sent the shortest waiting request (no Ray).

Until its first answer the planner only guesses its speed; the longest-first schedule would otherwise give it
whatever finishes soonest there, often a long job the measured servers are busy with.
"""

from __future__ import annotations

from typing import Any

import pytest

from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import Planner, Queued, plan_dispatch

SIZES = (300, 16, 1000, 64, 500)


def srv(name: str, **kw: Any) -> ServerLoad:
    kw.setdefault("slots", 1)
    kw.setdefault("effective_slots", kw["slots"])
    return ServerLoad(name=name, **kw)


def fleet(fast_busy: bool) -> list[ServerLoad]:
    return [
        srv("fast", in_flight=int(fast_busy), ewma_token_seconds=0.002, ewma_ttft=0.04),
        srv("mid", in_flight=1, ewma_token_seconds=0.004, ewma_ttft=0.08),
        srv("new"),  # never measured
    ]


def queue() -> list[Queued]:
    return [Queued(LeaseRequest(model="m", expected_tokens=n)) for n in SIZES]


@pytest.mark.parametrize("fast_busy", [False, True])
def test_the_unmeasured_server_gets_the_shortest_request(fast_busy: bool) -> None:
    loads = fleet(fast_busy)
    running = {"fast": [0.5] if fast_busy else [], "mid": [0.3]}
    decisions = plan_dispatch("peak_ewma", loads, queue(), running=running)
    on_new = [SIZES[i] for i, server in decisions.items() if server == "new"]
    assert on_new == [min(SIZES)]
    if not fast_busy:
        assert decisions[SIZES.index(1000)] == "fast"  # the long job still goes where it finishes first


def test_the_incremental_planner_probes_the_same_way() -> None:
    planner = Planner("peak_ewma")
    for key, queued in enumerate(queue()):
        planner.add(key, queued.req, 0.0)
    decisions = planner.plan(fleet(fast_busy=True), 0.0)
    assert {SIZES[k]: v for k, v in decisions.items()} == {min(SIZES): "new"}


def test_a_measured_fleet_is_planned_as_before() -> None:
    loads = [*fleet(fast_busy=True)[:2], srv("new", ewma_token_seconds=0.02, ewma_ttft=0.2)]
    decisions = plan_dispatch("peak_ewma", loads, queue(), running={"fast": [0.5], "mid": [0.3]})
    # Its speed known, it takes what finishes soonest there (not necessarily the shortest job).
    assert {SIZES[i]: server for i, server in decisions.items()} == {64: "new"}


def test_only_an_idle_unmeasured_server_makes_the_planner_plan_the_whole_queue() -> None:
    # The first request on a 2-slot server still runs: it takes nothing more until it answers, so the kept
    # plan goes on (planning 10,000 queued from scratch on every event had stalled a 100-server balancer).
    planner = Planner("peak_ewma")
    planner.add(0, LeaseRequest(model="m", expected_tokens=16), 0.0)
    measured = srv("fast", ewma_token_seconds=0.002, ewma_ttft=0.04)
    probing = [measured, srv("new", slots=2, in_flight=1)]
    idle = [measured, srv("new", slots=2)]
    assert not planner._probing(probing)
    assert planner._probing(idle)


def test_each_idle_unmeasured_server_is_probed_in_the_same_round() -> None:
    # One shared probe request meant one probe per round: with 60 new servers behind 10,000 queued, 60 rounds
    # of planning the whole queue. Each gets its own short request now, the shortest to the first.
    loads = [*fleet(fast_busy=True)[:2], srv("new"), srv("newer")]
    decisions = plan_dispatch("peak_ewma", loads, queue(), running={"fast": [0.5], "mid": [0.3]})
    assert {SIZES[i]: server for i, server in decisions.items()} == {16: "new", 64: "newer"}


def test_a_probe_does_not_make_the_planner_plan_the_whole_queue_from_scratch() -> None:
    # The measured servers' plan is kept while the new server takes its probe: with 10,000 queued, planning the
    # whole queue on every event until a probe won had stalled a 100-server balancer.
    planner = Planner("peak_ewma")
    for key, queued in enumerate(queue() * 40):
        planner.add(key, queued.req, float(key))
    loads = [srv("fast", slots=2, in_flight=1, ewma_token_seconds=0.002, ewma_ttft=0.04), *fleet(True)[1:]]
    decisions = planner.plan(loads, 0.0)
    assert sorted(decisions.values()) == ["fast", "new"]
    assert [SIZES[k % len(SIZES)] for k, v in decisions.items() if v == "new"] == [min(SIZES)]
    assert planner._kept is not None


@pytest.mark.parametrize("queued", [5, 2_000])
def test_a_plan_made_while_a_servers_first_request_runs_is_kept_only_on_a_big_queue(queued: int) -> None:
    # "new" still runs its first request, whose group's prefix it holds: a plan made without it is not followed on
    # the next release but made again, while that is cheap (a small queue); on a big queue it is kept, as before.
    planner = Planner("peak_ewma")
    for key in range(queued):
        planner.add(key, LeaseRequest(model="m", expected_tokens=SIZES[key % len(SIZES)]), float(key))
    loads = [srv("fast", slots=2, ewma_token_seconds=0.002, ewma_ttft=0.04), srv("new", slots=2, in_flight=1)]
    assert planner.plan(loads, 0.0)
    assert (planner._kept is None) == (queued == 5)
