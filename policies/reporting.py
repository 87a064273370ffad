"""A finished run -> its `RunReport`: synthesis, success verdict and statistics.

Kept apart from the coordinator so the report a user reads is a function of
the plan and its results alone (no actor state), and can be tested as such.
"""

from __future__ import annotations

from collections.abc import Mapping

from teamorch.errors import TeamorchError
from teamorch.messages import OrchestrationPlan, RunReport, Statistics, Synthesis, TaskResult
from teamorch.policies.synthesis import Strategy, compute_statistics, meets_criteria, resolve_strategy


def synthesize(plan: OrchestrationPlan, results: list[TaskResult], custom: Strategy | None = None) -> Synthesis:
    """Apply the plan's strategy (or `custom`, a callable from Python); a strategy that raises is reported, not fatal.

    Results already paid for are worth more than a clean traceback, so the
    error goes into `Synthesis.error` and the run is marked failed.
    """
    out = Synthesis(strategy="custom" if custom is not None else plan.synthesis_strategy)
    try:
        out.result = (custom or resolve_strategy(plan.synthesis_strategy))(results)
    except TeamorchError as exc:
        out.error = str(exc)
    except Exception as exc:  # a user's custom strategy raised: keep the results, report the error
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def build_report(
    plan: OrchestrationPlan,
    run_id: str,
    journal: Mapping[str, TaskResult],
    duration: float,
    error: str | None = None,
    custom: Strategy | None = None,
) -> RunReport:
    """The report of one run: tasks in plan order, synthesis, verdict, statistics.

    `duration` is the run's wall time in seconds; `error` says why the run was
    cut short (then it failed whatever its tasks did).
    """
    results = [journal[t.task_id] for t in plan.tasks if t.task_id in journal]
    synthesis = synthesize(plan, results, custom)
    return RunReport(
        run_id=run_id,
        problem=plan.problem,
        pattern=plan.pattern,
        plan_source=plan.plan_source,
        plan_notes=plan.plan_notes,
        success=error is None and synthesis.error is None and meets_criteria(plan.success_criteria, results),
        duration=duration,
        tasks=results,
        synthesis=synthesis,
        statistics=with_hedges(compute_statistics(results, duration), results),
        error=error,
    )


def with_hedges(statistics: Statistics, results: list[TaskResult]) -> Statistics:
    """`statistics` with the run's hedging totals: duplicates started, tasks a duplicate answered, and the
    tokens cancelled race losers cost (what hedging spent to cut the tail)."""
    attempts = [a for r in results for a in r.attempts]
    wins = sum(
        1
        for r in results
        if r.status == "succeeded" and any(a.hedge and a.outcome == "ok" and a.server == r.server for a in r.attempts)
    )
    return statistics.model_copy(
        update={
            "hedges": sum(1 for a in attempts if a.hedge),
            "hedge_wins": wins,
            "wasted_tokens": sum(a.wasted_tokens for a in attempts),
        }
    )
