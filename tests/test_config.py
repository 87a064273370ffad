"""Team and plan files: validation that names file and field, before anything starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from teamorch.cli import main
from teamorch.config import TeamConfig, load_team, read_yaml
from teamorch.errors import ConfigError, PlanError
from teamorch.plans import load_plan, read_plan_raw

PLAN: dict[str, Any] = {
    "problem": "p",
    "team": {"specialists": [{"name": "A"}, {"name": "B"}]},
    "tasks": [{"task_id": "one", "specialist": "A"}],
}


def plan_with(**changes: Any) -> dict[str, Any]:
    """PLAN with top-level keys replaced (a fresh copy, so tests cannot leak into each other)."""
    return {**copy.deepcopy(PLAN), **changes}


def write(tmp_path: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_no_servers_means_two_embedded_defaults(tmp_path: Path) -> None:
    plan, team = load_plan(write(tmp_path, "p.yaml", PLAN))
    assert [(s.name, s.protocol) for s in team.servers] == [("ollama01", "embedded"), ("ollama02", "embedded")]
    assert {s.model for s in team.specialists} == {"gemma3:270m"}
    assert plan.tasks[0].specialist == "A"


def test_model_missing_from_every_server_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_plan(
            write(tmp_path, "p.yaml", plan_with(team={"specialists": [{"name": "A"}, {"name": "B", "model": "other"}]}))
        )
    assert "specialist 'B' needs model 'other'" in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'p.yaml'}: specialists[1].model")


def test_unknown_specialist_names_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as err:
        load_plan(write(tmp_path, "p.yaml", plan_with(tasks=[{"task_id": "one", "specialist": "Nobody"}])))
    assert "unknown specialist 'Nobody'; the team has: A, B" in str(err.value)
    assert err.value.field == "tasks[0].specialist"
    assert err.value.file == str(tmp_path / "p.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path, "p.yaml", "problem: p\ntasks: [\n  - {task_id: x"))
    assert "invalid YAML" in str(err.value)
    assert "line " in (err.value.field or "")


def test_validation_error_names_nested_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_team(write(tmp_path, "t.yaml", {"servers": [{"name": "a", "url": "http://x:1", "slots": 0}]}))
    assert err.value.field == "servers[0].slots"
    assert "greater than or equal to 1" in str(err.value)


def test_network_server_needs_url() -> None:
    with pytest.raises(ValueError, match="needs a url"):
        TeamConfig.model_validate({"servers": [{"name": "a", "protocol": "ollama"}]})


def test_env_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = {
        "name": "a",
        "url": "${OLLAMA_URL:-http://localhost:11434}",
        "headers": {"Authorization": "Bearer ${TOKEN}"},
    }
    monkeypatch.setenv("TOKEN", "s3cret")
    team = load_team(write(tmp_path, "t.yaml", {"servers": [server]}))
    assert team.servers[0].url == "http://localhost:11434"
    assert team.servers[0].headers == {"Authorization": "Bearer s3cret"}
    monkeypatch.delenv("TOKEN")
    with pytest.raises(ConfigError) as err:
        load_team(tmp_path / "t.yaml")
    assert "environment variable TOKEN is not set" in str(err.value)
    assert err.value.field == "servers[0].headers.Authorization"


def test_team_file_replaces_fleet_and_overrides_specialists(tmp_path: Path) -> None:
    team = {
        "servers": [{"name": "gpu1", "url": "http://127.0.0.1:9", "models": ["llama3"]}],
        "default_model": "llama3",
        "specialists": [{"name": "B", "system_prompt": "overridden"}],
    }
    team_file = write(tmp_path, "team.yaml", team)
    plan_file = write(tmp_path, "p.yaml", PLAN)
    _, team = load_plan(plan_file, team_file)
    assert [s.name for s in team.servers] == ["gpu1"]
    assert team.specialist("A").model == "llama3"
    assert team.specialist("B").system_prompt == "overridden"


def test_context_files_are_inlined_relative_to_plan(tmp_path: Path) -> None:
    write(tmp_path, "code.py", "print('hi')\n")
    plan, _ = load_plan(write(tmp_path, "p.yaml", plan_with(context_files={"code": "code.py"})))
    assert plan.context["code"] == "print('hi')\n"


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", PLAN)
    assert main(["validate", str(good)]) == 0
    cycle = [
        {"task_id": "one", "specialist": "A", "depends_on": ["two"]},
        {"task_id": "two", "specialist": "A", "depends_on": ["one"]},
    ]
    assert main(["validate", str(write(tmp_path, "bad.yaml", plan_with(tasks=cycle)))]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "dependency cycle" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize(
    "strategy",
    [
        "no_such_module_teamorch_xyz:merge",  # the module does not import
        "tests.test_synthesis:no_such_function",  # the module has no such attribute
        "majority_vote",  # neither built in nor a dotted path
    ],
)
@pytest.mark.parametrize("shape", ["tasks", "pattern"])
def test_validate_rejects_a_synthesis_strategy_that_does_not_load(
    strategy: str, shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shape == "tasks":
        data = plan_with(synthesis_strategy=strategy)
    else:
        data = {**plan_with(pattern="parallel_analysis", specialists=["A", "B"]), "synthesis_strategy": strategy}
        del data["tasks"]
    path = write(tmp_path, "typo.yaml", data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: synthesis_strategy:" in err and repr(strategy) in err


def test_validate_accepts_an_importable_custom_strategy(tmp_path: Path) -> None:
    assert (
        main(
            ["validate", str(write(tmp_path, "ok.yaml", plan_with(synthesis_strategy="tests.test_synthesis:my_func")))]
        )
        == 0
    )


def test_run_rejects_a_strategy_typo_before_any_model_call(
    sims, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAMORCH_RUNS_DIR", str(tmp_path / "runs"))
    server = sims(name="s")
    team = {
        "servers": [{"name": "s", "url": server.url}],
        "default_model": "gemma3:270m",
        "specialists": [{"name": "A"}],
    }
    path = write(tmp_path, "typo.yaml", plan_with(team=team, synthesis_strategy="tests.test_synthesis:my_fun"))
    assert main(["run", str(path)]) == 2
    assert "synthesis_strategy" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


def test_shipped_scenarios_validate() -> None:
    from teamorch.plans import expand

    paths = sorted(Path(__file__).parents[1].joinpath("scenarios").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        runnable, _team = load_plan(path)
        assert expand(runnable).tasks, path


def test_the_raw_plan_is_self_contained_and_keeps_env_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAMORCH_TEST_RAW_TOKEN", "sk-raw-123456")
    write(tmp_path, "notes.md", "the notes")
    (tmp_path / "src").mkdir()
    write(tmp_path, "src/a.py", "A = 1\n")
    team = {"servers": [{"name": "s", "url": "http://127.0.0.1:9", "headers": {"X-Key": "${TEAMORCH_TEST_RAW_TOKEN}"}}]}
    data = {
        "pattern": "divide_and_conquer",
        "problem": "p",
        "specialists": ["A"],
        "item_files": ["src/*.py"],
        "context_files": {"notes": "notes.md"},
        "team": {**team, "default_model": "m", "specialists": [{"name": "A"}]},
    }
    path = write(tmp_path, "plan.yaml", data)
    raw = read_plan_raw(path)
    assert raw["team"]["servers"][0]["headers"] == {"X-Key": "${TEAMORCH_TEST_RAW_TOKEN}"}
    assert raw["context"] == {"notes": "the notes"} and raw["items"] == [{"name": "src/a.py", "content": "A = 1\n"}]
    assert "item_files" not in raw and "context_files" not in raw
    assert read_yaml(path, expand_env=False)["team"] == data["team"]
    # A run directory's copy loads on its own, far from the files it was made from, to the same runnable.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copied = write(elsewhere, "plan.yaml", raw)
    assert load_plan(copied)[0] == load_plan(path)[0]
    assert read_plan_raw(copied) == raw
