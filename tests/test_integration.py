"""A plan through real Ray actors against simulator servers over real loopback HTTP.

The simulator (teamorch.sim) is a real HTTP server speaking the Ollama API; its
own counters (`/sim/stats`) are the ground truth these tests read.
"""

from __future__ import annotations

import ray

from teamorch import api
from teamorch.messages import OrchestrationPlan
from tests.helpers import NO_PROBES, sim_team


def fan_plan(n: int, specialist: str = "Analyst", **extra) -> OrchestrationPlan:
    return OrchestrationPlan.model_validate(
        {"problem": "p", "tasks": [{"task_id": f"t{i}", "specialist": specialist} for i in range(n)], **extra}
    )


def test_work_split_across_servers_never_over_slots(sims, coordinator) -> None:
    # max_queue=0: any request beyond the simulator's slots is refused with 503 and counted.
    a = sims(name="a", slots=1, max_queue=0, tokens_per_second=200)
    b = sims(name="b", slots=2, max_queue=0, tokens_per_second=200)
    team = sim_team([(a, 1), (b, 2)], [{"name": "Analyst", "options": {"num_predict": 40}}], balancer=NO_PROBES)
    report = api.execute(coordinator(team), fan_plan(9))
    assert report.success, report
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a["rejected_503"] == 0 and stats_b["rejected_503"] == 0
    assert stats_a["max_in_flight"] == 1
    assert stats_b["max_in_flight"] == 2
    assert stats_a["completed"] >= 1 and stats_b["completed"] >= 1
    assert stats_a["completed"] + stats_b["completed"] == 9
    assert {r.server for r in report.tasks} == {"a", "b"}
    assert report.statistics.successful_tasks == 9
    assert report.statistics.parallel_efficiency > 1.0


def test_upstream_outputs_reach_dependents(sims, coordinator) -> None:
    echo = sims(name="echo", echo=True)
    team = sim_team(
        [(echo, 1)],
        [{"name": "Finder", "system_prompt": "find"}, {"name": "Architect", "system_prompt": "merge"}],
    )
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "the bug",
            "waves": [
                {
                    "wave_number": 1,
                    "tasks": [{"task_id": "f1", "specialist": "Finder", "input_data": {"instruction": "MARK-ONE"}}],
                },
                {"wave_number": 2, "tasks": [{"task_id": "merge", "specialist": "Architect"}]},
            ],
        }
    )
    report = api.execute(coordinator(team), plan)
    assert report.success
    f1, merge = report.tasks
    # The echo simulator answers with the full prompt it received: the architect's prompt held f1's output.
    assert "MARK-ONE" in f1.output
    assert "Findings from other specialists" in merge.output
    assert "### Finder (f1)" in merge.output
    assert f1.output.strip()[:40] in merge.output


def test_error_line_in_stream_fails_over_to_other_server(sims, coordinator) -> None:
    bad = sims(name="bad", error_line_rate=1.0)
    good = sims(name="good")
    team = sim_team([(bad, 1), (good, 1)], [{"name": "Analyst"}], balancer={"policy": "round_robin"})
    report = api.execute(coordinator(team), fan_plan(4))
    assert report.success
    assert all(r.server == "good" for r in report.tasks)
    failed_attempts = [a for r in report.tasks for a in r.attempts if a.outcome != "ok"]
    assert failed_attempts, "the bad server must have been tried and its error recorded"
    assert all(a.server == "bad" and "error in stream" in (a.error or "") for a in failed_attempts)
    assert bad.stats()["failed"] == len(failed_attempts)


def test_model_not_found_routes_to_server_that_has_it(sims, coordinator) -> None:
    other = sims(name="other", models=["llama3:8b"])
    right = sims(name="right", models=["gemma3:270m"])
    team = sim_team([(other, 4), (right, 1)], [{"name": "Analyst"}])
    report = api.execute(coordinator(team), fan_plan(3))
    assert report.success
    assert {r.server for r in report.tasks} == {"right"}
    assert other.stats()["requests"] == 0  # known from /api/tags: never even asked


def test_unreachable_server_gives_clear_failure_and_keeps_results(sims, coordinator) -> None:
    good = sims(name="good")
    team = sim_team([(good, 1)], [{"name": "Analyst"}, {"name": "Remote", "model": "big"}])
    team.servers.append(
        team.servers[0].model_copy(update={"name": "gone", "url": "http://127.0.0.1:9", "models": ["big"]})
    )
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [
                {"task_id": "local", "specialist": "Analyst"},
                {"task_id": "remote", "specialist": "Remote", "timeout": 20},
                {"task_id": "after", "specialist": "Analyst", "depends_on": ["remote"]},
            ],
        }
    )
    report = api.execute(coordinator(team), plan)
    assert not report.success
    by_id = {r.task_id: r for r in report.tasks}
    assert by_id["local"].status == "succeeded" and by_id["local"].output
    assert by_id["remote"].status == "failed"
    assert "gone" in by_id["remote"].error and "127.0.0.1:9" in by_id["remote"].error
    assert by_id["after"].status == "skipped" and "remote" in by_id["after"].error


def test_server_dying_mid_run_fails_over(sims, coordinator) -> None:
    mortal = sims(name="mortal", die_after=2, tokens_per_second=100)
    steady = sims(name="steady", tokens_per_second=100)
    team = sim_team([(mortal, 1), (steady, 1)], [{"name": "Analyst", "options": {"num_predict": 30}}])
    report = api.execute(coordinator(team), fan_plan(8))
    assert report.success, [r.error for r in report.tasks]
    assert sum(1 for r in report.tasks if r.server == "mortal") <= 2
    assert steady.stats()["completed"] >= 6


def test_named_coordinator_reachable_from_anywhere(sims, ray_cluster) -> None:
    s = sims(name="s")
    team = sim_team([(s, 1)], [{"name": "Analyst"}])
    handle = api.start_coordinator(team, name="shared-test", detached=True)
    try:
        # Named coordinators live in the `teamorch` namespace whatever namespace their creator joined.
        again = api.get_coordinator("shared-test")
        report = api.execute(again, fan_plan(2))
        assert report.success
    finally:
        api.stop_coordinator(handle)


def test_coordinator_dying_mid_run_keeps_finished_results(sims, coordinator) -> None:
    import threading

    from teamorch.errors import RunInterrupted

    quick = sims(name="quick", tokens_per_second=2000)
    slow = sims(name="slow", tokens_per_second=2)
    team = sim_team([(quick, 1), (slow, 1)], [{"name": "Analyst", "options": {"num_predict": 20}}])
    handle = coordinator(team)
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [
                {"task_id": "fast", "specialist": "Analyst", "server": "quick"},
                {"task_id": "stuck", "specialist": "Analyst", "server": "slow"},
            ],
        }
    )
    finished: list[str] = []

    def kill_after_first(result) -> None:
        finished.append(result.task_id)
        threading.Timer(0.2, ray.kill, args=(handle,)).start()

    try:
        api.execute(handle, plan, on_result=kill_after_first, poll=0.1)
    except RunInterrupted as exc:
        assert "coordinator died" in str(exc)
        assert [r.task_id for r in exc.finished] == ["fast"]
        assert exc.finished[0].status == "succeeded" and exc.finished[0].output
    else:
        raise AssertionError("the run should have been interrupted")


def test_execute_without_callbacks_polls_only_finished_results_and_keeps_them_when_the_coordinator_dies(
    sims, coordinator
) -> None:
    """Nobody listens, so the driver's polls ask for task_finished events only (the simulator is a real HTTP
    server); a coordinator killed mid-run still hands back what had finished."""
    import threading

    from teamorch.errors import RunInterrupted

    quick = sims(name="quick", tokens_per_second=2000)
    slow = sims(name="slow", tokens_per_second=2)
    handle = coordinator(sim_team([(quick, 1), (slow, 1)], [{"name": "Analyst", "options": {"num_predict": 20}}]))
    three = OrchestrationPlan.model_validate(
        {"problem": "p", "tasks": [{"task_id": f"t{i}", "specialist": "Analyst", "server": "quick"} for i in range(3)]}
    )
    done = api.execute(handle, three, run_id="whole")
    assert done.success
    finished = ray.get(handle.events.remote("whole", 0, ["task_finished"]))
    assert sorted(e.result.task_id for e in finished) == ["t0", "t1", "t2"]
    assert {e.type for e in finished} == {"task_finished"}
    assert len(ray.get(handle.events.remote("whole", 0))) > len(finished)  # queued, started, run events too
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [
                {"task_id": "fast", "specialist": "Analyst", "server": "quick"},
                {"task_id": "stuck", "specialist": "Analyst", "server": "slow"},
            ],
        }
    )
    threading.Timer(1.0, ray.kill, args=(handle,)).start()
    try:
        api.execute(handle, plan, poll=0.1)
    except RunInterrupted as exc:
        assert [r.task_id for r in exc.finished] == ["fast"] and exc.finished[0].output
    else:
        raise AssertionError("the run should have been interrupted")


def test_stalled_server_fails_over_before_the_task_deadline(sims, coordinator) -> None:
    stuck = sims(name="stuck", stall=True)
    fine = sims(name="fine")
    team = sim_team([(stuck, 1), (fine, 1)], [{"name": "Analyst"}], balancer={"policy": "round_robin"})
    team.servers[0].read_timeout = 1.0
    plan = OrchestrationPlan.model_validate(
        {"problem": "p", "tasks": [{"task_id": f"t{i}", "specialist": "Analyst", "timeout": 30} for i in range(2)]}
    )
    report = api.execute(coordinator(team), plan)
    assert report.success
    stalled = [a for t in report.tasks for a in t.attempts if a.server == "stuck"]
    assert stalled and all(a.outcome == "timeout" and "stalled: no data for 1s" in a.error for a in stalled)
    assert all(t.server == "fine" and t.duration < 10 for t in report.tasks)


def test_openai_compatible_protocol(sims, coordinator) -> None:
    s = sims(name="vllm", slots=2)
    team = sim_team([(s, 2)], [{"name": "Analyst", "options": {"num_predict": 7}}])
    team.servers[0].protocol = "openai"
    handle = coordinator(team)
    report = api.execute(handle, fan_plan(2))
    assert report.success, [t.error for t in report.tasks]
    assert all(t.tokens == 7 and t.output.startswith("[vllm]") for t in report.tasks)
    assert s.stats()["completed"] == 2
    # Streamed /v1/chat/completions gives the balancer the time to first token, as native /api/chat does.
    (load,) = ray.get(handle.servers_load.remote())
    assert load.ewma_latency is not None and load.ewma_ttft is not None


def test_coordinator_keeps_totals_not_every_task(sims, coordinator) -> None:
    from teamorch.actors.coordinator import KEEP_FINISHED_JOURNALS

    s = sims(name="s", slots=4, tokens_per_second=5000)
    handle = coordinator(sim_team([(s, 4)], [{"name": "Analyst"}]))
    runs = KEEP_FINISHED_JOURNALS + 4
    reports = [ray.get(handle.run_plan.remote(fan_plan(2), f"run{i}")) for i in range(runs)]
    assert all(r.success for r in reports)
    stats = ray.get(handle.statistics.remote())
    assert stats.runs == runs and stats.total_tasks == 2 * runs and stats.successful_tasks == 2 * runs
    assert ray.get(handle.progress.remote(f"run{runs - 1}"))  # recent journals stay for late pollers
    assert ray.get(handle.progress.remote("run0")) == []  # old ones are dropped
