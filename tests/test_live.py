"""The live display: its state from a run's events (pure), its rendering, and when it is used at all.

The events are made by a real `RunJournal` the way the coordinator makes them
(live attempt reports, then each result's attempts and the result itself), so
the journal's de-duplication and session stamping are part of what is tested.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from teamorch.journal import (
    AttemptFailed,
    PlanResolved,
    RunFinished,
    RunJournal,
    TaskFinished,
    TaskQueued,
    TaskStarted,
    TokensGenerated,
    attempt_events,
)
from teamorch.live import LiveView, render, summarize, use_live
from teamorch.messages import Attempt, OrchestrationPlan, ServerLoad, Task, TaskResult

T0 = 1000.0
PLAN_RAW = {"problem": "p", "pattern": "parallel_analysis", "tasks": []}


def _plan(*task_ids: str) -> OrchestrationPlan:
    return OrchestrationPlan(
        problem="p", pattern="parallel_analysis", tasks=[Task(task_id=t, specialist=f"sp_{t}") for t in task_ids]
    )


def _result(task_id: str, status: str, attempts: list[tuple[str, float, float, str]], tokens: int = 0) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        specialist=f"sp_{task_id}",
        server=attempts[-1][0] if attempts else None,
        status=status,
        tokens=tokens,
        attempts=[Attempt(server=s, started_at=a, ended_at=b, outcome=o) for s, a, b, o in attempts],
    )


def _record(journal: RunJournal, result: TaskResult, at: float) -> None:
    """What the coordinator journals when a result arrives: its attempts (duplicates of live reports are
    dropped by the journal), then the result."""
    for event in attempt_events(result):
        journal.append(event)
    journal.append(TaskFinished(result=result, at=at))


def _loads() -> list[ServerLoad]:
    return [
        ServerLoad(name="s1", slots=2, effective_slots=2, in_flight=0, waiting=1, ewma_token_seconds=0.02),
        ServerLoad(name="s2", slots=2, effective_slots=2, in_flight=2, circuit="half_open", healthy=False),
    ]


@pytest.fixture
def journal(tmp_path: Path) -> RunJournal:
    """Six tasks at T0+20: a succeeded on s1, e failed on s1, b and c run on s2 (c after a timeout on s1),
    d waits for a slot, f is not handed out yet."""
    j = RunJournal.create(tmp_path, "run1", PLAN_RAW, at=T0)
    j.append(PlanResolved(plan=_plan("a", "b", "c", "d", "e", "f"), at=T0))
    for task_id in "abcde":
        j.append(TaskQueued(task_id=task_id, specialist=f"sp_{task_id}", at=T0 + 1))
    j.append(TaskStarted(task_id="a", server="s1", at=T0 + 2))
    j.append(TaskStarted(task_id="b", server="s2", at=T0 + 2))
    j.append(TaskStarted(task_id="c", server="s1", at=T0 + 3))
    j.append(AttemptFailed(task_id="c", server="s1", error_class="timeout", error="no answer in 1s", at=T0 + 4))
    j.append(TaskStarted(task_id="c", server="s2", attempt=2, at=T0 + 5))
    _record(j, _result("a", "succeeded", [("s1", T0 + 2, T0 + 10, "ok")], tokens=100), at=T0 + 10)
    _record(j, _result("e", "failed", [("s1", T0 + 6, T0 + 7, "error")]), at=T0 + 7)
    return j


def test_summarize_counts_each_state_and_lists_running_tasks_with_their_server(journal: RunJournal) -> None:
    state = summarize(journal.events, _loads(), now=T0 + 20)

    assert (state.run_id, state.pattern, state.total, state.finished) == ("run1", "parallel_analysis", 6, False)
    assert state.counts == {
        "pending": 1,
        "queued": 1,
        "running": 2,
        "succeeded": 1,
        "failed": 1,
        "skipped": 0,
        "cancelled": 0,
    }
    assert [(r.task_id, r.server, r.attempt, r.seconds) for r in state.running] == [
        ("b", "s2", 1, 18.0),
        ("c", "s2", 2, 15.0),
    ]


def test_summarize_lists_failed_attempts_and_derives_tokens_per_second(journal: RunJournal) -> None:
    state = summarize(journal.events, _loads(), now=T0 + 20)

    assert [(f.task_id, f.server, f.attempt, f.error_class) for f in state.failures] == [
        ("c", "s1", 1, "timeout"),
        ("e", "s1", 1, "error"),
    ]
    assert (state.elapsed, state.tokens, state.tokens_per_second) == (20.0, 100, 5.0)
    rows = {row.name: row for row in state.servers}
    assert list(rows) == ["s1", "s2"]
    assert (rows["s1"].running, rows["s1"].done, rows["s1"].tokens, rows["s1"].tokens_per_second) == (0, 2, 100, 5.0)
    assert (rows["s2"].running, rows["s2"].done, rows["s2"].load) == (2, 0, _loads()[1])


def test_servers_the_events_name_are_shown_before_the_first_load_snapshot(journal: RunJournal) -> None:
    assert [(row.name, row.load) for row in summarize(journal.events, [], now=T0 + 20).servers] == [
        ("s2", None),
        ("s1", None),
    ]


def test_a_resumed_run_counts_journaled_results_but_rates_only_this_session(tmp_path: Path) -> None:
    first = RunJournal.create(tmp_path, "run2", PLAN_RAW, at=T0)
    first.append(PlanResolved(plan=_plan("a", "b"), at=T0))
    first.append(TaskQueued(task_id="a", specialist="sp_a", at=T0))
    first.append(TaskQueued(task_id="b", specialist="sp_b", at=T0))
    _record(first, _result("a", "succeeded", [("s1", T0, T0 + 10, "ok")], tokens=50), at=T0 + 10)
    _record(first, _result("b", "cancelled", [("s2", T0, T0 + 11, "cancelled")]), at=T0 + 11)
    first.append(RunFinished(success=False, error="run cancelled", interrupted=True, at=T0 + 12))
    first.close()
    second = RunJournal.open(tmp_path, "run2")
    second.resume(at=T0 + 1000)
    second.append(TaskQueued(task_id="b", specialist="sp_b", at=T0 + 1000))
    second.append(TaskStarted(task_id="b", server="s2", at=T0 + 1001))
    mid = summarize(second.events, [], now=T0 + 1004)
    _record(second, _result("b", "succeeded", [("s2", T0 + 1001, T0 + 1010, "ok")], tokens=30), at=T0 + 1010)
    second.append(RunFinished(success=True, at=T0 + 1010))

    end = summarize(second.events, [], now=T0 + 5000)

    assert (mid.session, mid.finished, mid.counts["running"], mid.counts["cancelled"], mid.elapsed) == (
        2,
        False,
        1,
        0,
        4,
    )
    assert (end.finished, end.success, end.counts["succeeded"], end.counts["running"]) == (True, True, 2, 0)
    assert (end.elapsed, end.tokens, end.tokens_per_second) == (10.0, 30, 3.0)


def test_render_shows_the_counts_the_server_rows_and_the_failures(journal: RunJournal) -> None:
    console = Console(file=io.StringIO(), record=True, width=120, color_system=None)
    console.print(render(summarize(journal.events, _loads(), now=T0 + 20)))
    text = console.export_text()

    assert "Run run1  parallel_analysis  running" in text
    assert "pending 1  queued 1  running 2  succeeded 1  failed 1  skipped 0  cancelled 0" in text
    s1 = next(line for line in text.splitlines() if line.startswith("s1 "))
    s2 = next(line for line in text.splitlines() if line.startswith("s2 "))
    assert s1.split() == ["s1", "up", "closed", "0/2", "1", "0", "2", "100", "5.0", "50"]
    assert s2.split() == ["s2", "DOWN", "half_open", "2/2", "0", "2", "0", "0", "0.0", "-"]
    assert "c on s1 attempt 1: timeout: no answer in 1s" in text


def test_streamed_tokens_count_while_tasks_run_and_give_way_to_the_result(journal: RunJournal) -> None:
    journal.append(TokensGenerated(task_id="b", server="s2", tokens=30, tokens_per_second=6.0, at=T0 + 12))
    journal.append(TokensGenerated(task_id="b", server="s2", tokens=40, tokens_per_second=8.0, at=T0 + 14))
    journal.append(TokensGenerated(task_id="c", server="s2", attempt=2, tokens=20, tokens_per_second=4.0, at=T0 + 15))
    # A report of c's failed first attempt, fed to the display directly (the journal would drop it): not counted.
    stale = TokensGenerated(task_id="c", server="s1", attempt=1, tokens=99, at=T0 + 16)

    state = summarize([*journal.events, stale], _loads(), now=T0 + 20)

    assert [(r.task_id, r.tokens, r.tokens_per_second) for r in state.running] == [("b", 40, 8.0), ("c", 20, 4.0)]
    assert (state.tokens, state.tokens_per_second) == (160, 8.0)  # a's 100 finished, 60 streaming on s2
    rows = {row.name: row for row in state.servers}
    assert (rows["s1"].tokens, rows["s2"].tokens, rows["s2"].tokens_per_second) == (100, 60, 3.0)
    console = Console(file=io.StringIO(), record=True, width=120, color_system=None)
    console.print(render(state))
    b_row = next(line for line in console.export_text().splitlines() if line.startswith("b "))
    assert b_row.split() == ["b", "sp_b", "s2", "1", "18.0", "40", "8.0"]

    _record(journal, _result("b", "succeeded", [("s2", T0 + 2, T0 + 18, "ok")], tokens=45), at=T0 + 18)
    after = summarize(journal.events, _loads(), now=T0 + 20)
    assert (after.tokens, [r.task_id for r in after.running]) == (165, ["c"])  # b's result replaces its progress


def test_live_view_draws_the_events_it_is_fed_and_ends_on_the_fleet_as_the_run_left_it(journal: RunJournal) -> None:
    mid_run = [ServerLoad(name="s2", slots=2, effective_slots=2, in_flight=1)]
    snapshots = iter([mid_run, _loads()])  # the poller's first snapshot, then the one taken as the view stops
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    with LiveView(lambda: next(snapshots), console=console, load_every=60, clock=lambda: T0 + 20) as view:
        for event in journal.events:
            view(event)
    final = out.getvalue().splitlines()[-30:]  # the last frame, drawn once more when the view stops

    assert any(line.split()[:4] == ["s2", "DOWN", "half_open", "2/2"] for line in final)
    assert any("succeeded 1" in line for line in final)


def test_live_display_only_for_a_terminal_not_quiet_not_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        assert use_live(tty, quiet=False, plain=False)
        assert not use_live(tty, quiet=True, plain=False)
        assert not use_live(tty, quiet=False, plain=True)
        monkeypatch.setenv("TERM", "dumb")
        assert not use_live(tty, quiet=False, plain=False)
    os.close(leader)
    assert not use_live(io.StringIO(), quiet=False, plain=False)
