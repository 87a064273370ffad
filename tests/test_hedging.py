"""Hedging decisions on plain data (teamorch.policies.hedging; no Ray, no I/O).

When a call counts as a straggler, whether and where its one duplicate
starts, what the tail remembers, and how the run report counts hedges.
The live race (real Ray, two simulators) is in tests/test_hedging_live.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from teamorch.config import BalancerConfig, load_team
from teamorch.errors import ConfigError
from teamorch.messages import Attempt, LeaseOutcome, LeaseRequest, OrchestrationPlan, ServerLoad, TaskResult
from teamorch.policies.fleet import record_latency
from teamorch.policies.hedging import (
    RECHECK_SECONDS,
    WINDOW,
    LatencyTail,
    decide_hedge,
    hedge_delay,
    quantile,
    remaining_seconds,
    size_class,
    wasted_tokens,
)
from teamorch.policies.reporting import build_report
from teamorch.policies.synthesis import merge_statistics

ON = BalancerConfig(hedge=True, hedge_quantile=0.95, hedge_min_samples=10, hedge_min_seconds=0.1)


def row(name: str, **kw: Any) -> ServerLoad:
    base: dict[str, Any] = {
        "slots": 1,
        "effective_slots": 1,
        "models_present": ["m"],
        "models_loaded": ["m"],
        "ewma_token_seconds": 0.01,
        "ewma_ttft": 0.05,
    }
    return ServerLoad(name=name, **{**base, **kw})


def req(**kw: Any) -> LeaseRequest:
    return LeaseRequest(model="m", expected_tokens=100, **kw)


def tail(ratios: list[float], tokens: int = 100, window: int = WINDOW) -> LatencyTail:
    out = LatencyTail(window=window)
    for r in ratios:
        out.add(tokens, r)
    return out


# ---- the tail -------------------------------------------------------------------------------


def test_size_classes_are_powers_of_two_from_32_and_cap_at_1024() -> None:
    assert [size_class(n) for n in (1, 31, 32, 63, 64, 1023, 1024, 100_000)] == [0, 0, 1, 1, 2, 5, 6, 6]


def test_quantile_is_a_measured_value_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert quantile(values, 0.95) == 19.0
    assert quantile(values, 0.5) == 10.0
    assert quantile([3.0], 0.95) == 3.0


def test_the_tail_is_bounded_and_forgets_the_oldest() -> None:
    t = tail([100.0] + [1.0] * WINDOW)
    assert len(t.classes[size_class(100)]) == WINDOW
    assert t.quantile(100, 0.95, 10) == 1.0  # the old outlier fell out


def test_a_size_class_with_too_few_samples_uses_every_size_and_none_until_enough() -> None:
    t = tail([1.0] * 9, tokens=40)
    assert t.quantile(40, 0.95, 10) is None  # nine samples: an unknown tail is never hedged
    t.add(500, 3.0)
    assert t.quantile(40, 0.95, 10) == 3.0  # still < 10 of its own size: the pool speaks
    for _ in range(10):
        t.add(500, 2.0)
    assert t.quantile(500, 0.95, 10) == 3.0  # its own class now (11 samples, nearest rank 11)


def test_record_latency_keeps_answers_and_hedged_out_stragglers_only() -> None:
    server, fleet = LatencyTail(), LatencyTail()

    def out(outcome: str, latency: float | None = 2.0) -> LeaseOutcome:
        return LeaseOutcome(lease_id="a-1", outcome=outcome, model="m", latency=latency)  # type: ignore[arg-type]

    record_latency((server, fleet), out("ok"), 1.0, 100)
    record_latency((server, fleet), out("cancelled", 5.0), 1.0, 100, hedged=True)  # lost to its hedge
    record_latency((server, fleet), out("cancelled"), 1.0, 100)  # cancelled for another reason: no sample
    record_latency((server, fleet), out("error"), 1.0, 100)
    record_latency((server, fleet), out("ok", None), 1.0, 100)
    record_latency((server, fleet), out("ok"), 0.0, 100)
    assert list(server.classes[size_class(100)]) == [2.0, 5.0] == list(fleet.classes[size_class(100)])


# ---- when a call is a straggler ---------------------------------------------------------------


def test_hedge_delay_is_expected_seconds_times_the_servers_quantile() -> None:
    server = tail([1.0] * 18 + [1.5, 4.0])  # p95 of 20 = the 19th = 1.5
    assert hedge_delay(server, LatencyTail(), 2.0, 100, ON) == pytest.approx(3.0)


def test_hedge_delay_never_exceeds_the_fleets_quantile() -> None:
    # A server slow so often that its slow spells own its p95 is still hedged at the fleet's tail.
    server = tail([1.0] * 12 + [10.0] * 8)
    fleet = tail([1.0] * 90 + [1.2] * 5 + [10.0] * 5, window=4 * WINDOW)  # the balancer's fleet-wide window
    assert hedge_delay(server, fleet, 2.0, 100, ON) == pytest.approx(2.4)


def test_no_hedge_when_off_unmeasured_or_unexpected_and_never_below_the_minimum() -> None:
    server = tail([1.0] * 20)
    assert hedge_delay(server, server, 2.0, 100, BalancerConfig()) is None  # off by default
    assert hedge_delay(tail([1.0] * 9), LatencyTail(), 2.0, 100, ON) is None
    assert hedge_delay(server, server, 0.0, 100, ON) is None
    assert hedge_delay(server, server, 0.01, 100, ON) == ON.hedge_min_seconds


# ---- whether and where a duplicate starts -------------------------------------------------------


def test_a_straggler_is_hedged_on_the_fastest_other_free_server() -> None:
    loads = [row("a", in_flight=1), row("slow", ewma_token_seconds=0.05), row("fast")]
    decision = decide_hedge(loads, req(), "a", remaining=2.0, waiting=0, already_hedged=False)
    assert decision.server == "fast" and decision.check_after is None


def test_never_a_second_hedge_and_never_while_requests_are_queued() -> None:
    loads = [row("a", in_flight=1), row("b")]
    again = decide_hedge(loads, req(), "a", 2.0, waiting=0, already_hedged=True)
    assert (again.server, again.check_after) == (None, None)
    queued = decide_hedge(loads, req(), "a", 2.0, waiting=1, already_hedged=False)
    assert queued.server is None and queued.check_after == RECHECK_SECONDS  # a queued task's slot is not ours


def test_no_free_slot_elsewhere_means_ask_again_later() -> None:
    loads = [row("a", in_flight=1), row("b", in_flight=1)]
    decision = decide_hedge(loads, req(), "a", 2.0, 0, False)
    assert decision.server is None and decision.check_after == RECHECK_SECONDS


@pytest.mark.parametrize(
    ("other", "request_kw"),
    [
        ({"healthy": False}, {}),
        ({"circuit": "open"}, {}),
        ({"models_present": ["other"]}, {}),
        ({}, {"requires": ["gpu"]}),
        ({}, {"exclude": ["b"]}),
        ({}, {"server": "a"}),  # pinned: never hedged
    ],
    ids=["unhealthy", "circuit-open", "no-model", "lacks-tags", "excluded", "pinned"],
)
def test_only_a_server_that_could_run_the_request_takes_its_hedge(
    other: dict[str, Any], request_kw: dict[str, Any]
) -> None:
    loads = [row("a", in_flight=1, tags=["gpu"]), row("b", **other)]
    decision = decide_hedge(loads, req(**request_kw), "a", 2.0, 0, False)
    assert (decision.server, decision.check_after) == (None, None)


def test_the_primary_server_never_hedges_itself_even_with_a_free_slot() -> None:
    loads = [row("a", slots=2, effective_slots=2, in_flight=1)]
    assert decide_hedge(loads, req(), "a", 2.0, 0, False).server is None


def test_a_copy_that_would_not_beat_the_primary_waits_and_asks_again() -> None:
    loads = [row("a", in_flight=1), row("b", ewma_token_seconds=0.05)]  # b: 0.05 + 100 x 0.05 = 5.05 s
    early = decide_hedge(loads, req(), "a", remaining=2.0, waiting=0, already_hedged=False)
    assert early.server is None and early.check_after == RECHECK_SECONDS
    assert decide_hedge(loads, req(), "a", remaining=5.1, waiting=0, already_hedged=False).server == "b"


def test_remaining_time_comes_from_the_calls_that_ran_that_long_before() -> None:
    # This server's slow spells run at 1/8 of its speed: a call 2x overdue ends at 8x, 6 expected durations on.
    spells = tail([1.0] * 30 + [8.0, 8.0])
    assert spells.excess(2.0) == pytest.approx(6.0)
    assert remaining_seconds(spells, elapsed=1.0, expected=0.5) == pytest.approx(3.0)


def test_a_call_slower_than_anything_seen_is_expected_to_run_as_long_again() -> None:
    assert remaining_seconds(tail([1.0] * 30 + [8.0]), elapsed=5.0, expected=0.5) == 5.0  # 10x: never seen
    assert remaining_seconds(LatencyTail(), elapsed=0.7, expected=0.5) == 0.7


def test_diversity_groups_prefer_a_server_the_group_does_not_hold() -> None:
    loads = [row("a", in_flight=1), row("b"), row("c", ewma_token_seconds=0.011)]
    decision = decide_hedge(loads, req(avoid=["b"]), "a", 2.0, 0, False)
    assert decision.server == "c"


# ---- what a loser cost, and the report ---------------------------------------------------------


def test_wasted_tokens_are_the_share_of_the_answer_the_slot_could_have_made() -> None:
    assert wasted_tokens(0.5, 2.0, 100) == 25
    assert wasted_tokens(10.0, 2.0, 100) == 100  # a straggler held its slot longer than the whole answer takes
    assert wasted_tokens(1.0, None, 80) == 80


def _result(task_id: str, server: str, attempts: list[Attempt]) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        specialist="s",
        server=server,
        status="succeeded",
        attempts=attempts,
        started_at=0.0,
        ended_at=2.0,
        duration=2.0,
        hedged=any(a.hedge for a in attempts),
    )


def test_the_report_counts_hedges_hedge_wins_and_wasted_tokens() -> None:
    plan = OrchestrationPlan(problem="p", tasks=[{"task_id": t, "specialist": "s"} for t in ("won", "lost", "plain")])
    results = {
        "won": _result(
            "won",
            "b",
            [
                Attempt(server="a", started_at=0, ended_at=2, outcome="cancelled", wasted_tokens=40),
                Attempt(server="b", started_at=1, ended_at=2, outcome="ok", hedge=True),
            ],
        ),
        "lost": _result(
            "lost",
            "a",
            [
                Attempt(server="a", started_at=0, ended_at=2, outcome="ok"),
                Attempt(server="b", started_at=1, ended_at=2, outcome="cancelled", hedge=True, wasted_tokens=7),
            ],
        ),
        "plain": _result("plain", "a", [Attempt(server="a", started_at=0, ended_at=1, outcome="ok")]),
    }
    stats = build_report(plan, "r", results, 2.0).statistics
    assert (stats.hedges, stats.hedge_wins, stats.wasted_tokens) == (2, 1, 47)
    twice = merge_statistics(stats, stats)
    assert (twice.hedges, twice.hedge_wins, twice.wasted_tokens) == (4, 2, 94)


# ---- configuration ---------------------------------------------------------------------------


def test_hedging_is_off_by_default() -> None:
    assert BalancerConfig().hedge is False


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("hedge_quantile", 1.0, "less than 1"),
        ("hedge_quantile", 0.2, "greater than or equal to 0.5"),
        ("hedge_min_samples", 0, "greater than or equal to 1"),
        ("hedge_min_seconds", -1, "greater than or equal to 0"),
    ],
)
def test_a_bad_hedging_value_names_its_field_and_value(tmp_path: Path, key: str, value: float, says: str) -> None:
    path = tmp_path / "team.yaml"
    path.write_text(f"balancer:\n  hedge: true\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_team(path)
    text = str(err.value)
    assert f"balancer.{key}" in text and says in text and str(value) in text and "team.yaml" in text
