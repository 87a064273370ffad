"""Journaled runs end to end: a `teamorch run` process SIGKILLed mid-run and resumed, and secrets kept out.

The simulator's own request log (`stats()["requests_log"]`, every prompt it
was sent) is the ground truth: a task that finished before the kill must
appear in it exactly once, however many sessions the run took.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.faults import cli as cli_process  # one way to start a killable `teamorch` process
from teamorch import api, cli
from teamorch.journal import EVENTS_FILE, REDACTED, PlanResolved, RunJournal, TaskFinished
from teamorch.messages import AutoSpec, ConsensusSpec, JournalSpec
from teamorch.sim import SimServer
from tests.helpers import sim_team

CHAIN = 6


def chain_plan(n: int) -> dict[str, Any]:
    """t1 -> t2 -> ... -> tn, each task's instruction carrying its own marker (`MARK-tK.`)."""
    return {
        "problem": "a chain of dependent steps",
        "tasks": [
            {
                "task_id": f"t{i}",
                "specialist": "Analyst",
                "input_data": {"instruction": f"MARK-t{i}. Do step {i}."},
                "depends_on": [f"t{i - 1}"] if i > 1 else [],
            }
            for i in range(1, n + 1)
        ],
    }


def write_files(tmp_path: Path, sim: SimServer, headers: dict[str, str] | None = None) -> tuple[Path, Path]:
    plan, team = tmp_path / "plan.yaml", tmp_path / "team.yaml"
    plan.write_text(yaml.safe_dump(chain_plan(CHAIN)))
    server: dict[str, Any] = {"name": sim.config.name, "url": sim.url, "slots": 1, "models": ["gemma3:270m"]}
    if headers:
        server["headers"] = headers
    team.write_text(
        yaml.safe_dump(
            {
                "servers": [server],
                "default_model": "gemma3:270m",
                "specialists": [{"name": "Analyst", "options": {"num_predict": 12}}],
            }
        )
    )
    return plan, team


def requests_for(sim: SimServer, task_id: str) -> int:
    return sum(f"MARK-{task_id}." in r["prompt"] for r in sim.stats()["requests_log"])


def finished_in(events_file: Path) -> list[str]:
    """Task ids with a journaled succeeded result, as a reader sees the file while it is being written."""
    if not events_file.is_file():
        return []
    done = []
    for line in events_file.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the line being written right now
        if event.get("type") == "task_finished" and event["result"]["status"] == "succeeded":
            done.append(event["result"]["task_id"])
    return done


@pytest.mark.timeout(120)
def test_slow_a_killed_run_resumes_without_asking_a_server_again(sims, tmp_path: Path) -> None:
    """Slow (~30 s): two real `teamorch` processes, each starting its own private Ray."""
    sim = sims(name="box", slots=1, tokens_per_second=10)
    plan, team = write_files(tmp_path, sim)
    runs = tmp_path / "runs"
    run = cli_process(tmp_path, "run", str(plan), "--team", str(team), "--runs-dir", str(runs), "--run-id", "killed")
    events = runs / "killed" / EVENTS_FILE
    deadline = time.monotonic() + 60
    while len(finished_in(events)) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    out, _ = run.communicate(timeout=30)
    killed_after = finished_in(events)
    assert 2 <= len(killed_after) < CHAIN, out  # killed mid-run, not before or after it
    assert out.splitlines()[0] == "Run killed"  # the run id comes first, before Ray starts
    # The killed driver's Ray workers notice their raylet is gone within seconds; until then the coordinator
    # still holds the journal's lock (and may journal a result or two), and `resume` refuses to write beside it.
    released = time.monotonic() + 30
    while RunJournal.open(runs, "killed").state().status == "running" and time.monotonic() < released:
        time.sleep(0.1)
    before = finished_in(events)  # what the first session journaled: none of it may be asked for again
    print(f"lock released {30 - (released - time.monotonic()):.1f}s after the kill; journaled {before}")
    assert len(before) < CHAIN
    in_flight = f"t{len(before) + 1}"

    resume = subprocess.run(
        [sys.executable, "-m", "teamorch.cli", "resume", "killed", "--runs-dir", str(runs), "--json", "r.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert resume.returncode == 0, resume.stdout + resume.stderr

    # The simulator's own log: every task that finished before the kill was requested once, never again.
    assert {t: requests_for(sim, t) for t in before} == dict.fromkeys(before, 1)
    assert all(requests_for(sim, f"t{i}") >= 1 for i in range(len(before) + 1, CHAIN + 1))
    # The task in flight at the kill depended on a journaled result: its new request carried that output.
    journal = RunJournal.open(runs, "killed")
    upstream = journal.finished_results()[before[-1]].output or ""
    asked = [r["prompt"] for r in sim.stats()["requests_log"] if f"MARK-{in_flight}." in r["prompt"]]
    assert upstream.strip() and upstream.strip()[:40] in asked[-1]
    # Its first request, if the kill found it at the box, was dropped when the raylet died (the server actor's
    # watchdog closes its streams), not finished unheard: every task's answer was generated exactly once.
    log = sim.stats()["requests_log"]
    assert [r["completed"] for r in log if f"MARK-{in_flight}." in r["prompt"]] in ([True], [False, True])
    completed = {
        f"t{i}": sum(f"MARK-t{i}." in r["prompt"] and r["completed"] for r in log) for i in range(1, CHAIN + 1)
    }
    assert completed == {f"t{i}": 1 for i in range(1, CHAIN + 1)}

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["success"] and [t["task_id"] for t in report["tasks"]] == [f"t{i}" for i in range(1, CHAIN + 1)]
    sessions = {s["session"]: s["tasks"] for s in report["sessions"]}
    assert sessions[1][: len(before)] == before and set(sessions[2]) == {
        f"t{i}" for i in range(len(before) + 1, CHAIN + 1)
    }
    assert len(report["resumed_at"]) == 1 and journal.state().status == "finished"
    assert "(journaled in session 1)" in resume.stdout and "Sessions (the run was resumed):" in resume.stdout

    # Resuming a finished run prints its report from the journal and asks nobody anything.
    asked_before = sim.stats()["requests"]
    assert cli.main(["resume", "killed", "--runs-dir", str(runs)]) == 0
    assert sim.stats()["requests"] == asked_before


# A server actor's process, with what Ray gives it: RAY_RAYLET_PID in its environment (here, a stand-in process).
SERVER_WORKER = """
import asyncio, sys
from teamorch.actors.server import ModelServer
from teamorch.config import ServerConfig
from teamorch.messages import ChatRequest

server = ModelServer(ServerConfig(name="box", url=sys.argv[1], models=["gemma3:270m"]))
ask = ChatRequest(model="gemma3:270m", messages=[{"role": "user", "content": "MARK-w."}], options={"num_predict": 50})
asyncio.run(server.chat(ask))
print("answered", flush=True)
"""


def test_a_server_actor_drops_its_requests_and_exits_as_soon_as_its_raylet_dies(sims) -> None:
    """Ray's own check would leave the worker up to a second; a request finishing in it is generated twice."""
    sim = sims(name="box", slots=1, tokens_per_second=10)  # the answer takes 5 s
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = subprocess.Popen(
        [sys.executable, "-c", SERVER_WORKER, sim.url],
        env={**os.environ, "RAY_RAYLET_PID": str(raylet.pid)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while sim.stats()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats()["in_flight"] == 1
        raylet.kill()
        killed = time.monotonic()
        out, _ = worker.communicate(timeout=10)
        exited = time.monotonic() - killed
        while sim.stats()["in_flight"] and time.monotonic() - killed < 5:
            time.sleep(0.01)
    finally:
        for process in (raylet, worker):
            process.kill()
            process.wait()
    assert worker.returncode == 1 and "answered" not in out, out
    assert exited < 0.5, f"the worker outlived its raylet by {exited:.2f}s"
    stats = sim.stats()  # the box's own account: the stream was dropped, not finished
    assert (stats["in_flight"], stats["completed"], stats["cancelled"]) == (0, 0, 1)
    assert [r["completed"] for r in stats["requests_log"]] == [False]


SECRET_VAR = "TEAMORCH_TEST_SECRET"
SECRET = "sk-test-9f8e7d6c5b4a39281706"


def test_header_secrets_never_reach_reports_journals_traces_or_the_terminal(
    sims, ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_VAR, SECRET)
    # A misbehaving proxy that echoes the credential back in its answers: the worst case for a leak.
    sim = sims(name="leaky", replies=[{"match": "MARK-t", "reply": f"I saw Authorization: Bearer {SECRET} here"}])
    plan, team = write_files(tmp_path, sim, headers={"Authorization": f"Bearer ${{{SECRET_VAR}}}"})
    runs, report_file, trace_file = tmp_path / "runs", tmp_path / "report.json", tmp_path / "trace.json"
    code = cli.main(
        [
            "run",
            str(plan),
            "--team",
            str(team),
            "--runs-dir",
            str(runs),
            "--run-id",
            "secret-run",
            "--json",
            str(report_file),
            "--trace",
            str(trace_file),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sim.stats()["completed"] == CHAIN  # the run did reach the server, with the header
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {report_file, trace_file, runs / "secret-run" / EVENTS_FILE} <= set(written)
    for path in written:
        assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in captured.out + captured.err
    assert REDACTED in report_file.read_text() and REDACTED in captured.out  # scrubbed, not dropped
    assert f"${{{SECRET_VAR}}}" in (runs / "secret-run" / "team.yaml").read_text()  # the copy keeps the reference
    for path in ray_log_files():
        assert SECRET not in path.read_text(errors="replace"), path


def ray_log_files() -> list[Path]:
    """This Ray session's log files (its workers' stdout/stderr among them)."""
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_logs_dir_path())
    return [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 20_000_000]


@pytest.mark.parametrize(
    ("spec", "cut_after"),
    [
        pytest.param(
            ConsensusSpec(problem="q", experts=["E1", "E2", "E3"], synthesizer="Judge", rounds=2),
            lambda e: isinstance(e, TaskFinished) and e.result.round == 1,
            id="consensus: killed after round 1",
        ),
        pytest.param(
            AutoSpec(problem="fix the bug"), lambda e: isinstance(e, PlanResolved), id="auto: killed after planning"
        ),
    ],
)
def test_a_pattern_run_resumes_from_its_journal(sims, coordinator, tmp_path: Path, spec: Any, cut_after: Any) -> None:
    sim = sims(name="s", slots=3, tokens_per_second=2000)  # the planner asks for 512 tokens
    handle = coordinator(sim_team([(sim, 3)], [{"name": n} for n in ("E1", "E2", "E3", "Judge")]))
    runs = str(tmp_path / "runs")
    raw = spec.model_dump(mode="json")
    whole = api.execute(handle, spec, run_id="p", journal=JournalSpec(runs_dir=runs, plan_raw=raw))
    journal = RunJournal.open(Path(runs), "p")
    assert journal.rebuild_report() == whole  # the journal is the report's source of truth
    # The driver "dies" right after the cut: everything the journal holds past it never happened.
    lines = journal.path.read_text().splitlines(keepends=True)
    cut = max(i for i, e in enumerate(journal.events) if cut_after(e))
    journal.path.write_text("".join(lines[: cut + 1]))
    kept = RunJournal.open(Path(runs), "p").finished_results()
    asked = sim.stats()["requests"]

    resumed = api.execute(handle, spec, run_id="p", journal=JournalSpec(runs_dir=runs, resume=True))

    assert [t.task_id for t in resumed.tasks] == [t.task_id for t in whole.tasks] and resumed.success
    rerun = [t.task_id for t in resumed.tasks if t.task_id not in kept]
    assert sim.stats()["requests"] - asked == len(rerun)  # no journaled task and no planner call asked again
    assert {t.task_id: t for t in resumed.tasks if t.task_id in kept} == kept  # taken as journaled
    assert [(s.session, sorted(s.tasks)) for s in resumed.sessions][1:] == [(2, sorted(rerun))]
    assert RunJournal.open(Path(runs), "p").rebuild_report() == resumed
