"""Following a run as it happens: `Coordinator.events(run_id, since)`, `TeamOrchestrator.stream`, `follow_run`.

Real Ray actors and simulator servers on loopback. The events are the run's
journal (in memory here), so a client polling with the last seq it saw gets
every event once, in order, and so does a second client that did not start it.
"""

from __future__ import annotations

import itertools
import threading
import time

import ray

from teamorch import api
from teamorch.api import TeamOrchestrator, follow_run
from teamorch.journal import (
    AttemptFailed,
    JournalEvent,
    PlanResolved,
    RunFinished,
    RunStarted,
    TaskFinished,
    TaskQueued,
    TaskStarted,
    TokensGenerated,
)
from teamorch.messages import OrchestrationPlan
from teamorch.policies.progress import REPORT_EVERY
from tests.helpers import sim_team


def chain_and_fan() -> OrchestrationPlan:
    return OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [
                {"task_id": "a", "specialist": "Analyst"},
                {"task_id": "b", "specialist": "Analyst"},
                {"task_id": "c", "specialist": "Analyst", "depends_on": ["a", "b"]},
            ],
        }
    )


def test_events_arrive_in_order_without_gaps_for_every_client(sims, ray_cluster) -> None:
    broken = sims(name="broken", error_rate=1.0)
    good = sims(name="good", slots=2, tokens_per_second=40)
    team = sim_team(
        [(broken, 1), (good, 2)],
        [{"name": "Analyst", "options": {"num_predict": 20}}],
        balancer={"policy": "round_robin"},
    )
    with TeamOrchestrator(team, name="events-test") as orch:
        other = api.get_coordinator("events-test")  # a second client's own handle (named teams live in `teamorch`)
        watched: list[JournalEvent] = []
        run_ids: list[str] = []

        def watch() -> None:
            while not run_ids:
                time.sleep(0.01)
            watched.extend(follow_run(other, run_ids[0], poll=0.05))

        watcher = threading.Thread(target=watch)
        watcher.start()
        seen: list[JournalEvent] = []
        stream = orch.stream(chain_and_fan())
        for event in stream:
            if isinstance(event, RunStarted):
                run_ids.append(event.run_id)
            seen.append(event)
        watcher.join(timeout=30)

    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))  # in order, no gap, none twice
    assert watched == seen  # the run as a client that did not start it saw it
    assert isinstance(seen[0], RunStarted) and isinstance(seen[1], PlanResolved)
    assert isinstance(seen[-1], RunFinished) and seen[-1].success
    finished = {e.result.task_id: e for e in seen if isinstance(e, TaskFinished)}
    assert set(finished) == {"a", "b", "c"}
    for task_id, done in finished.items():
        queued = [e.seq for e in seen if isinstance(e, TaskQueued) and e.task_id == task_id]
        started = [e for e in seen if isinstance(e, TaskStarted) and e.task_id == task_id]
        assert len(queued) == 1 and queued[0] < done.seq
        assert [(e.attempt, e.server) for e in started] == [
            (n, a.server) for n, a in enumerate(done.result.attempts, 1)
        ]
    failed = [e for e in seen if isinstance(e, AttemptFailed)]
    assert failed and all(e.server == "broken" and e.error_class == "error" for e in failed)
    assert len(failed) == sum(a.outcome != "ok" for e in finished.values() for a in e.result.attempts)
    # c ran on its dependencies' outputs: it was queued only after both had finished.
    (c_queued,) = [e.seq for e in seen if isinstance(e, TaskQueued) and e.task_id == "c"]
    assert c_queued > max(finished["a"].seq, finished["b"].seq)


def test_events_answer_while_a_run_is_busy_and_live_reports_are_written_once(sims, coordinator) -> None:
    slow = sims(name="slow", tokens_per_second=10)
    handle = coordinator(sim_team([(slow, 1)], [{"name": "Analyst", "options": {"num_predict": 20}}]))
    plan = OrchestrationPlan.model_validate({"problem": "p", "tasks": [{"task_id": "only", "specialist": "Analyst"}]})
    ref = handle.run_plan.remote(plan, "busy-run")
    deadline = time.monotonic() + 20
    while not any(isinstance(e, TaskQueued) for e in ray.get(handle.events.remote("busy-run"))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # `teamorch status` lists the run while it is in progress.
    (listed,) = [r for r in ray.get(handle.runs.remote()) if r.run_id == "busy-run"]
    assert (listed.status, listed.done, listed.total) == ("running", 0, 1)
    # The task takes ~2 s on the server; the events call does not wait behind it.
    asked = time.monotonic()
    events = ray.get(handle.events.remote("busy-run", 1))
    assert time.monotonic() - asked < 1.0
    assert [e.seq for e in events] == list(range(2, 2 + len(events)))
    # A specialist's live report of the attempt, then the same fact derived from the result: written once.
    ray.get(handle.task_event.remote("busy-run", TaskStarted(task_id="only", server="slow", attempt=1)))
    report = ray.get(ref)
    assert report.success
    (listed,) = [r for r in ray.get(handle.runs.remote()) if r.run_id == "busy-run"]
    assert (listed.status, listed.done, listed.success) == ("finished", 1, True)
    every = ray.get(handle.events.remote("busy-run"))
    assert [(e.task_id, e.attempt) for e in every if isinstance(e, TaskStarted)] == [("only", 1)]
    assert ray.get(handle.events.remote("busy-run", every[-1].seq)) == []
    assert ray.get(handle.events.remote("no-such-run")) == []


def test_tokens_generated_arrive_while_a_task_streams_throttled_and_in_seq(sims, coordinator) -> None:
    # The simulator (a real HTTP server on loopback) streams 30 tokens at 20 tokens/s: about 1.5 s of generation.
    slow = sims(name="slow", tokens_per_second=20)
    handle = coordinator(sim_team([(slow, 1)], [{"name": "Analyst", "options": {"num_predict": 30}}]))
    plan = OrchestrationPlan.model_validate({"problem": "p", "tasks": [{"task_id": "only", "specialist": "Analyst"}]})
    seen = list(api.stream(handle, plan, poll=0.05))

    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    (started,) = [e.seq for e in seen if isinstance(e, TaskStarted)]
    (finished,) = [e for e in seen if isinstance(e, TaskFinished)]
    progress = [e for e in seen if isinstance(e, TokensGenerated)]
    assert len(progress) >= 2, seen  # ~1.5 s of streaming, reported every 0.5 s after the first 0.5 s
    assert all(started < e.seq < finished.seq for e in progress)
    assert all((e.task_id, e.attempt, e.server) == ("only", 1, "slow") for e in progress)
    counts = [e.tokens for e in progress]
    assert counts == sorted(set(counts)) and counts[-1] <= finished.result.tokens == 30
    assert all(b.at - a.at >= REPORT_EVERY - 0.05 for a, b in itertools.pairwise(progress))
    assert all(e.tokens_per_second > 0 and e.ttft is not None for e in progress)
    assert slow.stats()["completed"] == 1  # one generation on the server, whatever was reported about it


def test_messages_of_one_loop_turn_go_in_one_batch_in_order() -> None:
    """`TurnBatch` (live events, lease releases): one send per turn with everything added in it, none lost."""
    import asyncio

    from teamorch.actors import TurnBatch

    async def run() -> list[list[int]]:
        sent: list[list[int]] = []
        batch: TurnBatch[int] = TurnBatch(sent.append)
        for i in range(3):
            batch.add(i)
        assert sent == []  # nothing leaves before the turn ends
        await asyncio.sleep(0)
        batch.add(3)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return sent

    assert asyncio.run(run()) == [[0, 1, 2], [3]]
