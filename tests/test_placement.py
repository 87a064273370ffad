"""Whole-queue placement of prefix groups and models onto slots (`teamorch.policies.placement`), no Ray.

The pure plan (`place`, `Assignment`) on hand-built hosts, then the scheduler that follows it
(`plan_dispatch`, `Planner`) on hand-built load snapshots: each group kept on as few slots as its work needs,
no slot switched to another prefix while its own still has queued work, no one-model server evicting the
only copy of a model that still has queued work.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import Planner, Queued, _group, plan_dispatch
from teamorch.policies.placement import Assignment, GroupWork, Host, Rate, place
from teamorch.policies.prefix import SlotState, signature

ROLE_WORDS = 500  # a long role prompt: its cold prefill costs several answers, as in benchmarks/prefix.py


def role(name: str) -> Any:
    return signature([f"{name} " * ROLE_WORDS])


def request(name: str, k: int, model: str = "m", tokens: int = 40) -> LeaseRequest:
    sig = signature([f"{name} " * ROLE_WORDS, f"item {k} of {name}"])
    return LeaseRequest(
        model=model,
        expected_tokens=tokens,
        prefix=list(sig.chain),
        prefix_tokens=list(sig.tokens),
        prompt_tokens=sig.total,
    )


def work(counts: dict[str, int]) -> dict[str, GroupWork]:
    """The groups of a queue of `counts[name]` requests per role, keyed as the balancer keys them."""
    groups: dict[str, GroupWork] = {}
    for name, n in counts.items():
        for k in range(n):
            r = request(name, k)
            groups.setdefault(_group(r), GroupWork(r.model)).add(40, r.prompt_tokens, r.prefix, r.prefix_tokens)
    for g in groups.values():
        g.share(lambda h, g=g: g.count if h in g.chain[:1] else 0)
    return groups


def key(name: str) -> str:
    return _group(request(name, 0))


# A reference slot: 150 output tokens/s, 400 prompt tokens/s (the prefix benchmark's), 20 ms fixed.
def rate(factor: float) -> Rate:
    return Rate(0.02 / factor, 1 / (150 * factor), 1 / (400 * factor), 2.0)


def host(name: str, factor: float, slots: int = 2) -> Host:
    return Host(name, rate(factor), tuple((0.0, None) for _ in range(slots)))


def lanes_of(plan: Assignment, group: str) -> set[tuple[str, int]]:
    return {at for at, lane in plan.lanes.items() if group in lane}


# ---- the plan -----------------------------------------------------------------------------


def test_a_skewed_queue_keeps_each_group_on_as_few_slots_as_its_work_needs() -> None:
    hosts = [host("fast1", 2.0), host("fast2", 2.0), host("slow1", 0.5), host("slow2", 0.5)]
    counts = {"hot": 40, "warm": 8, "small": 4, "tiny": 3}
    plan = place(work(counts), hosts)
    assert plan.placed == {key(n) for n in counts}
    per_group = {n: lanes_of(plan, key(n)) for n in counts}
    # The hot group's work needs more than one fast slot; each small one fits on one slot.
    assert len(per_group["hot"]) >= 2
    assert all(len(per_group[n]) == 1 for n in ("warm", "small", "tiny"))
    # Within 10% of the four fast slots doing all the work with one cold prefill per group (a slow slot's cold
    # prefill alone takes 2.5 s, nearly the whole plan: using it hardly helps).
    total = sum(rate(1.0).work(g) + ROLE_WORDS / 400 for g in work(counts).values())
    assert plan.horizon <= 1.1 * total / (2 * 2 * 2.0)


def test_a_group_stays_on_the_slots_that_hold_it() -> None:
    hosts = [
        Host("a", rate(1.0), ((0.0, key("x")), (0.5, key("y")))),
        Host("b", rate(1.0), ((0.3, key("y")), (0.0, key("x")))),
    ]
    plan = place(work({"x": 6, "y": 6}), hosts)
    assert lanes_of(plan, key("x")) == {("a", 0), ("b", 1)}
    assert lanes_of(plan, key("y")) == {("a", 1), ("b", 0)}


def test_cheap_prefixes_and_lone_requests_are_not_placed() -> None:
    short = {"x": 5}
    groups = work(short)
    for g in groups.values():
        g.shared, g.prompt = 5, 5 * g.count  # a five-word role prompt: a cold prefill costs a fraction of an answer
    assert not place(groups, [host("a", 1.0), host("b", 1.0)]).placed
    assert not place(work({"x": 1}), [host("a", 1.0), host("b", 1.0)]).placed


def test_a_lone_request_whose_prefix_two_slots_hold_takes_the_one_a_cold_group_does_not_need() -> None:
    # The end of prefix fleet B: "sec" has one request left and two warm slots, the free 2x one and a 0.5x one
    # busy for 0.2 s; "wri" has two left and one warm slot, a 0.5x one (a request there takes 0.6 s). Split over
    # both warm slots on paper, sec's last request took the 2x slot and wri's last then paid its cold prefill there
    # after it, ending the run. Placed, sec waits for its 0.5x slot and wri takes the 2x one cold at once.
    hosts = [
        Host("fast", rate(2.0), ((0.0, key("sec")), (0.1, key("aud")))),
        Host("slow", rate(0.5), ((0.2, key("sec")), (0.2, key("wri")))),
    ]
    plan = place(work({"sec": 1, "wri": 2, "aud": 3}), hosts)
    assert key("sec") in plan.placed
    assert lanes_of(plan, key("sec")) == {("slow", 0)}
    assert ("fast", 0) in lanes_of(plan, key("wri"))


def test_a_one_model_server_is_one_bin_and_keeps_its_resident_model() -> None:
    groups: dict[str, GroupWork] = {}
    for model, n in (("a", 6), ("b", 6)):
        for k in range(n):
            r = request(model, k, model=model, tokens=100)
            groups.setdefault(_group(r), GroupWork(model)).add(100, r.prompt_tokens, r.prefix, r.prefix_tokens)
    hosts = [
        Host("s1", rate(1.0), ((0.0, None), (0.0, None)), models=("a",), bound=True),
        Host("s2", rate(1.0), ((0.0, None), (0.0, None)), models=("b",), bound=True),
    ]
    plan = place(groups, hosts)
    ka, kb = (next(k for k, g in groups.items() if g.model == m) for m in "ab")
    assert plan.lanes[("s1", 0)] == plan.lanes[("s1", 1)] == (ka,)  # both slots of a server share one lane
    assert plan.lanes[("s2", 0)] == (kb,)


def test_a_slot_serves_its_lane_in_order_and_spare_slots_are_open_to_all() -> None:
    plan = Assignment({("s", 0): ("x", "y"), ("s", 1): ("z",)}, frozenset({"x", "y", "z"}))
    left = {"x": 2, "y": 3, "z": 1}
    full = [False, False, False]  # s has a third slot the plan gave no lane: spare
    assert plan.slots("x", "s", full, left.__getitem__) == {0, 2}
    assert plan.slots("y", "s", full, left.__getitem__) == {2}  # slot 0 serves x first
    left["z"] = 0
    assert plan.slots("y", "s", full, left.__getitem__) == {1, 2}  # slot 1's lane is done: spare too
    left["x"] = 0
    assert plan.slots("y", "s", full, left.__getitem__) == {0, 1, 2}
    assert plan.slots("other", "s", full, left.__getitem__) is None  # not placed: anywhere


def test_a_request_the_server_gives_another_empty_slot_takes_that_slots_lane() -> None:
    plan = Assignment({("s", 0): ("x",), ("s", 1): ("y",)}, frozenset({"x", "y"}))
    empty = [True, True]
    assert plan.slots("y", "s", empty, lambda g: 1) == {0, 1}  # empty slots are alike: the server picks slot 0
    plan.took("y", "s", 0, empty, lambda g: 1)
    assert plan.lanes == {("s", 0): ("y",), ("s", 1): ("x",)}


def test_group_work_sums_the_same_in_any_order_and_shares_only_what_all_hold() -> None:
    reqs = [request("x", k) for k in range(5)]
    one, other = GroupWork("m"), GroupWork("m")
    for r in reqs:
        one.add(40, r.prompt_tokens, r.prefix, r.prefix_tokens)
    for r in reversed([*reqs, request("x", 9)]):
        other.add(40, r.prompt_tokens, r.prefix, r.prefix_tokens)
    last = request("x", 9)
    other.add(40, last.prompt_tokens, last.prefix, last.prefix_tokens, sign=-1)
    holding = {reqs[0].prefix[0]: 5}
    for g in (one, other):
        g.share(lambda h: holding.get(h, 1))
    assert (one.count, one.tokens, one.prompt, one.shared) == (other.count, other.tokens, other.prompt, other.shared)
    assert one.shared == ROLE_WORDS  # the role block; each item block is held by one request only


# ---- the scheduler following it -------------------------------------------------------------


def measured(name: str, factor: float, slots: int = 1, **kw: Any) -> ServerLoad:
    return ServerLoad(
        name=name,
        slots=slots,
        effective_slots=slots,
        ewma_token_seconds=1 / (150 * factor),
        ewma_ttft=0.02 / factor,
        ewma_prefill_seconds=1 / (400 * factor),
        **kw,
    )


def held(name: str, free_in: float | None, model: str = "m") -> SlotState:
    sig = role(name)
    return SlotState(model, sig.chain, sig.tokens, free_in)


def test_a_free_fast_slot_keeps_its_prefix_while_its_group_has_queued_work() -> None:
    # fast holds the hot group's prompt and just freed; the small group's only warm slot (on slow) is busy for 2 s.
    # One at a time, the small group's longer request finishes soonest on fast, cold (1.4 s): it would evict the
    # hot prompt its 20 queued requests need. The plan keeps fast on the hot group; the small one waits for slow.
    loads = [measured("fast", 2.0), measured("fast2", 2.0), measured("slow", 0.5)]
    caches = {"fast": [held("hot", None)], "fast2": [held("hot", 1.0)], "slow": [held("small", 2.0)]}
    queue = [Queued(request("small", k, tokens=120)) for k in range(3)]
    queue += [Queued(request("hot", k, tokens=40)) for k in range(20)]
    decisions = plan_dispatch("peak_ewma", loads, queue, caches=caches)
    assert decisions, "the free slot is used"
    assert {queue[i].req.prefix[0] for i in decisions} == {role("hot").chain[0]}
    planner = Planner("peak_ewma")
    for k, q in enumerate(queue):
        planner.add(k, q.req, 0.0)
    assert planner.plan(loads, 0.0, caches=caches) == decisions


def test_no_server_evicts_the_only_copy_of_a_model_that_still_has_queued_work() -> None:
    # s1 (fast, one model at a time) holds model a and is free; b's only server is busy for 3 s. b's requests are
    # longer, so one at a time s1 would switch to b (a 2 s load) and a's queued requests would pay a load back.
    loads = [
        measured("s1", 2.0, slots=2, models_loaded=["a"], ewma_load_seconds=2.0),
        measured("s2", 1.0, slots=2, in_flight=2, models_loaded=["b"], ewma_load_seconds=2.0),
    ]
    caches = {"s1": [SlotState(), SlotState()], "s2": [SlotState("b", free_in=3.0), SlotState("b", free_in=3.0)]}
    queue = [Queued(request("b", k, model="b", tokens=300)) for k in range(6)]
    queue += [Queued(request("a", k, model="a", tokens=100)) for k in range(4)]
    decisions = plan_dispatch("peak_ewma", loads, queue, caches=caches)
    assert decisions and {queue[i].req.model for i in decisions} == {"a"}


@pytest.mark.parametrize("fleet", ["A", "B"])
def test_the_multi_model_replay_pays_few_loads(fleet: str) -> None:
    # The benchmark's one-model servers (benchmarks/prefix.py) on the replay's virtual clock: one load per server
    # used, plus one per model beyond the servers (fleet B: 3 servers, 4 models), and no load back.
    from benchmarks.replay import cases, replay

    case = next(c for c in cases() if c.workload.startswith("multi") and c.label == fleet)
    assert replay(case, planner=True).loads <= len(case.shapes) + max(0, len(case.work.specialists) - len(case.shapes))


def test_an_early_grant_only_where_the_slot_that_frees_first_holds_the_same_prefix() -> None:
    from teamorch.policies.balancing import early_lands
    from teamorch.policies.prefix import CachedSlot

    def slot(name: str, busy: bool = True, words: int = ROLE_WORDS) -> CachedSlot:
        sig = signature([f"{name} " * words])
        return CachedSlot("m", sig.chain, sig.tokens, busy)

    prefill = 1 / 400  # a 500-word role prompt: 1.25 s of prefill, far more than the hops an early grant hides
    assert early_lands([slot("x"), slot("x")], 0, prefill)
    assert not early_lands([slot("x"), slot("y")], 0, prefill)  # y's stream may end first: x would land there
    assert not early_lands([slot("x"), slot("y", busy=False)], 0, prefill)  # a free slot: x would go out at once
    assert not early_lands([slot("x"), CachedSlot()], 0, prefill)
    assert early_lands([slot("x", words=3), slot("y", words=3)], 0, prefill)  # short prompts: nothing at stake


@pytest.mark.parametrize("seed", range(20))
def test_a_request_waiting_for_its_groups_slot_is_granted_when_the_slot_opens(seed: int) -> None:
    # The Planner continues its last plan between events. A request whose group's slots were still another group's
    # was passed over by that plan; once that queue empties, the plan must be made again, or the request waits
    # until the kept plan expires (hundreds of events; in this event loop, forever).
    from benchmarks.scale import MODEL, EventLoop, incremental, make_fleet

    rng = random.Random(seed)
    roles = 2 + seed % 4
    queue = []
    for i in range(10 + seed):
        sig = signature([f"role{rng.randrange(roles)} " * ROLE_WORDS, f"task {i}"])
        queue.append(
            LeaseRequest(
                model=MODEL,
                expected_tokens=rng.randint(8, 32),
                prefix=list(sig.chain),
                prefix_tokens=list(sig.tokens),
                prompt_tokens=sig.total,
            )
        )
    loop = EventLoop(make_fleet([0.002 * (1 + k) for k in range(2 + seed % 3)], 1 + seed % 2), queue, incremental)
    loop.run()
    assert len(loop.planner) == 0
