"""Synthesis strategies, success criteria and run statistics over hand-built results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from teamorch.errors import ConfigError
from teamorch.messages import Attempt, OrchestrationPlan, TaskResult
from teamorch.policies.reporting import build_report
from teamorch.policies.synthesis import (
    compute_statistics,
    meets_criteria,
    merge_all,
    merge_statistics,
    resolve_strategy,
    use_first_result,
    vote_summary,
)


def my_func(results: Sequence[TaskResult]) -> dict[str, Any]:
    """A user's custom strategy, loaded by dotted path `tests.test_synthesis:my_func`."""
    return {"count": len(results), "outputs": [r.output for r in results if r.status == "succeeded"]}


NOT_CALLABLE = 42


def res(task_id: str, status: str = "succeeded", **kw: Any) -> TaskResult:
    kw.setdefault("specialist", f"spec-{task_id}")
    return TaskResult(task_id=task_id, status=status, **kw)  # type: ignore[arg-type]


# ---- merge_all ---------------------------------------------------------------------------


def test_merge_all_keeps_every_success_with_provenance() -> None:
    results = [
        res("t1", server="s1", output="one"),
        res("t2", status="failed", server="s2", error="boom"),
        res("t3", specialist="Reviewer", server="s2", output="three"),
        res("t4", status="skipped"),
        res("t5", status="cancelled", output="partial"),
    ]
    assert merge_all(results) == {
        "t1": {"specialist": "spec-t1", "server": "s1", "output": "one"},
        "t3": {"specialist": "Reviewer", "server": "s2", "output": "three"},
    }


def test_merge_all_of_nothing_is_empty() -> None:
    assert merge_all([]) == {}
    assert merge_all([res("t", status="failed")]) == {}


# ---- use_first_result --------------------------------------------------------------------


def test_use_first_result_picks_the_earliest_finish_not_plan_order() -> None:
    results = [
        res("a_late", server="s1", output="L", ended_at=50.0),
        res("c_middle", server="s3", output="M", ended_at=20.0),
        res("b_early", server="s2", output="E", ended_at=10.0),
    ]
    assert use_first_result(results) == {
        "task_id": "b_early",
        "specialist": "spec-b_early",
        "server": "s2",
        "output": "E",
    }


def test_use_first_result_ignores_failures_and_unfinished() -> None:
    results = [
        res("failed_first", status="failed", ended_at=1.0),
        res("no_end", output="?", ended_at=None),
        res("ok", output="yes", ended_at=9.0),
    ]
    first = use_first_result(results)
    assert first is not None
    assert first["task_id"] == "ok"


def test_use_first_result_handles_time_zero() -> None:
    results = [res("b", output="b", ended_at=3.0), res("a", output="a", ended_at=0.0)]
    first = use_first_result(results)
    assert first is not None
    assert first["task_id"] == "a"


def test_use_first_result_without_success_is_none() -> None:
    assert use_first_result([]) is None
    assert use_first_result([res("t", status="failed", ended_at=1.0)]) is None


# ---- resolve_strategy --------------------------------------------------------------------


def test_builtin_strategies_resolve_by_name() -> None:
    assert resolve_strategy("merge_all") is merge_all
    assert resolve_strategy("use_first_result") is use_first_result


def test_custom_strategy_by_dotted_path() -> None:
    strategy = resolve_strategy("tests.test_synthesis:my_func")
    assert strategy([res("a", output="x"), res("b", status="failed")]) == {"count": 2, "outputs": ["x"]}


@pytest.mark.parametrize(
    "name",
    [
        "majority_vote",  # not built in, not a dotted path
        "no_such_module_teamorch_xyz:func",  # module missing
        "tests.test_synthesis:no_such_function",  # attribute missing
        "tests.test_synthesis:NOT_CALLABLE",  # not callable
        "tests.test_synthesis:",  # empty attribute
        ":my_func",  # empty module
        ".test_synthesis:my_func",  # relative import
    ],
)
def test_bad_strategy_raises_config_error_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_strategy(name)
    assert info.value.field == "synthesis_strategy"
    assert repr(name) in info.value.message
    assert str(info.value).startswith("synthesis_strategy: ")


# ---- meets_criteria ----------------------------------------------------------------------


def statuses(*s: str) -> list[TaskResult]:
    return [res(f"t{i}", status=x) for i, x in enumerate(s)]


@pytest.mark.parametrize(
    ("criteria", "results", "expected"),
    [
        ("all_tasks_complete", statuses("succeeded", "succeeded"), True),
        ("all_tasks_complete", statuses("succeeded", "failed"), False),
        ("all_tasks_complete", statuses("succeeded", "skipped"), False),
        ("all_tasks_complete", [], False),
        ("any", statuses("failed", "succeeded", "cancelled"), True),
        ("any", statuses("failed", "cancelled"), False),
        ("any", [], False),
        ("majority", statuses("succeeded", "succeeded", "failed"), True),
        ("majority", statuses("succeeded", "succeeded", "failed", "failed"), False),
        ("majority", statuses("succeeded"), True),
        ("majority", [], False),
        ("at_least:2", statuses("succeeded", "failed", "succeeded"), True),
        ("at_least:2", statuses("succeeded", "failed", "skipped"), False),
        ("at_least: 3", statuses("succeeded", "succeeded", "succeeded", "failed"), True),
        ("at_least: 3", statuses("succeeded", "succeeded", "failed", "failed"), False),
    ],
)
def test_meets_criteria(criteria: str, results: list[TaskResult], expected: bool) -> None:
    assert meets_criteria(criteria, results) is expected


def test_unknown_criteria_raises_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        meets_criteria("most", statuses("succeeded"))
    assert info.value.field == "success_criteria"
    assert "'most'" in info.value.message


# ---- compute_statistics ------------------------------------------------------------------


def att(server: str | None, start: float, end: float, outcome: str = "ok") -> Attempt:
    return Attempt(server=server, started_at=start, ended_at=end, outcome=outcome)


def test_compute_statistics_on_a_known_timeline() -> None:
    # wall 10 s. Task intervals: t1 [0,4], t2 [1,3], t3 [2,8], t5 [8,9]; t4 never ran.
    # At 2..3 t1, t2 and t3 all run: peak 3. t3 ends as t5 starts: touching is not overlapping.
    results = [
        res("t3", started_at=2.0, ended_at=8.0, duration=5.0, tokens=30,
            attempts=[att("s2", 2.0, 3.0, "unreachable"), att("s1", 4.0, 8.0)]),
        res("t1", started_at=0.0, ended_at=4.0, duration=4.0, tokens=10, attempts=[att("s1", 0.0, 4.0)],
            prompt_tokens=100, cached_tokens=80),
        res("t2", started_at=1.0, ended_at=3.0, duration=2.0, tokens=20, attempts=[att("s1", 1.0, 3.0)],
            prompt_tokens=50),
        res("t4", status="skipped"),
        res("t5", status="failed", started_at=8.0, ended_at=9.0, duration=1.0,
            attempts=[att(None, 8.0, 8.5, "no_server"), att("s2", 8.0, 9.0, "timeout")]),
    ]  # fmt: skip
    stats = compute_statistics(results, wall=10.0)
    assert stats.total_tasks == 5
    assert stats.successful_tasks == 3
    assert stats.failed_tasks == 1
    assert stats.success_rate == pytest.approx(0.6)
    assert stats.total_duration == 10.0
    assert stats.sequential_duration == pytest.approx(12.0)
    assert stats.parallel_efficiency == pytest.approx(12.0 / 10.0)
    assert stats.parallelism_factor == pytest.approx(3 / 5)
    # s1: [0,4] ∪ [1,3] ∪ [4,8] = [0,8] -> 0.8 (a plain sum would say 10 s); s2: [2,3] ∪ [8,9] = 2 s.
    assert stats.server_utilization == {"s1": pytest.approx(0.8), "s2": pytest.approx(0.2)}
    assert stats.tokens == 60
    # t2's server did not say what it cached: its prompt counts, its cache share does not
    assert (stats.prompt_tokens, stats.cached_tokens) == (150, 80)


def test_utilization_unions_nested_partial_and_disjoint_intervals() -> None:
    # [0,1] ∪ [2,5] ∪ [3,4] (nested) ∪ [4.5,6] (partly overlapping) = 1 + 4 = 5 s of 8.
    results = [
        res("d", started_at=4.5, ended_at=6.0, duration=1.5, attempts=[att("s", 4.5, 6.0)]),
        res("a", started_at=0.0, ended_at=1.0, duration=1.0, attempts=[att("s", 0.0, 1.0)]),
        res("b", started_at=2.0, ended_at=5.0, duration=3.0, attempts=[att("s", 2.0, 5.0)]),
        res("c", started_at=3.0, ended_at=4.0, duration=1.0, attempts=[att("s", 3.0, 4.0)]),
    ]
    stats = compute_statistics(results, wall=8.0)
    assert stats.server_utilization == {"s": pytest.approx(5.0 / 8.0)}
    assert stats.parallelism_factor == pytest.approx(2 / 4)
    assert stats.parallel_efficiency == pytest.approx(6.5 / 8.0)


def test_back_to_back_tasks_have_no_overlap() -> None:
    results = [
        res("a", started_at=0.0, ended_at=2.0, duration=2.0, attempts=[att("s", 0.0, 2.0)]),
        res("b", started_at=2.0, ended_at=4.0, duration=2.0, attempts=[att("s", 2.0, 4.0)]),
        res("c", started_at=4.0, ended_at=6.0, duration=2.0, attempts=[att("s", 4.0, 6.0)]),
    ]
    stats = compute_statistics(results, wall=6.0)
    assert stats.parallelism_factor == pytest.approx(1 / 3)
    assert stats.parallel_efficiency == pytest.approx(1.0)
    assert stats.server_utilization == {"s": pytest.approx(1.0)}


def test_fully_parallel_tasks_on_separate_servers() -> None:
    results = [
        res(f"t{i}", started_at=0.0, ended_at=5.0, duration=5.0, attempts=[att(f"s{i}", 0.0, 5.0)]) for i in range(4)
    ]
    stats = compute_statistics(results, wall=5.0)
    assert stats.parallelism_factor == pytest.approx(1.0)
    assert stats.parallel_efficiency == pytest.approx(4.0)
    assert stats.server_utilization == {f"s{i}": pytest.approx(1.0) for i in range(4)}


def test_statistics_with_no_results_or_zero_wall_do_not_divide_by_zero() -> None:
    empty = compute_statistics([], wall=0.0)
    assert (empty.total_tasks, empty.success_rate, empty.parallel_efficiency, empty.parallelism_factor) == (0, 0, 0, 0)
    assert empty.server_utilization == {}
    zero = compute_statistics([res("a", started_at=0.0, ended_at=0.0, attempts=[att("s", 0.0, 0.0)])], wall=0.0)
    assert zero.parallel_efficiency == 0.0
    assert zero.server_utilization == {"s": 0.0}


def test_parallelism_counts_time_on_servers_not_time_queued() -> None:
    # Both tasks were dispatched at 0, but b waited at the balancer until a finished on the only server.
    results = [
        res("a", started_at=0.0, ended_at=2.0, duration=2.0, attempts=[att("s", 0.0, 2.0)]),
        res("b", started_at=0.0, ended_at=4.0, duration=2.0, attempts=[att("s", 2.0, 4.0)]),
    ]
    stats = compute_statistics(results, wall=4.0)
    assert stats.parallelism_factor == pytest.approx(1 / 2)
    assert stats.parallel_efficiency == pytest.approx(1.0)


def test_merge_statistics_equals_statistics_of_all_runs_together() -> None:
    run1 = [
        res(
            "a",
            started_at=0.0,
            ended_at=2.0,
            duration=2.0,
            tokens=5,
            attempts=[att("s", 0.0, 2.0)],
            prompt_tokens=40,
            cached_tokens=30,
        ),
        res("b", status="failed", started_at=0.0, ended_at=1.0, duration=1.0, attempts=[att("t", 0.0, 1.0)]),
    ]
    run2 = [
        res(
            "c",
            started_at=10.0,
            ended_at=13.0,
            duration=3.0,
            tokens=7,
            attempts=[att("s", 10.0, 13.0)],
            prompt_tokens=60,
            cached_tokens=5,
        )
    ]
    merged = merge_statistics(compute_statistics(run1, wall=4.0), compute_statistics(run2, wall=6.0))
    assert (merged.total_tasks, merged.successful_tasks, merged.failed_tasks, merged.tokens) == (3, 2, 1, 12)
    assert (merged.prompt_tokens, merged.cached_tokens) == (100, 35)
    assert merged.success_rate == pytest.approx(2 / 3)
    assert merged.total_duration == pytest.approx(10.0)
    assert merged.sequential_duration == pytest.approx(6.0)
    assert merged.parallel_efficiency == pytest.approx(0.6)
    # s was busy 2 s + 3 s, t 1 s, over 10 s of runs
    assert merged.server_utilization == {"s": pytest.approx(0.5), "t": pytest.approx(0.1)}
    assert merged.parallelism_factor == pytest.approx((1.0 * 2 + 1.0 * 1) / 3)


# ---- build_report ------------------------------------------------------------------------


def report_plan(**extra: Any) -> OrchestrationPlan:
    tasks = [{"task_id": i, "specialist": "S"} for i in ("a", "b", "c")]
    return OrchestrationPlan.model_validate({"problem": "p", "tasks": tasks, **extra})


def test_report_lists_tasks_in_plan_order_and_applies_the_criteria() -> None:
    journal = {"c": res("c", output="C"), "a": res("a", output="A")}  # b never ran
    report = build_report(report_plan(success_criteria="majority"), "r1", journal, duration=2.0)
    assert [t.task_id for t in report.tasks] == ["a", "c"]
    assert report.success is True  # 2 of the 2 results succeeded
    assert report.synthesis.strategy == "merge_all" and set(report.synthesis.result) == {"a", "c"}
    assert report.statistics.total_duration == 2.0 and report.run_id == "r1"
    assert build_report(report_plan(success_criteria="at_least: 3"), "r1", journal, 2.0).success is False


def test_a_run_cut_short_fails_even_if_its_tasks_succeeded() -> None:
    journal = {i: res(i) for i in ("a", "b", "c")}
    report = build_report(report_plan(), "r", journal, 1.0, error="run cancelled")
    assert report.success is False and report.error == "run cancelled"


def raising(results: Sequence[TaskResult]) -> None:
    raise RuntimeError("bad merge")


@pytest.mark.parametrize(
    ("plan_extra", "custom", "strategy", "error"),
    [
        ({}, raising, "custom", "RuntimeError: bad merge"),
        ({"synthesis_strategy": "tests.test_synthesis:raising"}, None, "tests.test_synthesis:raising", "bad merge"),
        ({"synthesis_strategy": "tests.test_synthesis:gone"}, None, "tests.test_synthesis:gone", "cannot load"),
    ],
)
def test_a_failing_synthesis_keeps_the_results_and_fails_the_run(
    plan_extra: dict[str, Any], custom: Any, strategy: str, error: str
) -> None:
    journal = {i: res(i, output=i) for i in ("a", "b", "c")}
    report = build_report(report_plan(**plan_extra), "r", journal, 1.0, custom=custom)
    assert report.success is False and len(report.tasks) == 3
    assert report.synthesis.strategy == strategy and report.synthesis.result is None
    assert error in (report.synthesis.error or "")


def test_vote_summary_reads_like_the_vote() -> None:
    result = {"votes": {"approach B": ["x", "y"], "approach A": ["z"]}, "agreement": 2 / 3, "tie": False}
    assert vote_summary(result) == "'approach B': x, y; 'approach A': z (agreement 67%)"
    assert vote_summary({**result, "tie": True}).endswith("(agreement 67%, tie)")
