"""Prefix affinity on the embedded model: a specialist's second task, on the server that holds its prompt or not.

This one runs the real llama.cpp backend (Gemma 3 270M, two embedded servers
of one slot each), not the simulator. llama.cpp keeps the previous call's KV
cache in its context and evaluates only what differs, so a specialist's second
task is cheap exactly when it lands on the server whose last call was that
specialist's. Two specialists with long role prompts each run one task, then a
second that depends on it; the second tasks' prompt evaluation is measured
per router, on the same run shape:

* `peak_ewma` (the default): routes by its prefix index;
* `round_robin`: whatever the rotation gives;
* pinned, same server: each second task where its first ran (the best case);
* pinned, crossed: each second task on the other server (the worst case).

Figures are the servers' own: prompt tokens, tokens reused from the cache,
and the seconds from the call's start to its first token (prompt evaluation).

    .venv/bin/python -m benchmarks.embedded_prefix
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.common import ensure_ray, table
from teamorch import api
from teamorch.config import DEFAULT_SERVER_NAMES, TeamConfig
from teamorch.messages import OrchestrationPlan, Task, TaskResult

REPEATS = 3
FIRST, SECOND = ("a1", "b1"), ("a2", "b2")
ROLE_TEXT = (
    "You review production incidents in a payments platform written in Python. You read stack traces, logs and "
    "diffs line by line, name the exact function and line that fails, say why in one sentence, and propose the "
    "smallest change that fixes it without changing behaviour elsewhere. You distrust guesses: every claim cites "
    "the log line or code line it rests on. You know the platform's conventions: money is integer cents, every "
    "request carries an idempotency key, retries are safe only for idempotent calls, and the inventory service "
    "reserves stock before the payment is captured and releases it on failure. "
)
PROBLEM = (
    "After the 2.14 deploy, checkout fails for about 3% of orders with `KeyError: 'sku'` raised in "
    "inventory.reserve(), called from orders.place(). The failing orders all contain a gift card line item, "
    "which the new pricing code represents without a SKU. Payments for those orders were captured twice when "
    "the client retried after the 500, and stock for the other items in the order was never released. "
)


def team(policy: str) -> TeamConfig:
    """The embedded default fleet with two specialists whose role prompts are long and differ from the start."""
    specialists = [
        {
            "name": name,
            "system_prompt": f"You are the team's {focus} expert. " + ROLE_TEXT,
            "options": {"num_predict": 8},
        }
        for name, focus in (("A", "error analysis"), ("B", "data consistency"))
    ]
    return TeamConfig.model_validate({"specialists": specialists, "balancer": {"policy": policy}})


def plan(pin: dict[str, str] | None = None) -> OrchestrationPlan:
    """a1, b1 together; then a2 after a1, b2 after b1 (each second task shares its specialist's role and the problem)."""
    pin = pin or {}
    tasks = [
        Task(task_id="a1", specialist="A", input_data={"instruction": "Find the failing line."}, server=pin.get("a1")),
        Task(
            task_id="b1",
            specialist="B",
            input_data={"instruction": "List the data left inconsistent."},
            server=pin.get("b1"),
        ),
        Task(
            task_id="a2",
            specialist="A",
            input_data={"instruction": "Propose the fix."},
            depends_on=["a1"],
            server=pin.get("a2"),
        ),
        Task(
            task_id="b2",
            specialist="B",
            input_data={"instruction": "Propose the cleanup."},
            depends_on=["b1"],
            server=pin.get("b2"),
        ),
    ]
    return OrchestrationPlan(problem=PROBLEM, tasks=tasks, success_criteria="all_tasks_complete")


ONE, TWO = DEFAULT_SERVER_NAMES
ROUTERS: dict[str, tuple[str, dict[str, str] | None]] = {
    "teamorch peak_ewma (prefix-aware)": ("peak_ewma", None),
    "teamorch round_robin": ("round_robin", None),
    "pinned, same server (best case)": ("peak_ewma", {"a1": ONE, "b1": TWO, "a2": ONE, "b2": TWO}),
    "pinned, crossed (worst case)": ("peak_ewma", {"a1": ONE, "b1": TWO, "a2": TWO, "b2": ONE}),
}


def one_run(policy: str, pin: dict[str, str] | None) -> dict[str, TaskResult]:
    coordinator = api.start_coordinator(team(policy))
    try:
        report = api.execute(coordinator, plan(pin))
    finally:
        api.stop_coordinator(coordinator)
    results = {t.task_id: t for t in report.tasks}
    failed = [f"{t.task_id}: {t.error}" for t in results.values() if t.status != "succeeded"]
    if failed:
        raise RuntimeError("embedded run failed: " + "; ".join(failed))
    return results


def _mean(results: dict[str, TaskResult], ids: tuple[str, ...], field: str) -> float:
    return statistics.fmean(float(getattr(results[i], field) or 0.0) for i in ids)


def row(name: str, runs: list[dict[str, TaskResult]]) -> list[Any]:
    """Medians over the repeats of each run's mean over the two tasks of a kind."""

    def med(ids: tuple[str, ...], field: str) -> float:
        return statistics.median(_mean(r, ids, field) for r in runs)

    same = sum(r["a2"].server == r["a1"].server and r["b2"].server == r["b1"].server for r in runs)
    return [
        name,
        f"{same}/{len(runs)}",
        round(med(SECOND, "prompt_tokens")),
        round(med(SECOND, "cached_tokens")),
        round(med(SECOND, "prompt_eval_seconds") * 1e3, 1),
        round(med(FIRST, "prompt_eval_seconds") * 1e3, 1),
    ]


def main() -> dict[str, Any]:
    ensure_ray()
    measured: dict[str, list[dict[str, TaskResult]]] = {name: [] for name in ROUTERS}
    for _ in range(REPEATS):  # interleaved, so a slow minute of the machine hits every router alike
        for name, (policy, pin) in ROUTERS.items():
            measured[name].append(one_run(policy, pin))
    headers = [
        "router",
        "second task on first's server",
        "prompt tokens",
        "cached tokens",
        "second task prompt-eval ms",
        "first task prompt-eval ms",
    ]
    text = "\n".join(
        [
            "## Prefix affinity on the embedded model (real llama.cpp, Gemma 3 270M)",
            "Two embedded servers (1 slot each); specialists A and B each run a first task, then a second that "
            "depends on it. Prompt-eval = call start to first token, as llama.cpp ran it. Medians of "
            f"{REPEATS} runs per router, each the mean of the two tasks.",
            "",
            table(headers, [row(name, runs) for name, runs in measured.items()]),
        ]
    )
    print(text, flush=True)
    return {"text": text}


if __name__ == "__main__":
    from benchmarks.common import no_options

    no_options("benchmarks.embedded_prefix", __doc__)
    main()
