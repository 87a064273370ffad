"""Progress of a streaming call: the throttle that decides when a call reports (pure), and how the journal
takes `tokens_generated` (numbered like every event, written without an fsync, only while its attempt runs)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from teamorch.config import parse_plan
from teamorch.journal import (
    EVENTS_FILE,
    AttemptFailed,
    PlanResolved,
    RunFinished,
    RunJournal,
    TaskFinished,
    TaskStarted,
    TokensGenerated,
    read_events,
)
from teamorch.messages import Attempt, TaskResult
from teamorch.policies.progress import REPORT_EVERY, ProgressThrottle, generation_rate


def feed(throttle: ProgressThrottle, counts: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(time, tokens) of each report the throttle lets through for chunks arriving at those times."""
    return [(now, step.tokens) for now, tokens in counts if (step := throttle.seen(tokens, now))]


def test_a_call_reports_at_most_once_per_interval_and_never_in_its_first() -> None:
    # A token every 0.1 s for 2 s, starting 0.3 s after the call (its time to first token).
    chunks = [(round(0.3 + 0.1 * i, 3), i + 1) for i in range(18)]
    reports = feed(ProgressThrottle(started=0.0, every=0.5), chunks)
    assert reports == [(0.5, 3), (1.0, 8), (1.5, 13), (2.0, 18)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports)]
    assert all(gap >= 0.5 - 1e-9 for gap in gaps)


def test_a_call_that_ends_within_the_interval_reports_nothing() -> None:
    chunks = [(0.01 * i, i) for i in range(1, 40)]  # 39 tokens in 0.39 s
    assert feed(ProgressThrottle(started=0.0), chunks) == []
    assert REPORT_EVERY == 0.5


def test_a_stalled_stream_reports_nothing_new_and_a_report_carries_ttft_and_decode_rate() -> None:
    throttle = ProgressThrottle(started=10.0, every=0.5)
    assert throttle.seen(0, 11.0) is None  # no token yet: nothing to say
    assert throttle.seen(1, 12.0) is not None  # the first token, 2 s after the call
    assert throttle.seen(1, 13.0) is None  # the same count again: not news
    step = throttle.seen(41, 14.0)
    assert step is not None
    assert (step.tokens, step.ttft, step.tokens_per_second) == (41, 2.0, 20.0)  # 40 tokens after the first in 2 s


def test_generation_rate_needs_two_tokens_and_some_time() -> None:
    assert generation_rate(1, 5.0, 9.0) == 0.0
    assert generation_rate(10, 5.0, 5.0) == 0.0
    assert generation_rate(11, 5.0, 7.0) == 5.0


# ---- the journal ------------------------------------------------------------------------------------


def progress(tokens: int, attempt: int = 1) -> TokensGenerated:
    return TokensGenerated(task_id="t1", attempt=attempt, server="a", tokens=tokens, tokens_per_second=10.0, ttft=0.2)


@pytest.fixture
def journal(tmp_path: Path) -> RunJournal:
    return RunJournal.create(tmp_path, "run-p", {"problem": "p", "tasks": []}, at=100.0)


def test_progress_is_journaled_in_seq_without_an_fsync(
    journal: RunJournal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    journal.append(TaskStarted(task_id="t1", server="a"))
    assert len(synced) == 1
    assert journal.append(progress(5)) and journal.append(progress(9))
    assert len(synced) == 1  # progress lines are written and flushed, not synced
    assert not journal.append(progress(9))  # the same report delivered twice is written once

    on_disk = read_events(tmp_path / "run-p" / EVENTS_FILE)
    assert [e.seq for e in on_disk] == list(range(1, len(on_disk) + 1)) == [e.seq for e in journal.events]
    assert [e.tokens for e in on_disk if isinstance(e, TokensGenerated)] == [5, 9]


def test_progress_is_kept_only_while_its_attempt_runs(journal: RunJournal) -> None:
    assert not journal.append(progress(5))  # before its task_started: dropped
    journal.append(TaskStarted(task_id="t1", server="a"))
    assert journal.append(progress(5))
    journal.append(AttemptFailed(task_id="t1", server="a", error_class="timeout", error="slow"))
    assert not journal.append(progress(7))  # its attempt failed
    journal.append(TaskStarted(task_id="t1", server="a", attempt=2))
    assert journal.append(progress(3, attempt=2))
    ok = Attempt(server="a", started_at=100.0, ended_at=101.0, outcome="ok")
    journal.append(TaskFinished(result=TaskResult(task_id="t1", specialist="s", status="succeeded", attempts=[ok])))
    assert not journal.append(progress(8, attempt=2))  # arrived after the result: never shown past the end


def test_progress_changes_neither_the_report_nor_the_one_the_journal_rebuilds(tmp_path: Path) -> None:
    plan_raw = {"problem": "p", "tasks": [{"task_id": "t1", "specialist": "s"}]}
    ok = Attempt(server="a", started_at=101.0, ended_at=104.0, outcome="ok")
    done = TaskResult(task_id="t1", specialist="s", server="a", status="succeeded", attempts=[ok], tokens=40)
    reports = []
    for runs, streamed in ((tmp_path / "plain", []), (tmp_path / "streamed", [20, 35])):
        journal = RunJournal.create(runs, "run-r", plan_raw, at=100.0)
        journal.append(PlanResolved(plan=parse_plan(plan_raw), at=100.0))
        journal.append(TaskStarted(task_id="t1", server="a", at=101.0))
        for n, tokens in enumerate(streamed):
            assert journal.append(progress(tokens).model_copy(update={"at": 102.0 + n}))
        journal.append(TaskFinished(result=done, at=104.0))
        given = journal.report(None, until=105.0)
        journal.append(RunFinished(success=given.success, at=105.0))
        journal.close()
        assert RunJournal.open(runs, "run-r").rebuild_report() == given
        reports.append(given)
    assert reports[0] == reports[1]
