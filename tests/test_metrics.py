"""The team's metrics reach Ray's Prometheus endpoint under the names the README documents.

The truth is the scrape, not the code that records: a real actor records through `fleet_metrics()`,
the node's metrics agent exports it, and the test reads the Prometheus text Ray serves with
prometheus_client's parser (the format's reference implementation). Samples are matched by the
recording worker's `WorkerId`, so other tests' actors in the same session cannot interfere.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families

from teamorch.messages import LeaseOutcome, RunReport, ServerLoad, Statistics, Synthesis, TaskResult

SERVER, MODEL, SPEC = "metrics-srv", "metrics-model", "metrics-spec"
EXPORT_DEADLINE = 25.0  # Ray's workers report every ~10 s


@ray.remote(num_cpus=0)
class _Recorder:
    """Stands in for the balancer and the coordinator: the same per-process `fleet_metrics()` they use."""

    def record(
        self, results: list[TaskResult], report: RunReport, outcomes: list[LeaseOutcome], loads: list[ServerLoad]
    ) -> tuple[str, str]:
        from teamorch.actors.metrics import fleet_metrics

        metrics = fleet_metrics()
        for result in results:
            metrics.task_finished(result)
        metrics.run_finished(report)
        metrics.lease_granted(SERVER, 0.7)
        for outcome in outcomes:
            metrics.lease_released(SERVER, outcome)
        metrics.fleet(loads)
        context = ray.get_runtime_context()
        return context.get_worker_id(), context.get_node_id()


def _ok(latency: float, ttft: float, tokens: int, prompt: int, cached: int | None) -> LeaseOutcome:
    return LeaseOutcome(
        lease_id=f"l{latency}",
        outcome="ok",
        model=MODEL,
        latency=latency,
        ttft=ttft,
        tokens=tokens,
        prompt_tokens=prompt,
        cached_tokens=cached,
    )


SM = {"server": SERVER, "model": MODEL}
S = {"server": SERVER}
# (sample name as scraped, its teamorch tags) -> value; histogram buckets by their upper bound `le`.
EXPECTED: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
    (name, frozenset(tags.items())): value
    for name, tags, value in [
        ("ray_teamorch_tasks_total", {"specialist": SPEC, "status": "succeeded"}, 2),
        ("ray_teamorch_tasks_total", {"specialist": SPEC, "status": "failed"}, 1),
        ("ray_teamorch_runs_total", {"status": "failed"}, 1),
        ("ray_teamorch_run_duration_seconds_bucket", {"le": "10.0"}, 0),
        ("ray_teamorch_run_duration_seconds_bucket", {"le": "30.0"}, 1),
        ("ray_teamorch_attempts_total", {**SM, "outcome": "ok"}, 2),
        ("ray_teamorch_attempts_total", {**SM, "outcome": "busy"}, 1),
        ("ray_teamorch_request_latency_seconds_bucket", {**SM, "le": "0.25"}, 0),
        ("ray_teamorch_request_latency_seconds_bucket", {**SM, "le": "0.5"}, 1),
        ("ray_teamorch_request_latency_seconds_count", SM, 2),  # the busy attempt's latency is not a request's
        ("ray_teamorch_time_to_first_token_seconds_bucket", {**SM, "le": "0.1"}, 1),
        ("ray_teamorch_time_to_first_token_seconds_bucket", {**SM, "le": "0.25"}, 1),
        ("ray_teamorch_time_to_first_token_seconds_bucket", {**SM, "le": "0.5"}, 2),
        ("ray_teamorch_queue_wait_seconds_bucket", {**S, "le": "0.5"}, 0),
        ("ray_teamorch_queue_wait_seconds_bucket", {**S, "le": "1.0"}, 1),
        ("ray_teamorch_output_tokens_total", SM, 60),
        ("ray_teamorch_prompt_tokens_total", SM, 150),
        ("ray_teamorch_prompt_cached_tokens_total", SM, 60),
        ("ray_teamorch_queue_length", {}, 5),
        ("ray_teamorch_slots_in_use", S, 2),
        ("ray_teamorch_slots", S, 4),
        ("ray_teamorch_effective_slots", S, 3),
        ("ray_teamorch_tokens_per_second", S, 50),
        ("ray_teamorch_server_healthy", S, 1),
        ("ray_teamorch_circuit_open", S, 1),
    ]
}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}


def _scrape(port: int, worker_id: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The worker's teamorch samples, keyed like EXPECTED (Ray's and OpenTelemetry's own labels dropped)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("ray_teamorch_") and sample.labels.get("WorkerId") == worker_id:
                tags = {k: v for k, v in sample.labels.items() if k not in RAY_LABELS and not k.startswith("otel_")}
                out[sample.name, frozenset(tags.items())] = sample.value
    return out


def test_import_starts_no_ray() -> None:
    code = "import sys, teamorch.actors.metrics\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_reach_the_prometheus_endpoint(ray_cluster: None) -> None:
    results = [
        TaskResult(task_id="a", specialist=SPEC, status="succeeded"),
        TaskResult(task_id="b", specialist=SPEC, status="succeeded"),
        TaskResult(task_id="c", specialist=SPEC, status="failed", error="boom"),
    ]
    report = RunReport(
        problem="p",
        success=False,
        duration=12.0,
        tasks=results,
        synthesis=Synthesis(strategy="merge_all"),
        statistics=Statistics(),
    )
    outcomes = [
        _ok(latency=0.3, ttft=0.08, tokens=40, prompt=100, cached=60),
        _ok(latency=3.0, ttft=0.4, tokens=20, prompt=50, cached=None),
        LeaseOutcome(lease_id="l3", outcome="busy", model=MODEL, latency=0.01, error="503"),
        # a lease granted after its caller gave up goes back unused (`actors/leases.py`): no request, no attempt
        LeaseOutcome(
            lease_id="l4", outcome="cancelled", model=MODEL, error="granted after its caller gave up", sent=False
        ),
    ]
    load = ServerLoad(
        name=SERVER, slots=4, effective_slots=3, in_flight=2, waiting=5, ewma_token_seconds=0.02, circuit="open"
    )
    recorder = _Recorder.remote()
    try:
        worker_id, node_id = ray.get(recorder.record.remote(results, report, outcomes, [load]))
        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_id)
        deadline = time.monotonic() + EXPORT_DEADLINE
        scraped: dict[Any, float] = {}
        while time.monotonic() < deadline:
            scraped = _scrape(port, worker_id)
            if all(scraped.get(key) == value for key, value in EXPECTED.items()):
                break
            time.sleep(1.0)
        assert {k: scraped.get(k) for k in EXPECTED} == EXPECTED
        attempts = {dict(tags).get("outcome") for name, tags in scraped if name == "ray_teamorch_attempts_total"}
        assert attempts == {"ok", "busy"}
    finally:
        ray.kill(recorder)
