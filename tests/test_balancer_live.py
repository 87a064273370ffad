"""The live balancer through real actors against Ollama-API simulators (teamorch.sim, loopback HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from teamorch import api
from teamorch.actors.leases import LeaseClient
from teamorch.cli import main
from teamorch.messages import LeaseOutcome, LeaseRequest, OrchestrationPlan
from tests.helpers import NO_PROBES, fan, sim_team


def test_peak_ewma_sends_less_work_to_the_slow_server(sims, coordinator) -> None:
    fast = sims(name="fast", tokens_per_second=800, ttft=0.01)
    slow = sims(name="slow", tokens_per_second=80, ttft=0.01)
    team = sim_team([(fast, 1), (slow, 1)], [{"name": "A"}], balancer={"policy": "peak_ewma"})
    report = api.execute(coordinator(team), fan(24))
    assert report.success
    on_fast = sum(1 for t in report.tasks if t.server == "fast")
    on_slow = sum(1 for t in report.tasks if t.server == "slow")
    assert on_fast + on_slow == 24
    assert on_fast >= 3 * on_slow, (on_fast, on_slow)


def test_503_is_back_pressure_not_failure(sims, coordinator) -> None:
    # The team believes 'crowded' has 4 slots; it really has 1 and no queue (someone else is using it).
    crowded = sims(name="crowded", slots=1, max_queue=0, tokens_per_second=200)
    spare = sims(name="spare", slots=2, tokens_per_second=200)
    team = sim_team([(crowded, 4), (spare, 2)], [{"name": "A"}], balancer={"policy": "least_loaded"})
    handle = coordinator(team)
    report = api.execute(handle, fan(12))
    assert report.success, [t.error for t in report.tasks]
    assert crowded.stats()["rejected_503"] > 0
    busy = [a for t in report.tasks for a in t.attempts if a.outcome == "busy"]
    assert len(busy) == crowded.stats()["rejected_503"]
    loads = {s.name: s for s in ray.get(handle.servers_load.remote())}
    assert loads["crowded"].failed == 0, "a 503 is not counted as a server failure"
    assert loads["crowded"].circuit == "closed"


def test_model_affinity_prefers_the_server_with_the_model_loaded(sims, coordinator) -> None:
    warm = sims(name="warm", models=["m"], loaded=["m"], slots=2)
    cold = sims(name="cold", models=["m"], loaded=[], load_time=3.0, slots=2)
    team = sim_team([(warm, 2), (cold, 2)], [{"name": "A", "model": "m"}], balancer={"policy": "least_loaded"})
    report = api.execute(coordinator(team), fan(2))
    assert report.success
    assert {t.server for t in report.tasks} == {"warm"}  # /api/ps says only warm has it loaded
    assert cold.stats()["requests"] == 0


def test_circuit_opens_on_a_broken_server(sims, coordinator) -> None:
    broken = sims(name="broken", error_rate=1.0)
    fine = sims(name="fine", slots=2)
    team = sim_team(
        [(broken, 1), (fine, 2)], [{"name": "A"}], balancer={"policy": "round_robin"}, retry={"circuit_failures": 2}
    )
    handle = coordinator(team)
    report = api.execute(handle, fan(10, tokens=5))
    assert report.success
    loads = {s.name: s for s in ray.get(handle.servers_load.remote())}
    assert loads["broken"].circuit == "open"
    assert broken.stats()["requests"] == 2  # after two breakages, no more work went there


def test_servers_command_prints_the_load_table(
    sims, ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = sims(name="box1", models=["llama3.1:8b", "qwen2:7b"], loaded=["llama3.1:8b"], slots=2)
    team = tmp_path / "team.yaml"
    servers = [{"name": "box1", "url": s.url, "slots": 2}, {"name": "gone", "url": "http://127.0.0.1:9"}]
    team.write_text(yaml.safe_dump({"servers": servers}))
    assert main(["servers", "--team", str(team), "--address", ray.get_runtime_context().gcs_address]) == 0
    out = capsys.readouterr().out
    box1 = next(line for line in out.splitlines() if line.startswith("box1"))
    assert " up " in box1 and "0/2" in box1 and "llama3.1:8b" in box1
    gone = next(line for line in out.splitlines() if line.startswith("gone"))
    assert "DOWN" in gone


def test_a_specialists_second_task_goes_where_its_prompt_is_cached(sims, coordinator) -> None:
    # Prefill is slow (200 prompt tokens/s): the 300-word role prompt costs 1.5 s cold, so the second task must
    # go to the server whose slot holds it, not to the idle one, and that server must say it reused it.
    role = "You review payment code for money-losing bugs. " + "Check each branch that moves money. " * 50
    boxes = [sims(name=n, slots=1, tokens_per_second=400, ttft=0.01, prefill_tps=200) for n in ("a", "b")]
    team = sim_team(
        [(b, 1) for b in boxes], [{"name": "A", "system_prompt": role}], balancer={**NO_PROBES, "policy": "peak_ewma"}
    )
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "tasks": [
                {"task_id": "first", "specialist": "A", "options": {"num_predict": 20}},
                {"task_id": "second", "specialist": "A", "depends_on": ["first"], "options": {"num_predict": 20}},
            ],
        }
    )
    report = api.execute(coordinator(team), plan)
    assert report.success
    first, second = report.tasks
    assert second.server == first.server
    warm = next(b for b in boxes if b.config.name == first.server).stats()
    shared = len((role + "\nProblem: p").split())  # role prompt, then the run's problem: both tasks start so
    assert (warm["requests"], warm["prefix_hits"]) == (2, 1)
    assert warm["cached_prompt_tokens"] >= shared
    assert next(b for b in boxes if b.config.name != first.server).stats()["requests"] == 0


def test_a_sub_millisecond_coalesce_waits_one_loop_turn_not_a_timer() -> None:
    """epoll sleeps whole milliseconds: a 30 us timer held every acquire of a fast fleet for ~1 ms."""
    import asyncio

    from teamorch.actors.balancer import LOOP_TIMER_RESOLUTION, _after

    async def run() -> tuple[list[str], bool, bool]:
        fired: list[str] = []
        short = _after(LOOP_TIMER_RESOLUTION / 30, lambda: fired.append("short"))
        long = _after(LOOP_TIMER_RESOLUTION * 5, lambda: fired.append("long"))
        await asyncio.sleep(0)  # one turn of the loop
        kinds = isinstance(short, asyncio.TimerHandle), isinstance(long, asyncio.TimerHandle)
        long.cancel()
        return fired, *kinds

    assert asyncio.run(run()) == (["short"], False, True)


def _tick_inside_a_wave(balancer: Any) -> tuple[bool, int]:
    """Run in the balancer actor: if a wave is being gathered, fire a tick's planning round now; (gathering, leases
    granted so far)."""
    if balancer._coalescing is None:
        return False, len(balancer.leases)
    balancer._replan()
    return True, len(balancer.leases)


def test_a_tick_inside_a_wave_leaves_it_to_the_coalescing_timer(sims, ray_cluster) -> None:
    """The balancer's tick and health poll plan the queue (`_replan`), but not while a wave of asks is being
    gathered: a tick that fell inside a team's first wave used to plan it with only the asks in so far (prefix
    fleet B: 13-24 of 64 requests, and every slot's first prefix placed without the rest)."""
    a = sims(name="a", slots=1, tokens_per_second=1e6, ttft=0.0)
    b = sims(name="b", slots=1, tokens_per_second=1e6, ttft=0.0)
    handle = api.start_coordinator(sim_team([(a, 1), (b, 1)], [{"name": "A"}], balancer=NO_PROBES))
    try:
        balancer = ray.get(handle.__ray_call__.remote(lambda c: c.balancer))
        ray.get(balancer.lease_counters.remote())  # started and polled: nothing measured, so a wave is held cold

        async def run() -> tuple[bool, int, int]:
            client = LeaseClient(balancer)
            asks = [asyncio.ensure_future(client.acquire(LeaseRequest(model="gemma3:270m"))) for _ in range(2)]
            gathering, granted = False, 0
            for _ in range(500):  # until the asks are in and waiting for the rest of their wave
                gathering, granted = await balancer.__ray_call__.remote(_tick_inside_a_wave)
                if gathering or granted:  # polled back to back: a cold wave is gathered for 20 ms at least
                    break
            leases = await asyncio.wait_for(asyncio.gather(*asks), 30)  # the coalescing timer grants them
            for lease in leases:
                client.release(LeaseOutcome(lease_id=lease.lease_id, outcome="cancelled", model="", sent=False))
            await client.drain()
            return gathering, granted, len({lease.server for lease in leases})

        gathering, granted, servers = asyncio.run(run())
    finally:
        api.stop_coordinator(handle)
    assert gathering, "the asks were granted before a tick could land inside their wave"
    assert granted == 0, "a tick inside the wave granted part of it"
    assert servers == 2
