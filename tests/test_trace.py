"""Pictures of a run (teamorch.trace) from hand-built reports: slot lanes, waits, idle gaps, critical path, files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from teamorch.errors import ConfigError, TeamorchError
from teamorch.journal import PlanResolved, RunFinished, RunJournal, TaskFinished
from teamorch.messages import Attempt, OrchestrationPlan, RunReport, Synthesis, TaskResult
from teamorch.policies.synthesis import compute_statistics
from teamorch.trace import (
    Gap,
    assign_lanes,
    chrome_trace,
    critical_path,
    idle_gaps,
    load_run_for_timeline,
    timeline_html,
    timeline_png,
    write_timeline,
)

T0 = 1_700_000_000.0
SLOTS = {"a": 2, "b": 1}
# task -> (dispatched, [(server, start, end, outcome)], depends_on); seconds from T0.
RUN: dict[str, tuple[float, list[tuple[str, float, float, str]], list[str]]] = {
    "t1": (0.0, [("a", 0.0, 4.0, "ok")], []),
    "t2": (0.0, [("a", 1.0, 5.0, "ok")], []),  # overlaps t1: the second slot of a
    "t3": (0.0, [("a", 4.0, 6.0, "ok")], []),  # queued 4 s for a slot, then takes t1's
    "t4": (5.2, [("a", 5.5, 7.0, "error"), ("b", 8.0, 10.0, "ok")], ["t2"]),  # fails on a, retried on b
    "t5": (6.0, [("b", 6.1, 7.9, "ok")], ["t1", "t3"]),
    "t6": (10.0, [("a", 10.2, 13.0, "ok")], ["t4", "t5"]),  # finishes last
}
ATTEMPTS = sum(len(attempts) for _, attempts, _ in RUN.values())


def _result(task_id: str) -> TaskResult:
    dispatched, attempts, _ = RUN[task_id]
    tries = [
        Attempt(server=s, started_at=T0 + a, ended_at=T0 + b, outcome=o, error=None if o == "ok" else "HTTP 500")
        for s, a, b, o in attempts
    ]
    return TaskResult(
        task_id=task_id,
        specialist=f"S-{task_id}",
        server=tries[-1].server,
        status="succeeded",
        attempts=tries,
        started_at=T0 + dispatched,
        ended_at=tries[-1].ended_at + 0.01,
        duration=sum(a.ended_at - a.started_at for a in tries),
        tokens=10 * int(task_id[1]),
    )


def _report(results: list[TaskResult] | None = None, run_id: str = "run-1") -> RunReport:
    results = [_result(t) for t in RUN] if results is None else results
    return RunReport(
        run_id=run_id,
        problem="find the bug",
        success=True,
        duration=13.1,
        tasks=results,
        synthesis=Synthesis(strategy="merge_all"),
        statistics=compute_statistics(results, 13.1),
    )


def _plan() -> OrchestrationPlan:
    return OrchestrationPlan(
        problem="find the bug",
        tasks=[{"task_id": t, "specialist": f"S-{t}", "depends_on": deps} for t, (_, _, deps) in RUN.items()],
    )


# ---- pure functions ------------------------------------------------------------------------------


def test_lanes_reuse_a_freed_slot_and_add_one_only_for_real_overlap() -> None:
    assert assign_lanes([(0, 4), (1, 5), (4, 6), (5.5, 7)]) == [0, 1, 0, 1]
    assert assign_lanes([(2, 3), (0, 10), (1, 4)]) == [2, 0, 1]  # three at once at t=2: three lanes


def test_idle_gaps_between_attempts_with_the_queued_time_inside_them() -> None:
    lane = [(10.2, 13.0), (0.0, 4.0), (4.0, 6.0)]  # unsorted; 4.0 touches: no gap there
    queued = [(7.0, 8.0), (7.5, 8.5), (1.0, 2.0), (12.0, 14.0)]  # overlapping waits count once
    [gap] = idle_gaps(lane, queued)
    assert (gap.start, gap.end, gap.queued) == (6.0, 10.2, ((7.0, 8.5),))
    assert gap.queued_seconds == pytest.approx(1.5)
    # A long attempt covering a short one leaves no gap between them; a wait reaching into a gap counts in part.
    assert idle_gaps([(0.0, 10.0), (2.0, 3.0), (12.0, 13.0)], [(9.0, 11.0)]) == [Gap(10.0, 12.0, ((10.0, 11.0),))]


def test_critical_path_follows_the_dependency_that_finished_last() -> None:
    report = _report()
    assert critical_path(report, _plan()) == ["t2", "t4", "t6"]
    assert critical_path(report) == ["t6"]
    assert critical_path(_report([])) == []


# ---- Chrome / Perfetto trace ---------------------------------------------------------------------


def _names(trace: dict[str, Any], kind: str) -> dict[tuple[int, int | None], str]:
    return {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == kind}


def test_trace_has_a_process_per_server_a_thread_per_slot_and_every_attempt_once() -> None:
    trace = chrome_trace(_report(), _plan(), SLOTS)
    assert trace["displayTimeUnit"] == "ms"
    processes = {name: pid for (pid, _), name in _names(trace, "process_name").items()}
    assert sorted(processes) == ["queue", "server a", "server b"]
    threads = _names(trace, "thread_name")
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for server, slots in SLOTS.items():
        pid = processes[f"server {server}"]
        lanes = {e["tid"] for e in spans if e["pid"] == pid}
        assert len(lanes) <= slots
        assert {threads[(pid, tid)] for tid in lanes} == {f"slot {n}" for n in range(1, len(lanes) + 1)}
    attempts = [e for e in spans if e["pid"] != processes["queue"]]
    keys = sorted((e["name"].split(" ")[0], e["args"]["attempt"]) for e in attempts)
    assert keys == sorted((t, n + 1) for t, (_, tries, _) in RUN.items() for n in range(len(tries)))
    first = next(e for e in attempts if e["name"] == "t1")
    assert (first["ts"], first["dur"], first["args"]["tokens"]) == (0, 4_000_000, 10)
    failed = [e for e in attempts if "failed" in e["cat"]]
    assert [(e["name"], e["args"]["error"], "tokens" in e["args"]) for e in failed] == [
        ("t4 [error]", "HTTP 500", False)
    ]
    assert sorted(e["name"] for e in attempts if "critical" in e["cat"]) == ["t2", "t4", "t4 [error]", "t6"]


def test_trace_shows_queue_and_retry_waits_per_task() -> None:
    trace = chrome_trace(_report(), _plan(), SLOTS)
    queue_pid = next(
        e["pid"] for e in trace["traceEvents"] if e["name"] == "process_name" and e["args"]["name"] == "queue"
    )
    waits = {(e["name"], e["ts"], e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == queue_pid}
    assert ("t3", 0, 4_000_000) in waits
    assert ("t4 [retry]", 7_000_000, 1_000_000) in waits
    threads = {name for (pid, _), name in _names(trace, "thread_name").items() if pid == queue_pid}
    assert threads == set(RUN)


def test_more_overlap_than_slots_adds_a_flagged_lane_and_drops_nothing() -> None:
    trace = chrome_trace(_report(), None, {"a": 1, "b": 1})
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and "attempt" in e["cat"]]
    assert len(spans) == ATTEMPTS
    flagged = sorted(e["name"] for e in spans if "over_slots" in e["args"])
    assert flagged == ["t2", "t4 [error]"]
    assert "slot 2 (over 1 configured)" in _names(trace, "thread_name").values()


def test_a_configured_server_that_ran_nothing_still_has_its_slots() -> None:
    trace = chrome_trace(_report(), None, {**SLOTS, "c": 2})
    pid = next(p for (p, _), name in _names(trace, "process_name").items() if name == "server c")
    assert sorted(name for (p, _), name in _names(trace, "thread_name").items() if p == pid) == ["slot 1", "slot 2"]
    assert "<h2>server c</h2><p class=sub>utilization 0% " in timeline_html(_report(), None, {**SLOTS, "c": 2})


# ---- HTML and PNG --------------------------------------------------------------------------------


def test_html_draws_every_attempt_and_marks_the_critical_path_and_gaps() -> None:
    page = timeline_html(_report(), _plan(), SLOTS)
    attempts = re.findall(r'<rect [^>]*class="attempt ([a-z ]+)" data-task="(\w+)"', page)
    assert len(attempts) == ATTEMPTS
    assert sorted(task for style, task in attempts if "failed" in style) == ["t4"]
    assert {task for style, task in attempts if "critical" in style} == {"t2", "t4", "t6"}
    assert "t2 → t4 → t6" in page
    # Idle: a's slot 1 6-10.2, a's slot 2 5-5.5, b 7.9-8. Work queued within them: t5 6-6.1, t4's retry 7-8 and
    # t6 10-10.2 (slot 1), t4 5.2-5.5 (slot 2), t4's retry 7.9-8 (b).
    gaps = re.findall(r'class="gap(-queued)?"', page)
    assert (gaps.count(""), gaps.count("-queued")) == (3, 5)
    assert "<script" not in page and "src=" not in page


def test_html_without_a_plan_says_the_path_is_the_last_task() -> None:
    page = timeline_html(_report())
    assert "plan unknown" in page
    assert len(re.findall(r'class="attempt [a-z ]*critical"', page)) == 1


def test_png_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TeamorchError, match=r"pip install matplotlib"):
        timeline_png(_report())


def test_png_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_timeline(_report(), tmp_path / "run.png", _plan(), SLOTS)
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_timeline_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.svg"):
        write_timeline(_report(), tmp_path / "run.svg")


# ---- loading a run -------------------------------------------------------------------------------


def _journal(runs_dir: Path, run_id: str) -> None:
    plan = _plan()
    journal = RunJournal.create(runs_dir, run_id, plan.model_dump(mode="json", exclude={"waves"}))
    with journal:
        journal.append(PlanResolved(plan=plan))
        for task_id in RUN:
            journal.append(TaskFinished(result=_result(task_id)))
        journal.append(RunFinished(success=True))


def test_load_a_report_file_and_a_journaled_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    report_file = tmp_path / "report.json"
    report_file.write_text(_report(run_id="loose").model_dump_json(), encoding="utf-8")
    report, plan = load_run_for_timeline(str(report_file), runs)
    assert (report.run_id, len(report.tasks), plan) == ("loose", len(RUN), None)

    _journal(runs, "r1")
    report, plan = load_run_for_timeline("r1", runs)
    assert [t.task_id for t in report.tasks] == list(RUN)
    assert plan is not None and critical_path(report, plan) == ["t2", "t4", "t6"]
    assert load_run_for_timeline(str(runs / "r1" / "events.jsonl"), tmp_path)[1] == plan
    # A report file of a journaled run gets the journal's plan, hence the real critical path.
    report_file.write_text(_report(run_id="r1").model_dump_json(), encoding="utf-8")
    assert load_run_for_timeline(str(report_file), runs)[1] == plan


def test_load_the_finished_tasks_of_an_interrupted_run(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    tasks = [_result("t1").model_dump(mode="json"), _result("t2").model_dump(mode="json")]
    path.write_text(json.dumps({"error": "coordinator died", "tasks": tasks}), encoding="utf-8")
    report, _ = load_run_for_timeline(str(path), tmp_path)
    assert (report.success, report.error, [t.task_id for t in report.tasks]) == (
        False,
        "coordinator died",
        ["t1", "t2"],
    )


@pytest.mark.parametrize("content", [None, "not json", '{"run_id": "x"}'])
def test_load_refuses_what_is_neither_a_report_nor_a_run(tmp_path: Path, content: str | None) -> None:
    target = tmp_path / "thing.json"
    if content is not None:
        target.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"thing\.json"):
        load_run_for_timeline(str(target), tmp_path / "runs")


def test_cli_timeline_draws_a_report_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teamorch.cli import main

    report = tmp_path / "report.json"
    report.write_text(_report().model_dump_json(), encoding="utf-8")
    out = tmp_path / "run.html"
    assert main(["timeline", str(report), "-o", str(out), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert out.read_text(encoding="utf-8").count("<svg") >= 1
    assert "timeline of run run-1" in capsys.readouterr().out
    assert main(["timeline", str(tmp_path / "nope.json"), "-o", str(out), "--runs-dir", str(tmp_path)]) == 2
