"""Priority classes (`teamorch.policies.priority`): interactive before batch at the balancer, with aging. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from teamorch import cli
from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import Planner, Queued, plan_dispatch
from teamorch.policies.priority import TOP_RANK, Aging, rank


def _loads(free: int = 1, busy: int = 0) -> list[ServerLoad]:
    """One measured server with `free` + `busy` slots, `busy` of them in flight."""
    slots = free + busy
    return [
        ServerLoad(
            name="x",
            slots=slots,
            effective_slots=slots,
            in_flight=busy,
            models_present=["m"],
            models_loaded=["m"],
            ewma_token_seconds=0.01,
            ewma_ttft=0.05,
        )
    ]


def _req(cls: str, tokens: int = 100) -> LeaseRequest:
    return LeaseRequest(model="m", expected_tokens=tokens, priority_class=cls)  # type: ignore[arg-type]


def test_interactive_ranks_above_batch() -> None:
    assert rank("interactive") == TOP_RANK > rank("batch")


def test_aging_promotes_the_oldest_batch_request_once_the_class_waited_long_enough() -> None:
    aging = Aging(10.0)
    aging.add(2, 5.0)
    aging.add(1, 3.0)
    assert aging.due(12.9) is None  # the oldest has waited 9.9 s
    assert aging.due(13.0) == 1
    assert aging.due(100.0) is None  # one promotion pending at a time
    aging.remove(1, 3.0)  # the promoted one is granted ...
    aging.served(101.0)  # ... at 101: the clock restarts there
    assert aging.due(110.0) is None
    assert aging.due(111.0) == 2


def test_aging_clock_runs_from_the_last_batch_grant() -> None:
    aging = Aging(10.0)
    aging.add(1, 0.0)
    aging.served(8.0)  # another batch request got a slot at 8: the class is not starving
    assert aging.due(17.0) is None
    assert aging.due(18.0) == 1


def test_aging_forgets_cancelled_requests() -> None:
    aging = Aging(1.0)
    aging.add(1, 0.0)
    aging.remove(1, 0.0)
    aging.remove(1, 0.0)  # twice is harmless
    assert aging.due(100.0) is None


@pytest.mark.parametrize("policy", ["peak_ewma", "least_loaded", "round_robin"])
def test_plan_dispatch_gives_the_free_slot_to_the_interactive_request(policy: str) -> None:
    # The batch request came first and is longer (peak_ewma serves long jobs first): the class still decides.
    queue = [Queued(_req("batch", 900), waited=5.0), Queued(_req("interactive", 10))]
    decisions = plan_dispatch(policy, _loads(), queue, counter=iter(range(10)))
    assert decisions == {1: "x"}


def test_an_explicit_rank_overrides_the_class() -> None:
    queue = [Queued(_req("batch"), rank=TOP_RANK), Queued(_req("interactive"))]
    assert plan_dispatch("least_loaded", _loads(), queue) == {0: "x"}


@pytest.mark.parametrize("policy", ["peak_ewma", "least_loaded"])
def test_planner_serves_interactive_first_then_promotes_a_starving_batch_request(policy: str) -> None:
    planner = Planner(policy, aging=10.0)
    for key in range(3):
        planner.add(key, _req("batch"), float(key))  # a batch run, queued at 0, 1, 2
    planner.add(3, _req("interactive"), 4.0)
    assert planner.plan(_loads(), 5.0) == {3: "x"}
    planner.remove(3, granted=5.0)
    planner.add(4, _req("interactive"), 6.0)
    assert planner.plan(_loads(), 9.0) == {4: "x"}  # batch has waited 9 s: not yet
    planner.remove(4, granted=9.0)
    planner.add(5, _req("interactive"), 9.5)
    # At 10 the oldest batch request (queued at 0, nothing of its class granted since) is promoted: it arrived
    # before the interactive request 5, so it goes first; the rest of the batch run still waits behind 5.
    assert planner.plan(_loads(), 10.0) == {0: "x"}
    planner.remove(0, granted=10.0)
    assert planner.plan(_loads(), 10.5) == {5: "x"}
    assert [k for k, _ in planner.queue(10.5)] == [5, 1, 2]


def test_planner_queue_orders_by_class_then_priority_then_arrival() -> None:
    planner = Planner("least_loaded")
    planner.add(0, _req("batch").model_copy(update={"priority": 5}), 0.0)
    planner.add(1, _req("interactive"), 0.0)
    planner.add(2, _req("interactive").model_copy(update={"priority": 2}), 0.0)
    keyed = planner.queue(1.0)
    assert [k for k, _ in keyed] == [2, 1, 0]
    assert [q.rank for _, q in keyed] == [TOP_RANK, TOP_RANK, rank("batch")]


def test_priority_class_in_a_plan_file_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.yaml"
    team = {
        "servers": [{"name": "a", "url": "http://127.0.0.1:9"}],
        "default_model": "m",
        "specialists": [{"name": "A"}],
    }
    body = {"problem": "p", "tasks": [{"task_id": "t", "specialist": "A"}], "team": team}
    plan.write_text(yaml.safe_dump({**body, "priority_class": "batch"}))
    assert cli.main(["validate", str(plan)]) == 0
    plan.write_text(yaml.safe_dump({**body, "priority_class": "urgent"}))
    assert cli.main(["validate", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "priority_class" in err and "urgent" in err and str(plan) in err


def test_run_takes_a_priority_class_flag() -> None:
    args = cli.build_parser().parse_args(["run", "plan.yaml", "--priority-class", "batch"])
    assert args.priority_class == "batch"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "plan.yaml", "--priority-class", "urgent"])
