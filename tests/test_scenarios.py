"""The shipped scenarios: valid, runnable on a user's team file, and (multi_file) correct about its cycles.

Here the user's "real" servers are Ollama-API simulators (teamorch.sim, real HTTP on loopback).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scenarios.multi_file import SOURCE, find_cycles, import_graph
from teamorch import api
from teamorch.cli import main

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
    team_file.write_text(
        f"servers:\n  - {{name: ollama01, url: '{one.url}', slots: 2}}\n  - {{name: ollama02, url: '{two.url}', slots: 2}}\n"
        "default_model: llama3.1:8b\n"
    )
    runnable, team = api.load_plan(path, team_file)
    assert [s.name for s in team.servers] == ["ollama01", "ollama02"]
    report = api.run_plan(coordinator(team), runnable)
    assert report.success, [(t.task_id, t.error) for t in report.tasks]
    assert one.stats()["completed"] + two.stats()["completed"] == len(report.tasks)


def test_cli_run_writes_json_and_exit_code(
    sims, ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import ray

    good = sims(name="good")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"problem: p\nteam:\n  servers: [{{name: good, url: '{good.url}'}}]\n  default_model: gemma3:270m\n"
        "  specialists: [{name: A}, {name: B, model: gone}]\n"
        "tasks:\n  - {task_id: a, specialist: A}\n"
    )
    out = tmp_path / "report.json"
    address = ray.get_runtime_context().gcs_address
    assert main(["run", str(plan), "--json", str(out), "--address", address]) == 0
    report = json.loads(out.read_text())
    assert report["success"] is True and report["tasks"][0]["server"] == "good"
    printed = capsys.readouterr().out
    assert "SUCCESS" in printed and "parallel efficiency" in printed
    # A task whose model no server has: the run completes, fails its criteria, exit code 1, error names the model.
    plan.write_text(plan.read_text() + "  - {task_id: b, specialist: B}\n")
    assert main(["run", str(plan), "--json", str(out), "--address", address]) == 1
    failed = {t["task_id"]: t for t in json.loads(out.read_text())["tasks"]}
    assert failed["a"]["status"] == "succeeded" and failed["b"]["status"] == "failed"
    assert "gone" in failed["b"]["error"]
