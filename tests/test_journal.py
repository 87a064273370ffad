"""The durable run journal on a real filesystem: round trips, crashes mid-write, damage, duplicates, secrets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from teamorch.config import parse_plan
from teamorch.errors import ConfigError
from teamorch.journal import (
    EVENTS_FILE,
    REDACTED,
    AttemptFailed,
    JournalCorrupt,
    JournalError,
    PlanResolved,
    RunFinished,
    RunJournal,
    RunNotFound,
    RunResumed,
    RunStarted,
    TaskFinished,
    TaskQueued,
    TaskStarted,
    TokensGenerated,
    attempt_events,
    list_runs,
    new_run_id,
    plan_version,
    redact,
    resolve_run_id,
    resolve_runs_dir,
    secret_values,
    validate_run_id,
)
from teamorch.messages import Attempt, OrchestrationPlan, RunReport, Synthesis, TaskResult
from teamorch.policies.synthesis import compute_statistics, meets_criteria, merge_all

TOKEN_VAR = "TEAMORCH_TEST_JOURNAL_TOKEN"
TOKEN = "sk-live-0123456789abcdef"
PLAN_RAW: dict[str, Any] = {
    "problem": "review the code",
    "team": {
        "servers": [
            {"name": "a", "url": "http://127.0.0.1:1", "headers": {"Authorization": f"Bearer ${{{TOKEN_VAR}}}"}}
        ]
    },
    "tasks": [
        {"task_id": "t1", "specialist": "s"},
        {"task_id": "t2", "specialist": "s", "depends_on": ["t1"]},
    ],
}


def plan_of(raw: dict[str, Any]) -> OrchestrationPlan:
    return parse_plan({k: v for k, v in raw.items() if k != "team"})


def result(task_id: str, status: str = "succeeded", start: float = 100.0, seconds: float = 2.0) -> TaskResult:
    ran = status in ("succeeded", "failed")
    return TaskResult(
        task_id=task_id,
        specialist="s",
        server="a" if ran else None,
        status=status,  # type: ignore[arg-type]
        attempts=[Attempt(server="a", started_at=start, ended_at=start + seconds, outcome="ok")] if ran else [],
        started_at=start if ran else None,
        ended_at=start + seconds if ran else None,
        duration=seconds if ran else 0.0,
        output=f"{task_id} output" if status == "succeeded" else None,
        tokens=10 if ran else 0,
    )


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def journal(runs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunJournal]:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    with RunJournal.create(runs, "run-1", PLAN_RAW, at=100.0) as created:
        yield created


# ---- round trip ------------------------------------------------------------------------------------


def test_events_round_trip_through_the_file(journal: RunJournal, runs: Path) -> None:
    plan = plan_of(PLAN_RAW)
    for event in [
        PlanResolved(plan=plan, at=100.5),
        TaskStarted(task_id="t1", server="a", attempt=1, at=101.0),
        AttemptFailed(task_id="t1", server="a", attempt=1, error_class="busy", error="503", seconds=0.5, at=101.5),
        TaskFinished(result=result("t1"), at=104.0),
        RunFinished(success=True, at=105.0),
    ]:
        assert journal.append(event)
    reopened = RunJournal.open(runs, "run-1")
    assert reopened.events == journal.events == journal.read()
    assert [e.seq for e in reopened.events] == [1, 2, 3, 4, 5, 6]
    assert {e.session for e in reopened.events} == {1}
    assert reopened.plan() == plan
    assert reopened.finished_results() == {"t1": result("t1")}
    # The copies are the files as written: `${ENV}` unexpanded.
    assert yaml.safe_load((runs / "run-1" / "plan.yaml").read_text()) == PLAN_RAW
    assert reopened.started.plan_version == plan_version(PLAN_RAW)


# ---- crashes and damage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        pytest.param(b'{"seq":3,"session":1,"at":9.0,"type":"task_sta', 0, id="torn mid-line"),
        pytest.param(b'{"seq":3,"session":1,"at":9.0,"type":"task_started","task_id":"t1"}', 1, id="newline lost"),
    ],
)
def test_a_crash_mid_write_loses_at_most_the_last_line(journal: RunJournal, runs: Path, tail: bytes, kept: int) -> None:
    journal.append(TaskFinished(result=result("t1")))
    journal.close()
    with (runs / "run-1" / EVENTS_FILE).open("ab") as out:
        out.write(tail)
    reopened = RunJournal.open(runs, "run-1")
    assert len(reopened.events) == 2 + kept
    # The next writer cuts the torn tail, so it does not end up mid-file.
    reopened.resume()
    reopened.append(TaskFinished(result=result("t2")))
    reopened.close()
    events = RunJournal.open(runs, "run-1").read()
    assert [e.type for e in events] == [
        "run_started",
        "task_finished",
        *["task_started"] * kept,
        "run_resumed",
        "task_finished",
    ]


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"not json at all", id="not JSON"),
        pytest.param(b'{"seq":2,"session":1,"at":1.0,"type":"no_such_event"}', id="unknown event"),
        pytest.param(b'{"seq":1,"session":1,"at":1.0,"type":"run_resumed"}', id="seq goes backwards"),
    ],
)
def test_damage_before_the_last_line_names_file_and_line(journal: RunJournal, runs: Path, line: bytes) -> None:
    journal.append(TaskFinished(result=result("t1")))
    path = runs / "run-1" / EVENTS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + line + b"\n" + lines[1])
    with pytest.raises(JournalCorrupt) as err:
        RunJournal.open(runs, "run-1")
    assert str(path) in str(err.value)
    assert err.value.field == "line 2"


# ---- exactly once ----------------------------------------------------------------------------------


def test_a_final_result_is_recorded_once_across_sessions(journal: RunJournal, runs: Path) -> None:
    assert journal.append(TaskFinished(result=result("t1")))
    assert not journal.append(TaskFinished(result=result("t1", start=200.0)))  # Ray delivered it twice
    assert journal.append(TaskFinished(result=result("t2", "cancelled")))
    journal.append(RunFinished(success=False, error="run cancelled", interrupted=True))
    journal.close()

    again = RunJournal.open(runs, "run-1")
    assert again.finished_results() == {"t1": result("t1")}  # a cancelled task runs again on resume
    assert again.resume() == 2
    assert not again.append(TaskFinished(result=result("t1", start=300.0)))
    assert again.append(TaskFinished(result=result("t2", start=300.0)))
    assert again.finished_results() == {"t1": result("t1"), "t2": result("t2", start=300.0)}
    lines = [json.loads(line) for line in (runs / "run-1" / EVENTS_FILE).read_text().splitlines()]
    assert [line["result"]["task_id"] for line in lines if line["type"] == "task_finished"] == ["t1", "t2", "t2"]


def test_attempts_are_keyed_by_session_task_and_attempt(journal: RunJournal) -> None:
    failed = AttemptFailed(task_id="t1", server="a", attempt=1, error_class="timeout", error="slow", seconds=3.0)
    assert journal.append(failed)
    assert not journal.append(failed)
    assert journal.append(failed.model_copy(update={"attempt": 2}))
    assert journal.append(failed.model_copy(update={"session": 2}))  # a new session counts attempts from 1
    assert journal.append(TaskStarted(task_id="t1", attempt=1))
    assert not journal.append(TaskStarted(task_id="t1", attempt=1))


def test_every_written_event_is_fsynced_before_append_returns(
    journal: RunJournal, runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    journal.append(TaskFinished(result=result("t1")))
    assert synced == [(runs / "run-1" / EVENTS_FILE).stat().st_ino]
    journal.append(TaskFinished(result=result("t1")))  # duplicate: nothing written, nothing synced
    assert len(synced) == 1


def test_a_group_commit_writes_every_fact_in_order_and_fsyncs_once_at_its_end(
    journal: RunJournal, runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(len((runs / "run-1" / EVENTS_FILE).read_bytes().splitlines()))  # lines on disk when synced
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    before = len(journal.events)
    with journal.group():
        for i in range(3):
            journal.append(TaskQueued(task_id=f"t{i}", specialist="s"))
            with journal.group():  # nested: still the one group
                journal.append(TaskFinished(result=result(f"t{i}")))
        journal.append(TaskFinished(result=result("t0")))  # a duplicate inside a group: still dropped
        assert synced == []  # written, flushed, not yet synced
    assert synced == [before + 6]  # one fsync, with all six facts on disk
    on_disk = [json.loads(line) for line in (runs / "run-1" / EVENTS_FILE).read_bytes().splitlines()][before:]
    assert [(e["type"], e.get("task_id") or e["result"]["task_id"]) for e in on_disk] == [
        (kind, f"t{i}") for i in range(3) for kind in ("task_queued", "task_finished")
    ]
    assert [e["seq"] for e in on_disk] == list(range(before + 1, before + 7))
    journal.append(TaskQueued(task_id="t9", specialist="s"))  # outside a group: synced before append returns
    assert synced == [before + 6, before + 7]


# ---- who may write, and what state a run is in -----------------------------------------------------


def test_one_writer_at_a_time_and_the_state_it_implies(journal: RunJournal, runs: Path) -> None:
    reader = RunJournal.open(runs, "run-1")
    with pytest.raises(JournalError, match="read-only"):
        reader.append(TaskStarted(task_id="t1"))
    assert reader.state().status == "running"
    with pytest.raises(JournalError, match="another live process"):
        reader.resume()
    journal.close()  # what the OS does when the writer dies
    assert reader.state().status == "interrupted"
    with reader:
        reader.resume()
        reader.append(RunFinished(success=True))
    assert reader.state().status == "finished"
    with pytest.raises(JournalError, match="already finished"):
        RunJournal.open(runs, "run-1").resume()


def test_list_runs_shows_every_run_with_its_progress(runs: Path) -> None:
    with RunJournal.create(runs, "b-later", PLAN_RAW, at=200.0) as later:
        later.append(PlanResolved(plan=plan_of(PLAN_RAW)))
        later.append(TaskFinished(result=result("t1")))
        later.append(TaskFinished(result=result("t2", "failed")))
        later.append(RunFinished(success=False))
    with RunJournal.create(runs, "a-earlier", PLAN_RAW, at=100.0):
        pass  # a driver that died before its plan was resolved
    (runs / "not-a-run").mkdir()
    (runs / ".partial").mkdir()
    states = list_runs(runs)
    assert [(s.run_id, s.status, s.done, s.total, s.success) for s in states] == [
        ("a-earlier", "interrupted", 0, None, None),
        ("b-later", "finished", 2, 2, False),
    ]
    assert list_runs(runs / "missing") == []


# ---- run ids and the runs directory ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", ".hidden", "../escape", "a/b", "has space", "x" * 65, "tab\there", "naïve"])
def test_a_malformed_run_id_is_a_config_error_naming_flag_and_value(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_run_id(bad)
    assert err.value.field == "--run-id"
    assert repr(bad) in str(err.value)


def test_generated_run_ids_are_valid_and_sort_by_start_time() -> None:
    first, second = new_run_id(now=1_700_000_000), new_run_id(now=1_700_000_001)
    assert validate_run_id(first) == first
    assert first < second
    assert new_run_id(now=5.0) != new_run_id(now=5.0)
    assert resolve_run_id("my.run_1-a") == "my.run_1-a"
    assert validate_run_id(resolve_run_id(None))


def test_runs_dir_comes_from_flag_then_env_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"TEAMORCH_RUNS_DIR": str(tmp_path / "from-env")}
    assert resolve_runs_dir(str(tmp_path / "flag"), env=env) == tmp_path / "flag"
    assert resolve_runs_dir(None, env=env) == tmp_path / "from-env"
    assert resolve_runs_dir(None, env={}, writable=False) == tmp_path / ".teamorch" / "runs"
    assert (tmp_path / "from-env").is_dir() and not (tmp_path / ".teamorch").exists()


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A runs dir nobody can write: chmod stops a user, but root writes through it, so as root
    the path lies under a regular file, where no one can create a directory."""
    if os.geteuid() == 0:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        yield blocker / "runs"
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    yield locked
    locked.chmod(0o700)


@pytest.mark.parametrize(("source", "field"), [("flag", "--runs-dir"), ("env", "TEAMORCH_RUNS_DIR")])
def test_an_unwritable_runs_dir_is_a_config_error_naming_the_path(unwritable: Path, source: str, field: str) -> None:
    arg, env = (str(unwritable), {}) if source == "flag" else (None, {"TEAMORCH_RUNS_DIR": str(unwritable)})
    with pytest.raises(ConfigError) as err:
        resolve_runs_dir(arg, env=env)
    assert str(unwritable) in str(err.value)
    assert err.value.field == field


def test_creating_a_run_in_an_unwritable_runs_dir_fails_before_anything_runs(unwritable: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create run directory"):
        RunJournal.create(unwritable, "r", PLAN_RAW)


def test_an_unknown_run_names_the_runs_directory_searched(runs: Path) -> None:
    with pytest.raises(RunNotFound) as err:
        RunJournal.open(runs, "nope")
    assert str(runs) in str(err.value) and "'nope'" in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI's exit 2


def test_an_existing_run_id_is_not_started_again(journal: RunJournal, runs: Path) -> None:
    with pytest.raises(ConfigError, match="teamorch resume run-1"):
        RunJournal.create(runs, "run-1", PLAN_RAW)


def test_a_journal_refuses_a_different_plan_version(journal: RunJournal) -> None:
    journal.check_plan({**PLAN_RAW, "team": {"servers": []}})  # another fleet, same work
    changed = {**PLAN_RAW, "problem": "review other code"}
    with pytest.raises(ConfigError) as err:
        journal.check_plan(changed)
    assert plan_version(PLAN_RAW) in str(err.value) and plan_version(changed) in str(err.value)


# ---- secrets ---------------------------------------------------------------------------------------


def test_redact_replaces_every_secret_longest_first() -> None:
    assert redact("k=abcd1234 and abcd1234ef", ["abcd1234", "abcd1234ef", ""]) == f"k={REDACTED} and {REDACTED}"
    assert redact("nothing here", []) == "nothing here"


def test_secret_values_are_the_expansions_of_header_references() -> None:
    raw = {
        "servers": [
            {"url": "http://${HOST}:1", "headers": {"Authorization": "Bearer ${TOKEN}", "X-Debug": "${DEBUG}"}}
        ],
        "team": {"servers": [{"headers": {"X-Key": "${KEY:-fallback}", "X-Unset": "${UNSET:-default-value}"}}]},
    }
    env = {"HOST": "box.example", "TOKEN": "t0ken-value", "DEBUG": "1", "KEY": "key-value"}
    assert sorted(secret_values(raw, env)) == ["key-value", "t0ken-value"]


def test_no_file_of_a_run_contains_an_expanded_secret(journal: RunJournal, runs: Path) -> None:
    leaked = f"401 from server: bad header 'Bearer {TOKEN}'"
    journal.append(AttemptFailed(task_id="t1", attempt=1, error_class="error", error=leaked))
    failed = result("t1", "failed").model_copy(update={"error": leaked})
    journal.append(TaskFinished(result=failed))
    for path in (runs / "run-1").iterdir():
        assert TOKEN not in path.read_text(), path.name
    assert journal.finished_results()["t1"].error == f"401 from server: bad header 'Bearer {REDACTED}'"
    assert f"${{{TOKEN_VAR}}}" in (runs / "run-1" / "plan.yaml").read_text()


# ---- the report ------------------------------------------------------------------------------------


def test_a_resumed_run_report_equals_the_report_of_its_results(journal: RunJournal, runs: Path) -> None:
    plan = plan_of(PLAN_RAW)
    journal.append(PlanResolved(plan=plan, at=100.0))
    journal.append(TaskFinished(result=result("t1", start=101.0), at=103.0))
    journal.append(TaskFinished(result=result("t2", "cancelled"), at=104.0))
    journal.append(RunFinished(success=False, error="run cancelled", interrupted=True, at=110.0))
    journal.close()
    resumed = RunJournal.open(runs, "run-1")
    resumed.resume(at=500.0)
    resumed.append(TaskFinished(result=result("t2", start=501.0, seconds=3.0), at=504.0))
    resumed.append(RunFinished(success=True, at=506.0))

    report = resumed.rebuild_report()

    results = [result("t1", start=101.0), result("t2", start=501.0, seconds=3.0)]
    wall = (110.0 - 100.0) + (506.0 - 500.0)  # the hours the driver lay dead are not run time
    expected = RunReport(
        run_id="run-1",
        problem="review the code",
        success=meets_criteria("all_tasks_complete", results),
        duration=wall,
        tasks=results,
        synthesis=Synthesis(strategy="merge_all", result=merge_all(results)),
        statistics=compute_statistics(results, wall),
    )
    history = {"sessions", "resumed_at"}
    assert report.model_dump(exclude=history) == expected.model_dump(exclude=history)
    assert [(s.session, s.started_at, s.ended_at, s.tasks) for s in report.sessions] == [
        (1, 100.0, 110.0, ["t1", "t2"]),
        (2, 500.0, 506.0, ["t2"]),
    ]
    assert report.resumed_at == [500.0]
    assert isinstance(resumed.events[-3], RunResumed)


def test_an_interrupted_run_reports_what_finished_and_says_it_was_interrupted(journal: RunJournal) -> None:
    journal.append(PlanResolved(plan=plan_of(PLAN_RAW)))
    journal.append(TaskFinished(result=result("t1")))
    report = journal.rebuild_report()
    assert [t.task_id for t in report.tasks] == ["t1"]
    assert not report.success
    assert "interrupted" in (report.error or "") and "teamorch resume run-1" in (report.error or "")


def test_a_run_without_a_resolved_plan_has_no_report_yet(journal: RunJournal) -> None:
    assert isinstance(journal.events[0], RunStarted)
    with pytest.raises(JournalError, match="before its plan was resolved"):
        journal.rebuild_report()


def test_the_coordinator_report_is_the_report_the_journal_rebuilds(journal: RunJournal, runs: Path) -> None:
    journal.append(PlanResolved(plan=plan_of(PLAN_RAW), at=100.0))
    journal.append(TaskFinished(result=result("t1"), at=103.0))
    journal.append(TaskFinished(result=result("t2", "failed"), at=104.0))
    given = journal.report(None, until=108.0)  # what the coordinator returns, then journals as run_finished
    journal.append(RunFinished(success=given.success, at=108.0))
    assert given.duration == 8.0 and given.sessions[0].ended_at == 108.0
    assert RunJournal.open(runs, "run-1").rebuild_report() == given


# ---- live events -----------------------------------------------------------------------------------


def test_attempts_of_a_result_become_started_and_failed_events() -> None:
    done = result("t1").model_copy(
        update={
            "attempts": [
                Attempt(server="a", started_at=1.0, ended_at=1.5, outcome="busy", error="503 busy"),
                Attempt(server="b", started_at=2.0, ended_at=4.0, outcome="ok"),
            ]
        }
    )
    assert [(type(e).__name__, e.server, e.attempt, e.at) for e in attempt_events(done)] == [
        ("TaskStarted", "a", 1, 1.0),
        ("AttemptFailed", "a", 1, 1.5),
        ("TaskStarted", "b", 2, 2.0),
    ]
    failed = attempt_events(done)[1]
    assert isinstance(failed, AttemptFailed) and (failed.error_class, failed.error, failed.seconds) == (
        "busy",
        "503 busy",
        0.5,
    )


def test_an_in_memory_journal_numbers_events_like_one_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    memory = RunJournal.in_memory("api-run", plan_of(PLAN_RAW).model_dump(mode="json"), secrets=[TOKEN])
    assert memory.append(TaskQueued(task_id="t1", specialist="s"))
    assert not memory.append(TaskQueued(task_id="t1", specialist="s"))  # one fact, once
    stored = memory.append(TaskFinished(result=result("t1").model_copy(update={"output": f"token {TOKEN}"})))
    assert isinstance(stored, TaskFinished) and stored.result.output == f"token {REDACTED}"
    assert [e.seq for e in memory.events] == [1, 2, 3]
    assert [e.seq for e in memory.since(1)] == [2, 3] and memory.since(3) == []
    assert memory.state().status == "running"
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
    with pytest.raises(JournalError, match="in memory only"):
        memory.resume()
    memory.close()
    with pytest.raises(JournalError, match="read-only"):
        memory.append(RunFinished(success=True))


def test_teamorch_runs_lists_each_run_with_status_and_progress(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teamorch.cli import main

    assert main(["runs", "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs in {runs}"
    with RunJournal.create(runs, "done-run", PLAN_RAW, at=100.0) as done:
        done.append(PlanResolved(plan=plan_of(PLAN_RAW)))
        done.append(TaskFinished(result=result("t1")))
        done.append(TaskFinished(result=result("t2")))
        done.append(RunFinished(success=True))
    with RunJournal.create(runs, "cut-run", PLAN_RAW, at=200.0) as cut:
        cut.append(PlanResolved(plan=plan_of(PLAN_RAW)))
        cut.append(TaskFinished(result=result("t1")))
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("done-run", "finished", "2/2", "1", "yes"),
        ("cut-run", "interrupted", "1/2", "1", "-"),
    ]


def test_without_secrets_a_task_event_is_stored_as_the_json_round_trip_would_store_it() -> None:
    """The fast path (no dump/scrub/validate) keeps exactly what the round trip keeps: same events, same order."""
    done = result("t1").model_copy(
        update={"attempts": [Attempt(server="a", started_at=1.0, ended_at=1.5, outcome="busy", error="503 busy")]}
    )
    started, failed = attempt_events(done)
    events = [
        TaskQueued(task_id="t1", specialist="s"),
        started,
        TokensGenerated(task_id="t1", server="a", tokens=3, tokens_per_second=2.5, ttft=0.1),
        failed,
        TaskFinished(result=done),
    ]
    plain = RunJournal.in_memory("fast", plan_of(PLAN_RAW).model_dump(mode="json"))
    scrubbed = RunJournal.in_memory("slow", plan_of(PLAN_RAW).model_dump(mode="json"), secrets=["never-in-any-text"])
    for event in events:
        plain.append(event)
        scrubbed.append(event)
    assert [e.model_dump() for e in plain.events[1:]] == [e.model_dump() for e in scrubbed.events[1:]]
    assert [type(e) for e in plain.events[1:]] == [type(e) for e in scrubbed.events[1:]]
    assert plain.events[-1].session == 1 and [e.seq for e in plain.events] == [1, 2, 3, 4, 5, 6]


def test_without_secrets_a_json_plain_plan_is_stored_as_given_and_equal_to_the_round_trip() -> None:
    """`plan_resolved` skips the dump/validate round trip when the plan holds only JSON values: the same plan
    object is kept (no re-validation of every task), and it equals what the round trip would store."""
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "context": {"repo": "x", "n": [1, 2.5, None, True]},
            "tasks": [{"task_id": "t1", "specialist": "s", "input_data": {"f": "a.py"}, "options": {"seed": 1}}],
        }
    )
    plain = RunJournal.in_memory("fast", plan.model_dump(mode="json"))
    scrubbed = RunJournal.in_memory("slow", plan.model_dump(mode="json"), secrets=["never-in-any-text"])
    kept, rebuilt = plain.append(PlanResolved(plan=plan)), scrubbed.append(PlanResolved(plan=plan))
    assert isinstance(kept, PlanResolved) and isinstance(rebuilt, PlanResolved)
    assert kept.plan is plan and rebuilt.plan is not plan
    assert kept.plan.model_dump() == rebuilt.plan.model_dump()


@pytest.mark.parametrize(
    "context",
    [{"path": Path("/tmp/x")}, {"pair": (1, 2)}, {"nan": float("nan")}, {"nested": [{"p": Path(".")}]}],
)
def test_a_plan_holding_a_non_json_value_is_still_stored_as_the_round_trip_makes_it(context: dict[Any, Any]) -> None:
    plan = OrchestrationPlan.model_validate(
        {"problem": "p", "context": context, "tasks": [{"task_id": "t1", "specialist": "s"}]}
    )
    journal = RunJournal.in_memory("r", {"problem": "p"})
    stored = journal.append(PlanResolved(plan=plan))
    assert isinstance(stored, PlanResolved) and stored.plan is not plan
    assert json.loads(json.dumps(stored.plan.context)) == stored.plan.context  # JSON-safe as stored
