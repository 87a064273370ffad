"""Server choice, admission control and eligibility over hand-built load snapshots (no Ray, no I/O)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from teamorch.errors import NoServerAvailable
from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import (
    COALESCE_FRACTION,
    COALESCE_SECONDS,
    COLD_COALESCE_SECONDS,
    COLD_QUIET_SECONDS,
    COLD_WAVE_SECONDS,
    DEFAULT_EXPECTED_TOKENS,
    LOAD_PENALTY_SECONDS,
    OVERDUE_SECONDS,
    POLICIES,
    PRIOR_TOKEN_SECONDS,
    PRIOR_TTFT,
    Queued,
    _speeds,
    _virtual_slots,
    apply_group_diversity,
    choose,
    coalesce_delay,
    eligible,
    has_capacity,
    plan_dispatch,
    planned_seconds,
    wave_deadline,
)


def srv(name: str, slots: int = 2, **kw: Any) -> ServerLoad:
    kw.setdefault("effective_slots", slots)
    return ServerLoad(name=name, slots=slots, **kw)


def req(model: str = "m", **kw: Any) -> LeaseRequest:
    return LeaseRequest(model=model, **kw)


# ---- policy choices ---------------------------------------------------------------------


def test_least_loaded_uses_fraction_of_slots_not_absolute_in_flight() -> None:
    # big has more requests in flight (2 vs 1) but a smaller share of its slots (2/8 vs 1/2).
    loads = [srv("small", slots=2, in_flight=1), srv("big", slots=8, in_flight=2)]
    assert choose("least_loaded", loads, req()) == "big"


def test_least_loaded_uses_effective_slots_not_configured_slots() -> None:
    # "penalised" has 8 slots configured but only 2 usable after 503s: 1/2 busy beats 1/4.
    loads = [srv("penalised", slots=8, effective_slots=2, in_flight=1), srv("other", slots=4, in_flight=1)]
    assert choose("least_loaded", loads, req()) == "other"


def test_round_robin_cycles_through_servers_in_name_order() -> None:
    loads = [srv("c"), srv("a"), srv("b")]
    picks = [choose("round_robin", loads, req(), counter=i) for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_skips_a_full_server_to_the_next_in_the_ring() -> None:
    loads = [srv("a"), srv("b", in_flight=2), srv("c")]
    assert choose("round_robin", loads, req(), counter=1) == "c"
    # wraps around the ring past the end
    loads = [srv("a"), srv("b"), srv("c", in_flight=2)]
    assert choose("round_robin", loads, req(), counter=2) == "a"


def test_capability_prefers_most_matching_tags_over_lower_load() -> None:
    loads = [
        srv("plain", tags=[]),
        srv("coder", tags=["code"]),
        srv("both", tags=["code", "math"], in_flight=1),
    ]
    assert choose("capability", loads, req(), capabilities=["code", "math"]) == "both"


def test_capability_breaks_equal_match_by_load() -> None:
    loads = [srv("a", tags=["code"], in_flight=1), srv("b", tags=["code"])]
    assert choose("capability", loads, req(), capabilities=["code"]) == "b"


def test_capability_without_capabilities_behaves_like_least_loaded() -> None:
    loads = [srv("a", tags=["code"], in_flight=1), srv("b", tags=[])]
    assert choose("capability", loads, req(), capabilities=[]) == "b"


def test_peak_ewma_picks_the_lowest_expected_completion_time() -> None:
    loads = [
        srv("slow", ewma_ttft=0.2, ewma_token_seconds=0.01),  # 0.2 + 1.0 = 1.2 s
        srv("fast", ewma_ttft=0.2, ewma_token_seconds=0.005),  # 0.2 + 0.5 = 0.7 s
    ]
    assert choose("peak_ewma", loads, req(expected_tokens=100)) == "fast"


def test_peak_ewma_penalises_error_rate() -> None:
    loads = [
        srv("a", ewma_ttft=0.2, ewma_token_seconds=0.01, error_rate=0.5),
        srv("b", ewma_ttft=0.2, ewma_token_seconds=0.01),
    ]
    assert choose("peak_ewma", loads, req(expected_tokens=100)) == "b"


def test_peak_ewma_prefers_a_warm_server_over_a_faster_one_that_must_load_the_model() -> None:
    # "cold" is 10x faster per token but must load the model first (+LOAD_PENALTY_SECONDS).
    loads = [
        srv("cold", ewma_ttft=0.2, ewma_token_seconds=0.001, models_loaded=[]),  # 0.3 + 5
        srv("warm", ewma_ttft=0.2, ewma_token_seconds=0.01, models_loaded=["m"]),  # 1.2
    ]
    assert choose("peak_ewma", loads, req(expected_tokens=100)) == "warm"


def test_planned_seconds_formula_priors_and_pessimism_about_the_unknown() -> None:
    r = req(expected_tokens=100)
    measured = srv("x", ewma_ttft=0.5, ewma_token_seconds=0.02)
    assert planned_seconds(measured, r, [measured]) == pytest.approx(0.5 + 0.02 * 100)
    # nothing measured anywhere: the priors and the default token count
    blank = srv("new")
    assert planned_seconds(blank, req(), [blank]) == pytest.approx(
        PRIOR_TTFT + PRIOR_TOKEN_SECONDS * DEFAULT_EXPECTED_TOKENS
    )
    # unmeasured server in a measured fleet: as slow as the slowest measured server
    fleet = [srv("p", ewma_ttft=0.3, ewma_token_seconds=0.05), srv("q", ewma_ttft=0.9, ewma_token_seconds=0.01), blank]
    assert planned_seconds(blank, r, fleet) == pytest.approx(0.9 + 0.05 * 100)
    # model present but not loaded costs a load
    cold = srv("cold", ewma_ttft=0.5, ewma_token_seconds=0.02, models_loaded=["other"])
    assert planned_seconds(cold, r, [cold]) == pytest.approx(0.5 + 2.0 + LOAD_PENALTY_SECONDS)
    # error rate multiplies the cost
    flaky = srv("flaky", ewma_ttft=0.5, ewma_token_seconds=0.02, error_rate=0.25)
    assert planned_seconds(flaky, r, [flaky]) == pytest.approx((0.5 + 2.0) * 2.0)


# ---- peak_ewma: waiting for a fast busy server ---------------------------------------------

FAST_BUSY = srv("fast", slots=1, in_flight=1, ewma_ttft=0.1, ewma_token_seconds=0.001)  # 0.2 s each, full
SLOW_IDLE = srv("slow", slots=1, in_flight=0, ewma_ttft=1.0, ewma_token_seconds=0.1)  # 11 s, free
FAST_REQ = req(expected_tokens=100)


def test_peak_ewma_waits_for_a_fast_busy_server_rather_than_start_on_a_slow_idle_one() -> None:
    # fast frees in 0.1 s and finishes this request at 0.3 s; slow would take 11 s.
    assert plan_dispatch("peak_ewma", [FAST_BUSY, SLOW_IDLE], [Queued(FAST_REQ)], running={"fast": [0.1]}) == {}
    assert choose("peak_ewma", [FAST_BUSY, SLOW_IDLE], FAST_REQ) is None


def test_peak_ewma_takes_the_slow_idle_server_when_the_busy_one_frees_too_late() -> None:
    # fast stays busy for 20 s more: the request finishes sooner on slow (11 s) than after waiting (20.2 s).
    assert plan_dispatch("peak_ewma", [FAST_BUSY, SLOW_IDLE], [Queued(FAST_REQ)], running={"fast": [20.0]}) == {
        0: "slow"
    }


def test_peak_ewma_takes_an_idle_server_that_finishes_before_the_busy_one_would() -> None:
    # Idle "medium" (0.3 s) beats waiting for busy "fast" (0.1 s + 0.2 s + a little).
    medium = srv("medium", slots=1, ewma_ttft=0.1, ewma_token_seconds=0.002)
    assert plan_dispatch("peak_ewma", [FAST_BUSY, medium], [Queued(FAST_REQ)], running={"fast": [0.2]}) == {0: "medium"}


def test_peak_ewma_starts_the_longest_job_first_unless_a_short_one_has_waited_long() -> None:
    one = [srv("s", slots=1, ewma_ttft=0.1, ewma_token_seconds=0.01)]
    short, long = req(expected_tokens=10), req(expected_tokens=1000)
    assert plan_dispatch("peak_ewma", one, [Queued(short), Queued(long)]) == {1: "s"}
    # aging: seconds already waited count toward a job's size, so short jobs cannot starve
    assert plan_dispatch("peak_ewma", one, [Queued(short, waited=60.0), Queued(long)]) == {0: "s"}


def test_peak_ewma_gives_an_unmeasured_server_one_request_at_a_time() -> None:
    known = srv("known", slots=1, in_flight=1, ewma_ttft=0.1, ewma_token_seconds=0.01)
    new_busy = srv("new", slots=4, in_flight=1)
    queue = [Queued(req(expected_tokens=10)) for _ in range(3)]
    assert plan_dispatch("peak_ewma", [known, new_busy], queue, running={"known": [0.1], "new": [1.0]}) == {}
    new_idle = srv("new", slots=4)
    assert list(plan_dispatch("peak_ewma", [known, new_idle], queue, running={"known": [5.0]}).values()) == ["new"]


def test_peak_ewma_breaks_exact_ties_with_the_rng_and_a_seed_reproduces_the_pick() -> None:
    # Six identical measured servers: every finish and start time ties exactly, so only the rng decides.
    loads = [srv(n, ewma_ttft=0.2, ewma_token_seconds=0.01) for n in "abcdef"]
    picks = {seed: choose("peak_ewma", loads, req(), rng=random.Random(seed)) for seed in range(20)}
    assert all(choose("peak_ewma", loads, req(), rng=random.Random(seed)) == pick for seed, pick in picks.items())
    assert len(set(picks.values())) > 1, "the seed never mattered: the rng is not breaking the tie"
    # without an rng, `counter` seeds it
    assert choose("peak_ewma", loads, req(), counter=3) == picks[3]


# ---- ties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["least_loaded", "capability", "round_robin"])
def test_ties_are_broken_by_name_whatever_the_input_order(policy: str) -> None:
    loads = [srv("zulu", tags=["x"]), srv("mike", tags=["x"]), srv("bravo", tags=["x"])]
    assert choose(policy, loads, req(), capabilities=["x"]) == "bravo"
    assert choose(policy, list(reversed(loads)), req(), capabilities=["x"]) == "bravo"


# ---- admission control: wait ------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_all_servers_full_means_wait(policy: str) -> None:
    loads = [
        srv("a", slots=2, in_flight=2),
        srv("b", slots=4, effective_slots=1, in_flight=1),  # 503 back-off shrank it to one slot
        srv("c", slots=4, in_flight=1, circuit="half_open"),  # its one probe is out
    ]
    assert choose(policy, loads, req()) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_a_full_server_is_never_chosen_while_another_is_free(policy: str) -> None:
    loads = [srv("a", slots=1, in_flight=1), srv("b", slots=1, in_flight=0)]
    for counter in range(4):
        assert choose(policy, loads, req(), counter=counter) == "b"


# ---- eligibility: NoServerAvailable ------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_no_server_available_names_each_server_and_why(policy: str) -> None:
    loads = [
        srv("alpha", healthy=False, last_error="connection refused"),
        srv("beta", circuit="open"),
        srv("gamma"),
        srv("delta", models_present=["other"]),
        srv("epsilon", tags=["cpu"]),
    ]
    r = req(exclude=["gamma"], requires=["gpu"])
    with pytest.raises(NoServerAvailable) as info:
        choose(policy, loads, r)
    msg = info.value.message
    assert "'m'" in msg
    assert "alpha: unhealthy (connection refused)" in msg
    assert "beta: circuit open" in msg
    assert "gamma: already failed" in msg
    assert "delta: has no model 'm'" in msg
    assert "epsilon: lacks tags ['gpu']" in msg


@pytest.mark.parametrize("policy", POLICIES)
def test_all_servers_down_raises_instead_of_waiting(policy: str) -> None:
    loads = [srv("a", healthy=False), srv("b", healthy=False, circuit="open")]
    with pytest.raises(NoServerAvailable, match=r"a: unhealthy.*b: unhealthy"):
        choose(policy, loads, req())


def test_open_circuit_reason_uses_last_error_when_known() -> None:
    with pytest.raises(NoServerAvailable, match=r"a: circuit open \(HTTP 500 boom\)"):
        eligible([srv("a", circuit="open", last_error="HTTP 500 boom")], req())


def test_model_missing_everywhere_names_the_model_and_servers() -> None:
    loads = [srv("a", models_present=["llama3:8b"]), srv("b", models_present=[])]
    with pytest.raises(NoServerAvailable) as info:
        choose("least_loaded", loads, req("qwen3:8b"))
    msg = info.value.message
    assert "'qwen3:8b'" in msg
    assert "a: has no model 'qwen3:8b'" in msg
    assert "b: has no model 'qwen3:8b'" in msg


def test_empty_team_raises() -> None:
    with pytest.raises(NoServerAvailable, match="no servers"):
        choose("least_loaded", [], req())


def test_unknown_model_list_counts_as_maybe_present() -> None:
    # models_present=None: not polled yet, so not a reason to refuse
    assert choose("least_loaded", [srv("a", models_present=None), srv("b", models_present=["x"])], req()) == "a"


def test_model_missing_on_some_servers_routes_to_the_one_that_has_it() -> None:
    loads = [srv("a", models_present=["x"]), srv("b", models_present=["m"], in_flight=1)]
    assert choose("least_loaded", loads, req()) == "b"


# ---- pinned, exclude, requires -----------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_pinned_server_is_used_even_when_others_are_idle(policy: str) -> None:
    loads = [srv("a"), srv("b", in_flight=1, ewma_ttft=5.0, ewma_token_seconds=1.0), srv("c")]
    assert choose(policy, loads, req(server="b"), counter=0) == "b"


@pytest.mark.parametrize("policy", POLICIES)
def test_pinned_full_server_waits_rather_than_going_elsewhere(policy: str) -> None:
    loads = [srv("a"), srv("b", in_flight=2)]
    assert choose(policy, loads, req(server="b")) is None


def test_pinned_unknown_server_raises_naming_it() -> None:
    with pytest.raises(NoServerAvailable, match="'ghost'"):
        choose("least_loaded", [srv("a")], req(server="ghost"))


def test_pinned_broken_server_raises_instead_of_falling_back() -> None:
    with pytest.raises(NoServerAvailable, match="b: unhealthy"):
        choose("least_loaded", [srv("a"), srv("b", healthy=False)], req(server="b"))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("field", ["exclude", "avoid"])
def test_excluded_or_avoided_server_loses_to_a_free_other(policy: str, field: str) -> None:
    # "a" would win every policy on its own merits
    # "b" is measured: peak_ewma gives an unmeasured busy server only one request at a time.
    b = srv("b", in_flight=1, ewma_ttft=0.2, ewma_token_seconds=0.01)
    loads = [srv("a", slots=8, tags=["x"], ewma_ttft=0.01, ewma_token_seconds=0.0001), b]
    for counter in range(3):
        assert choose(policy, loads, req(**{field: ["a"]}), counter=counter, capabilities=["x"]) == "b"


@pytest.mark.parametrize("policy", POLICIES)
def test_requires_filters_to_servers_with_all_tags(policy: str) -> None:
    b = srv("b", tags=["gpu", "big"], in_flight=1, ewma_ttft=0.2, ewma_token_seconds=0.01)
    loads = [srv("a", tags=["gpu"]), b, srv("c", tags=["big"])]
    for counter in range(3):
        assert choose(policy, loads, req(requires=["gpu", "big"]), counter=counter) == "b"


def test_requires_reason_lists_only_the_missing_tags_sorted() -> None:
    with pytest.raises(NoServerAvailable, match=r"a: lacks tags \['big', 'zeta'\]"):
        eligible([srv("a", tags=["gpu"])], req(requires=["zeta", "gpu", "big"]))


# ---- model affinity ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "capability"])
def test_affinity_prefers_a_free_server_with_the_model_loaded(policy: str) -> None:
    loads = [srv("a", models_loaded=[]), srv("b", slots=2, in_flight=1, models_loaded=["m"])]
    assert choose(policy, loads, req(), counter=0) == "b"
    assert choose(policy, loads, req(), counter=0, affinity=False) == "a"


def test_affinity_falls_back_when_the_loaded_server_is_full() -> None:
    loads = [srv("a", models_loaded=[]), srv("b", slots=1, in_flight=1, models_loaded=["m"])]
    assert choose("least_loaded", loads, req()) == "a"


def test_affinity_does_not_treat_unknown_loaded_list_as_loaded() -> None:
    loads = [srv("a", models_loaded=None), srv("b", in_flight=1, models_loaded=["m"])]
    assert choose("least_loaded", loads, req()) == "b"
    loads = [srv("a", models_loaded=None), srv("b", in_flight=1, models_loaded=["other"])]
    assert choose("least_loaded", loads, req()) == "a"


# ---- avoid (diversity) -------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_avoid_everything_still_chooses_a_server(policy: str) -> None:
    loads = [srv("a", slots=1, in_flight=1), srv("b")]
    for counter in range(3):
        assert choose(policy, loads, req(avoid=["a", "b"]), counter=counter) == "b"


@pytest.mark.parametrize("policy", POLICIES)
def test_avoid_does_not_block_when_only_an_avoided_server_is_free(policy: str) -> None:
    loads = [srv("a"), srv("b", slots=1, in_flight=1)]
    assert choose(policy, loads, req(avoid=["a"])) == "a"


# ---- half-open circuit -------------------------------------------------------------------


def test_has_capacity_half_open_admits_exactly_one() -> None:
    assert has_capacity(srv("a", slots=4, circuit="half_open", in_flight=0))
    assert not has_capacity(srv("a", slots=4, circuit="half_open", in_flight=1))
    assert has_capacity(srv("a", slots=4, circuit="closed", in_flight=3))
    assert not has_capacity(srv("a", slots=4, circuit="closed", in_flight=4))
    assert not has_capacity(srv("a", slots=4, healthy=False))


@pytest.mark.parametrize("policy", POLICIES)
def test_half_open_server_gets_one_probe_then_nothing(policy: str) -> None:
    assert choose(policy, [srv("h", slots=4, circuit="half_open")], req()) == "h"
    assert choose(policy, [srv("h", slots=4, circuit="half_open", in_flight=1)], req()) is None


HALF_OPEN_BUSY = [
    # "h" would otherwise be the obvious pick: more slots, less loaded, faster
    srv("h", slots=8, circuit="half_open", in_flight=1, ewma_ttft=0.1, ewma_token_seconds=0.001),
    srv("z", slots=2, in_flight=1, ewma_ttft=0.2, ewma_token_seconds=0.01),
]


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "capability"])
def test_half_open_server_with_its_probe_out_sends_traffic_elsewhere(policy: str) -> None:
    for counter in range(3):
        assert choose(policy, HALF_OPEN_BUSY, req(), counter=counter) == "z"


def test_peak_ewma_never_sends_a_second_request_to_a_half_open_server() -> None:
    # peak_ewma may wait for the faster half-open server, but never grants it a second request.
    for remaining in (0.01, 1.0, 60.0):
        decision = plan_dispatch("peak_ewma", HALF_OPEN_BUSY, [Queued(req())], running={"h": [remaining], "z": [0.5]})
        assert decision.get(0) in (None, "z")


# ---- policy names ------------------------------------------------------------------------


def test_unknown_policy_raises_value_error_listing_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'fastest'.*round_robin.*least_loaded.*capability.*peak_ewma"):
        choose("fastest", [srv("a")], req())


def test_unknown_policy_is_reported_before_eligibility() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        choose("nope", [], req())


@pytest.mark.parametrize("policy", POLICIES)
def test_queue_planning_honours_avoid_without_blocking(policy: str) -> None:
    loads = [srv("a"), srv("b", slots=1, in_flight=1), srv("c")]
    # A free non-avoided server exists: the avoided one is not used.
    assert plan_dispatch(policy, loads, [Queued(req(avoid=["a"]))]) == {0: "c"}
    # Only the avoided server is free: it is used rather than waiting.
    loads = [srv("a"), srv("b", slots=1, in_flight=1)]
    assert plan_dispatch(policy, loads, [Queued(req(avoid=["a"]))]) == {0: "a"}


# ---- peak_ewma's virtual timeline ----------------------------------------------------------


def test_virtual_slots_hold_the_latest_ending_requests_and_never_free_an_overdue_one_now() -> None:
    loads = [
        srv("busy", slots=2, in_flight=3, ewma_ttft=0.1, ewma_token_seconds=0.01),  # 3 running (after a 503 shrink)
        srv("overdue", slots=2, in_flight=1, ewma_ttft=0.1, ewma_token_seconds=0.01),
        srv("guess", slots=2, in_flight=1, ewma_ttft=0.5, ewma_token_seconds=0.01),  # in flight, no estimate given
        srv("new", slots=4),  # unmeasured: one slot until its first answer
        srv("down", slots=2, healthy=False),
        srv("half", slots=4, circuit="half_open", ewma_ttft=0.1, ewma_token_seconds=0.01),
    ]
    running = {"busy": [3.0, 1.0, 2.0], "overdue": [-4.0]}
    slots = {
        name: sorted(server.free_times()) for name, server in _virtual_slots(loads, _speeds(loads), running).items()
    }
    assert slots == {
        "busy": [2.0, 3.0],
        "overdue": [0.0, OVERDUE_SECONDS],
        "guess": [0.0, pytest.approx(0.5 + 0.01 * DEFAULT_EXPECTED_TOKENS)],
        "new": [0.0],
        "down": [],
        "half": [0.0],
    }


# ---- coalescing an arrival with its wave ---------------------------------------------------


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "peak_ewma"])
def test_only_peak_ewma_coalesces(policy: str) -> None:
    assert coalesce_delay(policy, [srv("a")], req()) is None


def test_a_cold_balancer_plans_once_the_wave_stops_arriving_a_busy_measured_one_at_its_delay() -> None:
    cold = [srv("a"), srv("b")]
    measured = [srv("a", in_flight=1), srv("b", ewma_ttft=0.1, ewma_token_seconds=0.01)]
    # measured and busy: the timer set by the wave's first arrival stands, whoever comes later
    assert wave_deadline(measured, first=10.0, now=10.004, delay=0.005) == pytest.approx(10.005)
    # cold: each arrival moves it to COLD_QUIET_SECONDS after itself (a specialist's burst after another's)...
    assert wave_deadline(cold, first=10.0, now=10.0, delay=0.007) == pytest.approx(10.0 + COLD_QUIET_SECONDS)
    assert wave_deadline(cold, first=10.0, now=10.05, delay=0.007) == pytest.approx(10.05 + COLD_QUIET_SECONDS)
    # ...or to its own delay if later, but at most COLD_WAVE_SECONDS after the first arrival
    assert wave_deadline(cold, first=10.0, now=10.0, delay=1.0) == pytest.approx(10.0 + COLD_WAVE_SECONDS)
    assert wave_deadline(cold, first=10.0, now=11.0, delay=0.007) == pytest.approx(10.0 + COLD_WAVE_SECONDS)


def test_an_idle_measured_fleet_waits_for_a_wave_but_not_for_a_lone_arrival() -> None:
    """A measured fleet gone idle: a plan at the wave's first few arrivals decides slots the rest needed, so it
    waits for the wave (planned at its first few arrivals, fleet C's replay paid 12 cold prefills instead of 9)."""
    served = {"ewma_ttft": 0.1, "ewma_token_seconds": 0.01, "completed": 5}
    idle = [srv("a", **served), srv("b", **served)]
    assert wave_deadline(idle, first=10.0, now=10.0, delay=0.005) == pytest.approx(10.005)
    assert wave_deadline(idle, first=10.0, now=10.004, delay=0.005) == pytest.approx(10.004 + COLD_QUIET_SECONDS)
    assert wave_deadline(idle, first=10.0, now=11.0, delay=0.005) == pytest.approx(10.0 + COLD_WAVE_SECONDS)
    # a fleet answering in about a millisecond (delay 1 % of that) waits a few delays, not COLD_QUIET_SECONDS
    assert wave_deadline(idle, first=10.0, now=10.0001, delay=0.00001) == pytest.approx(10.0001 + 0.0001)


def test_the_first_wave_on_measured_speeds_is_held_as_a_cold_one() -> None:
    """Speeds from fleet memory or from the speed probes (at most one answer per server): the team's first plan
    decides every slot's first prefix, so even a lone arrival or a millisecond fleet waits as on a cold start."""
    probed = [srv(n, ewma_ttft=0.1, ewma_token_seconds=0.01, completed=1) for n in ("a", "b")]
    cold = [srv("a"), srv("b")]
    for now, delay in ((10.0, 0.005), (10.004, 0.005), (10.0001, 0.00001), (11.0, 0.005)):
        assert wave_deadline(probed, 10.0, now, delay) == pytest.approx(
            min(10.0 + COLD_WAVE_SECONDS, max(10.0 + COLD_COALESCE_SECONDS, now + COLD_QUIET_SECONDS))
        )
        assert wave_deadline(probed, 10.0, now, delay) >= wave_deadline(cold, 10.0, now, delay)
    served = [probed[0].model_copy(update={"completed": 2}), probed[1]]
    assert wave_deadline(served, 10.0, 10.0, 0.005) == pytest.approx(10.005)  # a task answered: as before


def test_coalesce_delay_is_a_small_fraction_of_the_quickest_service_capped() -> None:
    # nothing free: nothing to plan until a release, so no timer
    assert coalesce_delay("peak_ewma", [srv("a", slots=1, in_flight=1)], req()) is None
    # priors: 0.2 + 0.02 x 256 = 5.32 s, so the cap applies (the longer one: nothing is measured yet)
    assert coalesce_delay("peak_ewma", [srv("a")], req()) == COLD_COALESCE_SECONDS
    slow_measured = srv("a", ewma_ttft=0.2, ewma_token_seconds=0.02)
    assert coalesce_delay("peak_ewma", [slow_measured], req()) == COALESCE_SECONDS
    # a 0.11 s request on the quickest server waits 1% of that, wherever the slow one is
    fast = srv("fast", ewma_ttft=0.01, ewma_token_seconds=0.001)
    slow = srv("slow", ewma_ttft=1.0, ewma_token_seconds=0.1)
    assert coalesce_delay("peak_ewma", [slow, fast], req(expected_tokens=100)) == pytest.approx(
        COALESCE_FRACTION * 0.11
    )
    # a model load counts toward the service time (with affinity)
    cold = fast.model_copy(update={"models_loaded": []})
    assert coalesce_delay("peak_ewma", [cold], req(expected_tokens=100)) == COALESCE_SECONDS
    assert coalesce_delay("peak_ewma", [cold], req(expected_tokens=100), affinity=False) == pytest.approx(0.0011)


# ---- diversity groups within one round -----------------------------------------------------


def test_group_diversity_holds_back_a_second_grant_of_one_group_on_one_server() -> None:
    queue = [
        Queued(req(group="g")),
        Queued(req(group="g")),  # same group, same server as #0: held back
        Queued(req(group="h")),  # another group may share the server
        Queued(req(group="g")),  # same group, another server
        Queued(req()),  # no group
        Queued(req(group="g")),  # refusals pass through untouched
    ]
    refused = NoServerAvailable("no")
    decisions = {5: refused, 4: "a", 3: "b", 2: "a", 1: "a", 0: "a"}
    kept, held_back = apply_group_diversity(decisions, queue)
    assert held_back
    assert kept == {0: "a", 2: "a", 3: "b", 4: "a", 5: refused}
    assert list(kept) == [5, 4, 3, 2, 0], "grants are made in the plan's order: a server picks slots as they arrive"
    assert apply_group_diversity({0: "a", 3: "b"}, queue) == ({0: "a", 3: "b"}, False)
