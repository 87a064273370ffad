"""Prometheus metrics for a team, exported through Ray's own metrics pipeline.

Every Ray worker sends its `ray.util.metrics` to its node's metrics agent, which serves them in
Prometheus text format on the node's metrics export port (`ray.nodes()[i]["MetricsExportPort"]`;
pin it with `ray start --metrics-export-port=8080`). The agent runs even when the dashboard is off
(`include_dashboard=False`), so nothing has to be enabled. Measured with Ray 2.60:

* every name gets a `ray_` prefix: `teamorch_slots_in_use` is scraped as `ray_teamorch_slots_in_use`;
* a counter gets a `_total` suffix, so counters are named here without one (`teamorch_tasks` is
  scraped as `ray_teamorch_tasks_total`), as both of Ray's exporters (OpenTelemetry, OpenCensus) expect;
* a worker reports about every 10 s (`metrics_report_interval_ms`), and every series carries Ray's
  labels (`WorkerId`, `NodeAddress`, `SessionName`, ...) besides the tags below, so dashboards
  aggregate (`sum by (server)`, `max by (server)`) rather than read raw series.

Tags are the bounded ones a dashboard groups by: `server`, `model`, `specialist`, `status`,
`outcome`. Never `run_id` or `task_id`: each run would mint new series, Prometheus keeps every
series it has seen, and unbounded cardinality is the classic way to bring it down. Per-run detail
belongs to the run's journal, `events()` and `--trace`.

Metric objects are made on first use in the process that records (an actor's worker), never at
import: importing this module imports no Ray. Ray keys metrics by process, so there is one
`FleetMetrics` per process (`fleet_metrics()`), whichever actors or helpers in it record.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from teamorch.messages import LeaseOutcome, RunReport, ServerLoad, TaskResult

if TYPE_CHECKING:
    from ray.util.metrics import Counter, Gauge, Histogram

# Seconds, for one LLM request: a short answer from a warm slot takes ~50 ms, a long report or a
# cold model load minutes; roughly x2-x2.5 steps keep p50/p95 estimates within a bucket's width.
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
# Seconds, for a whole run (many requests, some in sequence).
RUN_BUCKETS = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0]

_SERVER_MODEL = ("server", "model")
_SERVER = ("server",)


class FleetMetrics:
    """The team's counters, gauges and histograms, each method one event an actor already handles.

    The balancer reports leases (`lease_granted`, `lease_released`) and its load table (`fleet`);
    the coordinator reports finished tasks (`task_finished`) and runs (`run_finished`). Attempts are
    counted where leases are released rather than in each specialist, so one process (the
    balancer) holds the per-server series instead of one copy per specialist worker. Leases are
    recorded when the load table is (`fleet`, the balancer's tick, 4 times a second): counts summed
    per series, timings observed then; Ray exports every ~10 s anyway, and recording each of
    thousands of leases a second was a twentieth of the balancer's time.
    """

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram  # here, not at import: see the module docstring

        self.tasks: Counter = Counter(
            "teamorch_tasks",
            "Tasks finished, by final status (succeeded, failed, cancelled, skipped).",
            ("specialist", "status"),
        )
        self.runs: Counter = Counter("teamorch_runs", "Runs finished, by verdict (succeeded, failed).", ("status",))
        self.run_duration: Histogram = Histogram(
            "teamorch_run_duration_seconds", "Wall time of a run, plan to report.", RUN_BUCKETS
        )
        self.attempts: Counter = Counter(
            "teamorch_attempts",
            "Requests sent to servers, by outcome: ok, cancelled, or the error class "
            "(busy, model_not_found, unreachable, error, timeout, malformed).",
            ("server", "model", "outcome"),
        )
        self.latency: Histogram = Histogram(
            "teamorch_request_latency_seconds",
            "Seconds from sending a successful request to its last byte, client side.",
            LATENCY_BUCKETS,
            _SERVER_MODEL,
        )
        self.ttft: Histogram = Histogram(
            "teamorch_time_to_first_token_seconds",
            "Seconds from sending a successful request to its first streamed token, client side.",
            LATENCY_BUCKETS,
            _SERVER_MODEL,
        )
        self.queue_wait: Histogram = Histogram(
            "teamorch_queue_wait_seconds",
            "Seconds a request waited at the balancer for a free slot, by the server it got.",
            LATENCY_BUCKETS,
            _SERVER,
        )
        self.output_tokens: Counter = Counter("teamorch_output_tokens", "Output tokens generated.", _SERVER_MODEL)
        self.prompt_tokens: Counter = Counter(
            "teamorch_prompt_tokens", "Prompt tokens as the server counts them, cached ones included.", _SERVER_MODEL
        )
        self.cached_tokens: Counter = Counter(
            "teamorch_prompt_cached_tokens", "Prompt tokens the server found in its prefix cache.", _SERVER_MODEL
        )
        self.queue_length: Gauge = Gauge("teamorch_queue_length", "Requests waiting at the balancer for a slot.")
        self.slots_in_use: Gauge = Gauge("teamorch_slots_in_use", "Requests in flight on the server.", _SERVER)
        self.slots: Gauge = Gauge("teamorch_slots", "The server's configured slots (OLLAMA_NUM_PARALLEL).", _SERVER)
        self.effective_slots: Gauge = Gauge(
            "teamorch_effective_slots", "Slots the balancer fills now: fewer while backing off after 503s.", _SERVER
        )
        self.tokens_per_second: Gauge = Gauge(
            "teamorch_tokens_per_second", "Generation speed of one request on the server (EWMA).", _SERVER
        )
        self.healthy: Gauge = Gauge("teamorch_server_healthy", "1 if the last health check passed, else 0.", _SERVER)
        self.circuit_open: Gauge = Gauge(
            "teamorch_circuit_open", "1 while the server's circuit breaker is open (no requests sent), else 0.", _SERVER
        )
        self._counts: dict[tuple[Counter, tuple[tuple[str, str], ...]], float] = {}  # summed until `fleet`
        self._observed: list[tuple[Histogram, float, dict[str, str]]] = []  # observed at `fleet`

    def task_finished(self, result: TaskResult) -> None:
        self.tasks.inc(1, {"specialist": result.specialist, "status": result.status})

    def run_finished(self, report: RunReport) -> None:
        self.runs.inc(1, {"status": "succeeded" if report.success else "failed"})
        self.run_duration.observe(report.duration)

    def lease_granted(self, server: str, waited: float) -> None:
        self._observed.append((self.queue_wait, max(0.0, waited), {"server": server}))

    def lease_released(self, server: str, done: LeaseOutcome) -> None:
        """One attempt on `server`; timings and tokens only of successful ones, as a failure's would skew them.
        A lease that went back unused is no attempt: no request reached the server."""
        if not done.sent:
            return
        tags = {"server": server, "model": done.model}
        self._count(self.attempts, 1, {**tags, "outcome": done.outcome})
        if not done.ok:
            return
        if done.latency is not None:
            self._observed.append((self.latency, done.latency, tags))
        if done.ttft is not None:
            self._observed.append((self.ttft, done.ttft, tags))
        for counter, value in (
            (self.output_tokens, done.tokens),
            (self.prompt_tokens, done.prompt_tokens),
            (self.cached_tokens, done.cached_tokens or 0),
        ):
            if value > 0:  # a Ray counter refuses 0
                self._count(counter, value, tags)

    def _count(self, counter: Counter, value: float, tags: dict[str, str]) -> None:
        key = (counter, tuple(sorted(tags.items())))
        self._counts[key] = self._counts.get(key, 0) + value

    def _record_leases(self) -> None:
        counts, observed = self._counts, self._observed
        self._counts, self._observed = {}, []
        for (counter, tags), value in counts.items():
            counter.inc(value, dict(tags))
        for histogram, value, labels in observed:
            histogram.observe(value, labels)

    def fleet(self, loads: list[ServerLoad]) -> None:
        """The balancer's load table (every row's `waiting` is the balancer's whole queue), and the leases since."""
        self._record_leases()
        self.queue_length.set(max((row.waiting for row in loads), default=0))
        for row in loads:
            tags = {"server": row.name}
            self.slots_in_use.set(row.in_flight, tags)
            self.slots.set(row.slots, tags)
            self.effective_slots.set(row.effective_slots, tags)
            self.healthy.set(int(row.healthy), tags)
            self.circuit_open.set(int(row.circuit == "open"), tags)
            if row.ewma_token_seconds:
                self.tokens_per_second.set(1.0 / row.ewma_token_seconds, tags)


@functools.cache
def fleet_metrics() -> FleetMetrics:
    """This process's metrics, made on first use: call it where the event happens, inside the actor."""
    return FleetMetrics()
