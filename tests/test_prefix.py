"""Prefix signatures, the per-slot prefix index and the cache- and residency-aware cost (pure: no Ray, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from teamorch.config import RetryConfig, ServerConfig, SpecialistConfig
from teamorch.messages import LeaseOutcome, LeaseRequest, ProbeResult, ServerLoad, Task
from teamorch.policies.balancing import LOAD_PENALTY_SECONDS, Planner, Queued, plan_dispatch, planned_seconds
from teamorch.policies.fleet import (
    MIN_PREFILL_SAMPLE,
    Placement,
    ServerStats,
    record_grant,
    record_outcome,
    record_probe,
    to_load,
)
from teamorch.policies.prefix import SlotIndex, SlotState, matched_tokens, signature
from teamorch.policies.prompting import build_messages, prompt_blocks
from teamorch.sim_model import SlotCaches, tokenize

ROLE = "You audit payment code. " + "Check every branch that moves money. " * 40  # ~280 words
SPEC = SpecialistConfig(name="Auditor", system_prompt=ROLE)


def task(name: str) -> Task:
    return Task(task_id=name, specialist="Auditor", input_data={"instruction": f"Audit {name}.py line by line."})


def blocks(name: str, spec: SpecialistConfig = SPEC) -> list[str]:
    return prompt_blocks(spec, task(name), "Find the bugs.", {"repo": "payments"}, {})


def req_for(name: str, spec: SpecialistConfig = SPEC, **kw: Any) -> LeaseRequest:
    sig = signature(blocks(name, spec))
    return LeaseRequest(
        model="m", prefix=list(sig.chain), prefix_tokens=list(sig.tokens), prompt_tokens=sig.total, **kw
    )


# ---- signatures ---------------------------------------------------------------------------


def test_signature_counts_the_tokens_the_simulator_counts_and_chains_the_blocks() -> None:
    a, b = signature(blocks("a")), signature(blocks("b"))
    rendered = "\n".join(
        m["content"] for m in build_messages(SPEC, task("a"), "Find the bugs.", {"repo": "payments"}, {})
    )
    assert a.total == len(tokenize(rendered)) == a.tokens[-1]
    assert len(a.chain) == 3, "role, shared, task: the empty upstream block is skipped"
    assert a.chain[:2] == b.chain[:2] and a.chain[2] != b.chain[2]
    # chained: the same task block after another role prompt hashes differently
    other = signature(blocks("a", SpecialistConfig(name="Auditor", system_prompt="Someone else.")))
    assert other.chain[2] != a.chain[2]


def test_matched_tokens_is_the_shared_blocks_and_never_the_whole_prompt() -> None:
    a, b = signature(blocks("a")), signature(blocks("b"))
    assert matched_tokens(b.chain, b.tokens, a.chain) == b.tokens[1]
    assert matched_tokens(a.chain, a.tokens, a.chain) == a.total - 1, "the last prompt token is always evaluated"
    assert matched_tokens(a.chain, a.tokens, ()) == 0


# ---- the index mirrors the server's slot choice --------------------------------------------


def test_slot_index_takes_the_slot_the_server_takes() -> None:
    a, b, c = (signature(blocks(n)) for n in "abc")
    index, server = SlotIndex(2), SlotCaches()
    prompts = {n: tokenize("\n".join(x for x in blocks(n) if x)) for n in "abc"}
    # a then b run at once (two slots), both finish; c comes next: both sides pick a slot with the shared prefix.
    sa, _ = index.take("m", a.chain, a.tokens)
    sb, _ = index.take("m", b.chain, b.tokens)
    ta, tb = server.take(prompts["a"], 2, 0.0), server.take(prompts["b"], 2, 0.0)
    ta.slot.tokens, tb.slot.tokens = prompts["a"], prompts["b"]
    index.release(sa)
    index.release(sb)
    SlotCaches.release(ta.slot, 1.0)
    SlotCaches.release(tb.slot, 1.0)
    slot, cached = index.take("m", c.chain, c.tokens)
    tc = server.take(prompts["c"], 2, 2.0)
    assert slot == server.slots.index(tc.slot) == 0
    assert cached == c.tokens[1] <= tc.cached, "the index never promises more than the server reuses"


def test_slot_index_forgets_a_failed_request_and_an_evicted_model() -> None:
    a = signature(blocks("a"))
    index = SlotIndex(2)
    slot, _ = index.take("m", a.chain, a.tokens)
    index.release(slot, known=False)
    assert index.take("m", a.chain, a.tokens) == (0, 0)
    index.take("x", a.chain, a.tokens)  # slot 1, stays busy
    index.release(0)
    index.forget(["m"])
    assert index.models() == {"x"}
    assert [s.busy for s in index.slots] == [False, True], "forgetting keeps a busy slot busy"


# ---- cost: cached tokens, spill, residency -------------------------------------------------


def srv(name: str, slots: int = 2, **kw: Any) -> ServerLoad:
    kw.setdefault("effective_slots", slots)
    kw.setdefault("ewma_ttft", 0.05)
    kw.setdefault("ewma_token_seconds", 0.01)
    kw.setdefault("ewma_prefill_seconds", 0.005)
    return ServerLoad(name=name, slots=slots, **kw)


def warm(r: LeaseRequest, free_in: float | None = None) -> SlotState:
    return SlotState("m", tuple(r.prefix), tuple(r.prefix_tokens), free_in)


def test_the_cost_counts_only_the_uncached_prompt() -> None:
    r = req_for("b", expected_tokens=50)
    s = srv("s")
    cold = planned_seconds(s, r, [s])
    assert cold == pytest.approx(0.05 + 0.01 * 50 + 0.005 * r.prompt_tokens)
    assert planned_seconds(s, r, [s], cached=r.prefix_tokens[1]) == pytest.approx(cold - 0.005 * r.prefix_tokens[1])


def test_a_request_goes_where_its_prefix_is_and_a_cold_one_is_not_sent_there() -> None:
    earlier = req_for("a")
    loads = [srv("x"), srv("y")]
    caches = {"x": [SlotState(), SlotState()], "y": [warm(earlier), SlotState()]}
    assert plan_dispatch("peak_ewma", loads, [Queued(req_for("b", expected_tokens=50))], caches=caches) == {0: "y"}


def test_it_waits_briefly_for_its_warm_slot_rather_than_prefill_cold() -> None:
    # y's only slot holds the prefix and frees in 0.2 s; a cold prefill on idle x costs ~1.5 s more.
    loads = [srv("x", slots=1), srv("y", slots=1, in_flight=1)]
    caches = {"x": [SlotState()], "y": [warm(req_for("a"), free_in=0.2)]}
    assert plan_dispatch("peak_ewma", loads, [Queued(req_for("b", expected_tokens=50))], caches=caches) == {}


def test_a_hot_prefix_spills_to_a_cold_server_once_waiting_costs_more_than_a_cold_prefill() -> None:
    # Both of y's slots hold the prefix but stay busy for 5 s: a cold prefill on x (~1.6 s) finishes first.
    loads = [srv("x"), srv("y", in_flight=2)]
    hot = req_for("a")
    caches = {"x": [SlotState(), SlotState()], "y": [warm(hot, 5.0), warm(hot, 5.0)]}
    queue = [Queued(req_for(n, expected_tokens=50)) for n in "bcd"]
    decisions = plan_dispatch("peak_ewma", loads, queue, caches=caches)
    assert sorted(decisions.values()) == ["x", "x"], "two start cold on x; the third waits for a warm slot"


def test_a_second_copy_of_a_prefix_held_elsewhere_pays_its_prefill_twice() -> None:
    # y's only slot holds the prefix and frees in `busy` s; a cold prefill on idle x costs P ~ 1.5 s. Three more
    # requests (pinned to busy z) keep every slot's queue non-empty: a copy on x is then duplicate work the rest of
    # the queue loses, so it wins only when the wait exceeds two prefills, not one.
    def plan(busy: float) -> dict[int, Any]:
        loads = [srv("x", slots=1), srv("y", slots=1, in_flight=1), srv("z", slots=1, in_flight=1)]
        caches = {"x": [SlotState()], "y": [warm(req_for("a"), free_in=busy)], "z": [SlotState(free_in=9.0)]}
        backlog = [Queued(LeaseRequest(model="m", server="z", expected_tokens=10)) for _ in range(3)]
        return plan_dispatch("peak_ewma", loads, [Queued(req_for("b", expected_tokens=50)), *backlog], caches=caches)

    prefill = 0.005 * req_for("b").prefix_tokens[1]
    assert 1.2 * prefill < 2.0 < 1.8 * prefill
    assert plan(2.0) == {}, "waiting 2 s beats a second copy (~3 s counted)"
    assert plan(4.0) == {0: "x"}


def test_a_prefix_nobody_holds_pays_one_cold_prefill_only() -> None:
    # Busy 2 s with another prompt: the prefix is held nowhere, so a cold start on idle x costs ~1.5 s, not ~3 s.
    loads = [srv("x", slots=1), srv("y", slots=1, in_flight=1)]
    other = req_for("a", SpecialistConfig(name="Other", system_prompt="Someone else entirely."))
    caches = {"x": [SlotState()], "y": [warm(other, free_in=2.0)]}
    assert plan_dispatch("peak_ewma", loads, [Queued(req_for("b", expected_tokens=50))], caches=caches) == {0: "x"}


def test_an_unmeasured_servers_busy_slots_still_show_what_they_hold() -> None:
    # y is not measured yet (one probe at a time) but its two first requests run; the one holding the prefix ends in
    # 0.2 s. Waiting for it beats a cold prefill on x; hiding that slot (only one counted) would start cold on x.
    r = req_for("b", expected_tokens=50)
    other = req_for("a", SpecialistConfig(name="Other", system_prompt="Someone else entirely."))
    loads = [
        srv("x", slots=1),
        srv("y", in_flight=2, ewma_ttft=None, ewma_token_seconds=None, ewma_prefill_seconds=None),
    ]
    caches = {"x": [SlotState()], "y": [warm(other, free_in=3.0), warm(req_for("a"), free_in=0.2)]}
    assert plan_dispatch("peak_ewma", loads, [Queued(r)], caches=caches) == {}


def test_a_server_holding_another_model_is_used_only_when_the_backlog_outweighs_the_load() -> None:
    # "b" holds model n (one model at a time); "a" holds m and is busy for `busy` seconds.
    def plan(busy: float) -> dict[int, Any]:
        loads = [
            srv("a", slots=1, in_flight=1, models_loaded=["m"]),
            srv("b", slots=1, models_loaded=["n"], ewma_load_seconds=2.0),
        ]
        return plan_dispatch(
            "peak_ewma", loads, [Queued(LeaseRequest(model="m", expected_tokens=50))], running={"a": [busy]}
        )

    assert plan(1.0) == {}, "waiting 1 s for the loaded server beats a 2 s load"
    assert plan(4.0) == {0: "b"}


def test_after_a_switch_the_plan_charges_the_evicted_model_its_load_back() -> None:
    # One idle server holding n, two requests: m (long) then n. If m took the server, n would pay a load back:
    # the plan starts m there only if waiting elsewhere costs more than that.
    loads = [
        srv("b", slots=2, models_loaded=["n"], ewma_load_seconds=2.0),
        srv("a", slots=1, in_flight=1, models_loaded=["m"]),
    ]
    queue = [Queued(LeaseRequest(model="m", expected_tokens=300)), Queued(LeaseRequest(model="n", expected_tokens=50))]
    assert plan_dispatch("peak_ewma", loads, queue, running={"a": [1.0]}) == {1: "b"}


def test_an_unknown_load_time_costs_the_default_penalty() -> None:
    s = srv("s", models_loaded=["other"])
    r = LeaseRequest(model="m", expected_tokens=10)
    assert planned_seconds(s, r, [s]) == pytest.approx(0.05 + 0.1 + LOAD_PENALTY_SECONDS)


# ---- what the balancer learns -------------------------------------------------------------


def stats(slots: int = 2, **kw: Any) -> ServerStats:
    config = ServerConfig(name="s", url="http://127.0.0.1:1", slots=slots)
    out = ServerStats.new(config, RetryConfig())
    for name, value in kw.items():
        setattr(out, name, value)
    return out


def test_a_grant_takes_a_slot_and_a_second_task_finds_the_first_ones_prefix() -> None:
    s = stats()
    first = record_grant(s, 0.0, req_for("a"))
    record_outcome(s, LeaseOutcome(lease_id="1", outcome="ok", model="m"), False, 1.0, 5.0, first)
    second = record_grant(s, 1.0, req_for("b"))
    assert (first.cached, second.slot, second.cached) == (0, first.slot, req_for("b").prefix_tokens[1])


def test_prefill_rate_is_measured_in_teamorchs_tokens_from_the_uncached_fraction() -> None:
    s = stats()
    placed = Placement(slot=None, cached=0, prompt_tokens=400)
    # the server counted 600 of its tokens, 300 cached: half of teamorch's 400 were evaluated, in 1 s
    done = LeaseOutcome(
        lease_id="1", outcome="ok", model="m", tokens=10, eval_seconds=0.1, latency=1.3,
        prompt_tokens=600, cached_tokens=300, prompt_eval_seconds=1.0,
    )  # fmt: skip
    record_grant(s, 0.0)
    record_outcome(s, done, False, 1.0, 5.0, placed)
    assert s.ewma_prefill_seconds == pytest.approx(1.0 / 200)
    assert s.ewma_ttft == pytest.approx(1.3 - 0.1 - 1.0), "prefill is not also counted as fixed cost"
    # a nearly fully cached request is no prefill sample
    record_grant(s, 1.0)
    few = done.model_copy(update={"cached_tokens": 600 - MIN_PREFILL_SAMPLE // 2, "prompt_eval_seconds": 0.5})
    record_outcome(s, few, False, 2.0, 5.0, placed)
    assert s.ewma_prefill_seconds == pytest.approx(1.0 / 200)


def test_a_cold_grant_predicts_the_eviction_and_the_load_until_its_lease_returns() -> None:
    s = stats(models_loaded=["n"], ewma_load_seconds=2.0)
    other = record_grant(s, 0.0, LeaseRequest(model="n"))
    record_outcome(s, LeaseOutcome(lease_id="0", outcome="ok", model="n"), False, 0.5, 5.0, other)
    placed = record_grant(s, 1.0, req_for("a"), drain=0.5)
    assert placed.cold and s.models_loaded == ["m"] and s.prefix.models() == {"m"}
    row = to_load(s, now=2.0, waiting=0)
    assert (row.loading_model, row.load_remaining) == ("m", pytest.approx(1.5))
    # a probe during the load does not undo the prediction (the server may not list m yet)
    record_probe(s, ProbeResult(healthy=True, checked_at=0.0, models_loaded=["n"]))
    assert s.models_loaded == ["m"]
    done = LeaseOutcome(lease_id="1", outcome="ok", model="m", load_seconds=3.0)
    record_outcome(s, done, placed.cold, 4.0, 5.0, placed)
    assert (s.loading_model, s.ewma_load_seconds) == (None, pytest.approx(0.7 * 2.0 + 0.3 * 3.0))


def test_a_probe_learns_how_many_models_fit_and_drops_what_was_evicted() -> None:
    s = stats(models_loaded=["m"])
    record_grant(s, 0.0, req_for("a"))
    record_probe(s, ProbeResult(healthy=True, checked_at=0.0, models_loaded=["x", "m"]))
    assert (s.resident_limit, s.models_loaded) == (2, ["m", "x"]), "least recently used first"
    record_probe(s, ProbeResult(healthy=True, checked_at=1.0, models_loaded=["x"]))
    assert s.prefix.models() == set() and s.resident_limit == 2


# ---- which slot a grant lands on: the server's tie rule -------------------------------------

OTHER = SpecialistConfig(name="Other", system_prompt="Someone else entirely. " * 20)
THIRD = SpecialistConfig(name="Third", system_prompt="A third role altogether. " * 20)


def test_the_simulator_gives_a_cold_prompt_the_lowest_free_slot_as_ollama_does() -> None:
    # findLongestCacheSlot (runner/ollamarunner/cache.go): strictly longer prefix wins, so a tie keeps the first slot.
    caches = SlotCaches()
    first = caches.take(tokenize("a b c"), 2, 0.0)
    second = caches.take(tokenize("x y z"), 2, 0.0)
    SlotCaches.release(second.slot, 1.0)
    SlotCaches.release(first.slot, 2.0)  # slot 0 freed last: Ollama's default rule does not care (no LRU)
    assert caches.take(tokenize("p q r"), 2, 3.0).slot is caches.slots[0]


def test_a_grant_waits_when_a_slot_about_to_free_would_take_it_and_lose_a_needed_prefix() -> None:
    # x: slot 0 holds Auditor's prefix and ends in 10 ms (its release is a hop behind the server), slot 1 holds
    # Other's. A Third request planned on slot 1 would, once slot 0 has freed at the server, land on slot 0 (a tie
    # goes to the lowest slot) and overwrite the prefix the queued Auditor request needs.
    def plan(free_in: float, queued: bool = True) -> dict[int, Any]:
        loads = [srv("x", in_flight=1)]
        caches = {"x": [warm(req_for("a"), free_in=free_in), warm(req_for("a", OTHER))]}
        queue = [Queued(req_for("t", THIRD, expected_tokens=200))]
        queue += [Queued(req_for("b", expected_tokens=50))] if queued else []
        return plan_dispatch("peak_ewma", loads, queue, caches=caches)

    assert plan(0.01) == {}, "waits for the release due any moment"
    assert plan(2.0) == {0: "x"}, "slot 0 stays busy until it has landed"
    assert plan(0.01, queued=False) == {0: "x"}, "nothing queued needs slot 0's prefix: no reason to wait"


def test_warm_requests_are_planned_and_granted_before_cold_ones_on_a_servers_free_slots() -> None:
    # Both of x's slots are free: slot 0 holds Auditor's prefix, slot 1 Other's (no Other request is queued). The
    # Third request is the longest (planned first by size); granted first, it would take slot 0 (a tie goes to the
    # lowest slot) and the Auditor request slot 1: two cold prefills. Warm first: one.
    loads = [srv("x")]
    caches = {"x": [warm(req_for("a")), warm(req_for("a", OTHER))]}
    queue = [Queued(req_for("t", THIRD, expected_tokens=200)), Queued(req_for("b", expected_tokens=50))]
    decisions = plan_dispatch("peak_ewma", loads, queue, caches=caches)
    assert decisions == {1: "x", 0: "x"} and list(decisions) == [1, 0]
    index = SlotIndex(2)
    index.slots[0].model, index.slots[0].chain = "m", tuple(req_for("a").prefix)
    index.slots[1].model, index.slots[1].chain = "m", tuple(req_for("a", OTHER).prefix)
    assert [index.take("m", queue[i].req.prefix, queue[i].req.prefix_tokens)[0] for i in decisions] == [0, 1]


def test_a_freed_slot_serves_the_last_request_of_its_group_before_switching() -> None:
    # x's only slot just freed holding Other's prefix, and one Other request is left; y (holding Auditor's) is busy
    # for 5 s. By size the Auditor request is planned first and would take x cold, leaving Other's last request to
    # pay its prefill again later. The group's last requests are served on its slot first.
    loads = [srv("x", slots=1), srv("y", slots=1, in_flight=1)]
    caches = {"x": [warm(req_for("a", OTHER))], "y": [warm(req_for("a"), free_in=5.0)]}
    queue = [Queued(req_for("b", expected_tokens=200)), Queued(req_for("c", OTHER, expected_tokens=50))]
    assert plan_dispatch("peak_ewma", loads, queue, caches=caches) == {1: "x"}
    planner = Planner("peak_ewma")
    for key, queued in enumerate(queue):
        planner.add(key, queued.req, 0.0)
    assert planner.plan(loads, 0.0, caches=caches) == {1: "x"}


def test_near_the_end_a_copy_on_a_slot_that_would_idle_costs_only_its_delay() -> None:
    # Three slots, one other request left (pinned to busy z): some slot idles whatever this request does, so a cold
    # copy of the prefix on idle x costs the queue nothing; only when each finishes counts. x finishes a prefill P
    # after now, the warm slot on y frees after 1.2 P: x. (Charging a third of a prefill for the copy sent it to y.)
    prefill = 0.005 * req_for("b").prefix_tokens[1]
    loads = [srv("x", slots=1), srv("y", slots=1, in_flight=1), srv("z", slots=1, in_flight=1)]
    caches = {"x": [SlotState()], "y": [warm(req_for("a"), free_in=1.2 * prefill)], "z": [SlotState(free_in=9.0)]}
    queue = [Queued(req_for("b", expected_tokens=50)), Queued(LeaseRequest(model="m", server="z", expected_tokens=10))]
    assert plan_dispatch("peak_ewma", loads, queue, caches=caches) == {0: "x"}
