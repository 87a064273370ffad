"""Early grants through real actors against Ollama-API simulators (teamorch.sim: real HTTP on loopback).

The balancer grants a slot shortly before the request on it ends; the next request waits at the server
actor's gate. What the server saw is the truth here: never more than `slots` requests at once, even while
the balancer holds `slots` + 1 leases, and nothing is lost when the server dies under a waiting request.
"""

from __future__ import annotations

import threading
import time

import ray

from teamorch import api
from teamorch.messages import RunReport
from tests.helpers import fan, sim_team


def test_a_request_waits_at_the_gate_and_the_box_never_sees_more_than_its_slots(sims, coordinator) -> None:
    box = sims(name="box", slots=1, tokens_per_second=200, ttft=0.01)
    handle = coordinator(sim_team([(box, 1)], [{"name": "A"}], balancer={"policy": "peak_ewma"}))
    reports: list[RunReport] = []
    runner = threading.Thread(target=lambda: reports.append(api.execute(handle, fan(16, tokens=40))))
    runner.start()
    leases = 0
    while runner.is_alive():  # the balancer's own table, as `teamorch servers` shows it
        leases = max(leases, *(s.in_flight for s in ray.get(handle.servers_load.remote())))
        time.sleep(0.005)
    runner.join()
    assert reports and reports[0].success
    stats = box.stats()
    assert stats["max_in_flight"] == 1, "the gate keeps the box at its slots"
    assert leases == 2, "one request was granted while the one before it still ran"
    assert stats["completed"] == 16 and stats["rejected_503"] == 0


def test_a_request_waiting_at_the_gate_of_a_server_that_dies_fails_over_and_frees_its_lease(sims, coordinator) -> None:
    # 'dies' is fast, so it gets most of the work and an early grant waits behind its running request
    # when it dies (at its 5th request); both fail over to 'spare'.
    dies = sims(name="dies", slots=1, tokens_per_second=400, ttft=0.01, die_after=5)
    spare = sims(name="spare", slots=1, tokens_per_second=100, ttft=0.01)
    team = sim_team([(dies, 1), (spare, 1)], [{"name": "A"}], balancer={"policy": "peak_ewma"})
    handle = coordinator(team)
    report = api.execute(handle, fan(12, tokens=30))
    assert report.success, [t.error for t in report.tasks]
    assert all(t.status == "succeeded" for t in report.tasks)
    assert dies.stats()["max_in_flight"] <= 1 and spare.stats()["max_in_flight"] <= 1
    time.sleep(0.3)  # releases are fire-and-forget: let the last ones land
    loads = {s.name: s for s in ray.get(handle.servers_load.remote())}
    assert loads["dies"].in_flight == 0 and loads["spare"].in_flight == 0, "every lease came back"
