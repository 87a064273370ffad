"""Faults a long run meets, small and deterministic: the fault suite's (`benchmarks/faults.py`) rows for `make test`.

An actor killed mid-task as a crash would (`Coordinator.crash`, Ray restarts
it), a server process restarted on the same port, every server down, a
response without end. The simulators' own request logs are the ground truth:
a task's output produced twice would show there as two completed requests
carrying its marker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import ray

from teamorch.actors.backends import env_proxy
from teamorch.actors.backends.ollama import OllamaBackend
from teamorch.config import ServerConfig
from teamorch.errors import MalformedResponse
from teamorch.messages import ChatRequest, OrchestrationPlan, RunReport
from teamorch.sim import SimServer
from tests.helpers import sim_team

MODEL = "gemma3:270m"


def fan(n: int, tokens: int = 20, timeout: float = 60.0) -> OrchestrationPlan:
    """n independent tasks, each instruction carrying its marker (`MARK-tK.`) so the sim log tells them apart."""
    tasks = [
        {
            "task_id": f"t{i}",
            "specialist": "A",
            "input_data": {"instruction": f"MARK-t{i}. Step {i}."},
            "options": {"num_predict": tokens},
            "timeout": timeout,
        }
        for i in range(n)
    ]
    return OrchestrationPlan.model_validate({"problem": "p", "tasks": tasks})


def log(*sims: SimServer) -> list[dict[str, Any]]:
    return [entry for s in sims for entry in s.stats()["requests_log"]]


def per_task(entries: list[dict[str, Any]], n: int, completed: bool) -> dict[str, int]:
    """Per task, its requests (or, with `completed`, the outputs generated for it)."""
    return {
        f"t{i}": sum(f"MARK-t{i}." in e["prompt"] and (e["completed"] or not completed) for e in entries)
        for i in range(n)
    }


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def crash_mid_task(handle: Any, sim: SimServer, plan: OrchestrationPlan, kind: str, name: str = "") -> RunReport:
    """Start `plan`, kill one actor once the server is generating, and return the run's report."""
    ref = handle.run_plan.remote(plan)
    wait_for(lambda: sim.stats()["in_flight"] >= 1)
    assert ray.get(handle.crash.remote(kind, name), timeout=10) == f"{kind} {name}".strip()
    return ray.get(ref, timeout=60)


def test_a_server_actor_killed_mid_stream_is_restarted_and_its_calls_sent_again(sims, coordinator) -> None:
    sim = sims(name="a", slots=2, tokens_per_second=20)
    handle = coordinator(sim_team([(sim, 2)], [{"name": "A"}]))
    report = crash_mid_task(handle, sim, fan(4), "server", "a")
    assert report.success, [t.error for t in report.tasks]
    assert sim.stats()["cancelled"] >= 1  # the kill dropped a stream mid-generation
    assert per_task(log(sim), 4, completed=True) == dict.fromkeys([f"t{i}" for i in range(4)], 1)
    # No attempt failed: Ray sent the call again to the restarted actor, or told the specialist it was restarting,
    # which is back-pressure (retry there shortly), never a failure that rules the server out.
    tries = [a for t in report.tasks for a in t.attempts]
    assert {(a.outcome, a.error) for a in tries} <= {("ok", None), ("busy", "server actor restarting")}


def test_a_specialist_killed_mid_task_resumes_its_request_without_a_second_generation(sims, coordinator) -> None:
    sim = sims(name="a", slots=2, tokens_per_second=20)
    handle = coordinator(sim_team([(sim, 2)], [{"name": "A"}]))
    # Two tasks generating, two waiting at the balancer when the specialist dies: both kinds must resume.
    report = crash_mid_task(handle, sim, fan(4), "specialist", "A")
    assert report.success, [t.error for t in report.tasks]
    # The restarted specialist asked with the same dispatch keys: it got the leases and the requests in flight.
    once = {f"t{i}": 1 for i in range(4)}
    assert per_task(log(sim), 4, completed=False) == once
    assert per_task(log(sim), 4, completed=True) == once
    loads = ray.get(handle.servers_load.remote())
    assert loads[0].in_flight == 0  # no lease of the dead incarnation is left holding the slot


def test_a_restarted_balancer_never_grants_a_slot_it_cannot_account_for(sims, coordinator) -> None:
    # The box could take 2, the team says 1: a balancer that forgot its lease would put 2 on it.
    sim = sims(name="a", slots=2, tokens_per_second=20)
    handle = coordinator(sim_team([(sim, 1)], [{"name": "A"}]))
    report = crash_mid_task(handle, sim, fan(3), "balancer")
    assert report.success, [t.error for t in report.tasks]
    assert sim.stats()["max_in_flight"] == 1
    assert per_task(log(sim), 3, completed=True) == {"t0": 1, "t1": 1, "t2": 1}
    # The old lease's release frees its slot. Releases are one-way and may land just after the report (seen once
    # in a full `make test` on 2 cores: in_flight 1 read right after it): wait for it, 15 s at most.
    wait_for(lambda: ray.get(handle.servers_load.remote())[0].in_flight == 0)


def test_a_restarted_server_is_back_in_rotation_within_one_poll_interval(sims, coordinator) -> None:
    poll = 0.5
    a, b = sims(name="a", tokens_per_second=40), sims(name="b", tokens_per_second=40)
    team = sim_team([(a, 1), (b, 1)], [{"name": "A"}], retry={"circuit_failures": 1, "circuit_reset": 600})
    for server in team.servers:
        server.poll_interval = poll
    handle = coordinator(team)
    ref = handle.run_plan.remote(fan(24, tokens=12))
    wait_for(lambda: a.stats()["in_flight"] == 1)
    a.restart(down=1.0)  # in flight there fails over; the circuit opens for 600 s, unless a health check ends it
    report = ray.get(ref, timeout=60)
    assert report.success, [t.error for t in report.tasks]
    first_after = min(e["at"] for e in log(a) if e["at"] >= a.restarts[0])
    assert first_after - a.restarts[0] <= poll + 0.5, first_after - a.restarts[0]  # one poll, plus a tick and a hop
    assert per_task(log(a, b), 24, completed=True) == {f"t{i}": 1 for i in range(24)}


def test_a_fleet_with_every_server_down_ends_the_run_naming_each_server(sims, coordinator) -> None:
    a, b = sims(name="a"), sims(name="b")
    handle = coordinator(sim_team([(a, 1), (b, 1)], [{"name": "A"}]))
    a.stop()
    b.stop()
    started = time.monotonic()
    report = ray.get(handle.run_plan.remote(fan(3, timeout=30)), timeout=60)
    assert time.monotonic() - started < 10, "gave up well within the 30 s task deadlines"
    assert not report.success
    for task in report.tasks:
        assert task.status == "failed"
        for name, url in (("a", a.url), ("b", b.url)):
            assert f"server {name!r}" in task.error and url in task.error, task.error  # who, and where


def test_a_response_past_max_response_bytes_fails_the_attempt_as_malformed(sims) -> None:
    sim = sims(name="big", tokens_per_second=10_000, ttft=0.0, reply_bytes=1_000_000)
    backend = OllamaBackend(ServerConfig(name="big", url=sim.url, max_response_bytes=64 * 1024))
    req = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 20})

    async def call() -> None:
        try:
            await backend.chat(req)
        finally:
            await backend.aclose()

    with pytest.raises(MalformedResponse) as caught:
        asyncio.run(call())
    assert caught.value.error_class == "malformed"
    assert "'big'" in str(caught.value) and "max_response_bytes=65536" in str(caught.value)
    wait_for(lambda: sim.stats()["cancelled"] == 1)  # the stream was closed, not read to the end


def test_calls_in_turn_reuse_one_keep_alive_connection(sims) -> None:
    """The stream is read to its end after the `done` line: an unread rest would make the client close the
    connection, and every call would pay a TCP connect (the simulator counts the connections it saw)."""
    sim = sims(name="keep", tokens_per_second=1e6, ttft=0.0)
    backend = OllamaBackend(ServerConfig(name="keep", url=sim.url))
    req = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})

    async def calls() -> list[int]:
        try:
            return [(await backend.chat(req)).tokens for _ in range(5)]
        finally:
            await backend.aclose()

    assert asyncio.run(calls()) == [3] * 5
    assert sim.stats()["requests"] == 5 and sim.stats()["connections"] == 1


def test_an_answer_under_max_response_bytes_is_read_whole(sims) -> None:
    sim = sims(name="ok", tokens_per_second=10_000, ttft=0.0, reply_bytes=40_000)
    backend = OllamaBackend(ServerConfig(name="ok", url=sim.url, max_response_bytes=64 * 1024))
    req = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 20})
    response = asyncio.run(backend.chat(req))
    assert len(response.text) == 40_000 and response.tokens == 20


def test_a_server_url_goes_through_the_proxy_the_environment_names_unless_no_proxy_lists_it(monkeypatch) -> None:
    """As an httpx client with `trust_env` applies them: HTTP(S)_PROXY to model servers, NO_PROXY exempting some;
    read once per server for its lanes, which are bare transports (`env_proxy`)."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "http_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "10.0.0.7")
    assert env_proxy("http://10.0.0.5:11434") == "http://proxy.example:3128"
    assert env_proxy("http://10.0.0.7:11434") is None
    assert env_proxy("https://api.example.com") is None  # no HTTPS_PROXY set
    monkeypatch.setenv("ALL_PROXY", "proxy.example:1080")  # scheme-less: httpx reads it as http://
    assert env_proxy("https://api.example.com") == "http://proxy.example:1080"
