"""The shipped scenarios: valid, runnable on a user's team file, and (multi_file) correct about its cycles.

Here the user's "real" servers are Ollama-API simulators (teamorch.sim, real HTTP on loopback).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from teamorch import api
from teamorch.cli import main
from teamorch.plans import load_plan
from teamorch.scenarios.multi_file import SOURCE, find_cycles, import_graph

SCENARIOS = sorted(Path(__file__).parents[1].joinpath("scenarios").glob("*.yaml"))


def test_cycles_computed_from_the_files() -> None:
    assert find_cycles(import_graph()) == [["billing", "notify", "orders"], ["models", "pricing"]]


@pytest.mark.parametrize("module", ["shop.orders", "shop.models"])
def test_the_cycles_are_real_import_errors(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=SOURCE.parent, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "partially initialized module" in proc.stderr


def test_find_cycles_on_overlapping_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b"], ["a", "b", "c"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_runs_on_a_team_file(path: Path, sims, coordinator, tmp_path: Path) -> None:
    one, two = (
        sims(name="ollama01", slots=2, models=["llama3.1:8b"], tokens_per_second=2000),
        sims(name="ollama02", slots=2, models=["llama3.1:8b"], tokens_per_second=2000),
    )
    team_file = tmp_path / "team.yaml"
    servers = [{"name": "ollama01", "url": one.url, "slots": 2}, {"name": "ollama02", "url": two.url, "slots": 2}]
    team_file.write_text(yaml.safe_dump({"servers": servers, "default_model": "llama3.1:8b"}))
    runnable, team = load_plan(path, team_file)
    assert [s.name for s in team.servers] == ["ollama01", "ollama02"]
    report = api.execute(coordinator(team), runnable)
    assert report.success, [(t.task_id, t.error) for t in report.tasks]
    logs = [entry for sim in (one, two) for entry in sim.stats()["requests_log"]]
    probes = sum(1 for entry in logs if entry["prompt"].startswith("Speed probe for "))
    assert probes == 2  # `measure_first`: each server answered one speed probe before the run's first task
    assert one.stats()["completed"] + two.stats()["completed"] == len(report.tasks) + probes


def test_cli_run_writes_json_and_exit_code(
    sims, ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import ray

    good = sims(name="good")
    plan = tmp_path / "plan.yaml"
    team = {
        "servers": [{"name": "good", "url": good.url}],
        "default_model": "gemma3:270m",
        "specialists": [{"name": "A"}, {"name": "B", "model": "gone"}],
    }
    data = {"problem": "p", "team": team, "tasks": [{"task_id": "a", "specialist": "A"}]}
    plan.write_text(yaml.safe_dump(data))
    out = tmp_path / "report.json"
    monkeypatch.setenv("TEAMORCH_RUNS_DIR", str(tmp_path / "runs"))
    address = ray.get_runtime_context().gcs_address
    assert main(["run", str(plan), "--json", str(out), "--address", address]) == 0
    report = json.loads(out.read_text())
    assert report["success"] is True and report["tasks"][0]["server"] == "good"
    printed = capsys.readouterr().out
    assert "SUCCESS" in printed and "parallel efficiency" in printed
    # A task whose model no server has: the run completes, fails its criteria, exit code 1, error names the model.
    data["tasks"].append({"task_id": "b", "specialist": "B"})
    plan.write_text(yaml.safe_dump(data))
    assert main(["run", str(plan), "--json", str(out), "--address", address]) == 1
    failed = {t["task_id"]: t for t in json.loads(out.read_text())["tasks"]}
    assert failed["a"]["status"] == "succeeded" and failed["b"]["status"] == "failed"
    assert "gone" in failed["b"]["error"]


def _as_from_a_terminal() -> None:
    """The CLI starts with Ctrl-C delivered and handled, as from a shell prompt, whatever this test process
    inherited or set (an ignored or blocked SIGINT passes to children across exec; in a full `make test` the
    CLI once ran to its end after SIGINT, and a shell's background job ignores SIGINT by design)."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cancels_in_flight_requests_and_keeps_results(sims, ray_cluster, tmp_path: Path) -> None:
    import json
    import os
    import signal
    import time

    import ray

    quick = sims(name="quick", tokens_per_second=2000)
    slow = sims(name="slow", tokens_per_second=2)
    plan = tmp_path / "plan.yaml"
    team = {
        "servers": [{"name": "quick", "url": quick.url}, {"name": "slow", "url": slow.url}],
        "default_model": "gemma3:270m",
        "specialists": [{"name": "A", "options": {"num_predict": 40}}],
        "balancer": {"measure_first": False},  # the slow box's speed probe would be the request in flight
    }
    tasks = [
        {"task_id": "done_soon", "specialist": "A", "server": "quick"},
        {"task_id": "forever", "specialist": "A", "server": "slow"},
    ]
    plan.write_text(yaml.safe_dump({"problem": "p", "team": team, "tasks": tasks}))
    out = tmp_path / "partial.json"
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "teamorch.cli", "run", str(plan), "--json", str(out), "--run-id", "ctrl-c"]
    cmd += ["--address", ray.get_runtime_context().gcs_address, "--runs-dir", str(runs)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
        preexec_fn=_as_from_a_terminal,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and slow.stats()["in_flight"] == 0:
        time.sleep(0.1)
    assert slow.stats()["in_flight"] == 1, (
        proc.stderr.read() if proc.poll() is not None else "slow request never started"
    )
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + err
    partial = {t["task_id"]: t for t in json.loads(out.read_text())["tasks"]}
    assert partial["done_soon"]["status"] == "succeeded"
    assert partial.get("forever", {}).get("status") in (None, "cancelled")
    assert slow.stats()["cancelled"] == 1 and slow.stats()["completed"] == 0
    # The journal took the cancellation down too: an interrupted run, its finished result kept for a resume.
    from teamorch.journal import RunJournal

    journal = RunJournal.open(runs, "ctrl-c")
    assert journal.state().status == "interrupted" and set(journal.finished_results()) == {"done_soon"}
    assert "teamorch resume ctrl-c" in err
