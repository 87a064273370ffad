from __future__ import annotations

from pathlib import Path

import pytest

from teamorch.api import load_plan
from teamorch.cli import main
from teamorch.config import TeamConfig, load_team
from teamorch.errors import ConfigError, PlanError

PLAN = """
problem: p
team:
  specialists:
    - {name: A}
    - {name: B, model: other}
tasks:
  - {task_id: one, specialist: A}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_servers_means_two_embedded_defaults(tmp_path: Path) -> None:
    plan, team = load_plan(write(tmp_path, "p.yaml", PLAN.replace(", model: other", "")))
    assert [(s.name, s.protocol) for s in team.servers] == [("ollama01", "embedded"), ("ollama02", "embedded")]
    assert {s.model for s in team.specialists} == {"gemma3:270m"}
    assert plan.tasks[0].specialist == "A"


def test_model_missing_from_every_server_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path, "p.yaml", PLAN))
    assert "specialist 'B' needs model 'other'" in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'p.yaml'}: specialists[1].model")


def test_unknown_specialist_names_file_and_field(tmp_path: Path) -> None:
    text = PLAN.replace(", model: other", "").replace("specialist: A", "specialist: Nobody")
    with pytest.raises(PlanError) as err:
        load_plan(write(tmp_path, "p.yaml", text))
    assert "unknown specialist 'Nobody'; the team has: A, B" in str(err.value)
    assert err.value.field == "tasks[0].specialist"
    assert err.value.file == str(tmp_path / "p.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path, "p.yaml", "problem: p\ntasks: [\n  - {task_id: x"))
    assert "invalid YAML" in str(err.value)
    assert "line " in (err.value.field or "")


def test_validation_error_names_nested_field(tmp_path: Path) -> None:
    text = "servers:\n  - {name: a, url: http://x:1, slots: 0}\n"
    with pytest.raises(ConfigError) as err:
        load_team(write(tmp_path, "t.yaml", text))
    assert err.value.field == "servers[0].slots"
    assert "greater than or equal to 1" in str(err.value)


def test_network_server_needs_url() -> None:
    with pytest.raises(ValueError, match="needs a url"):
        TeamConfig.model_validate({"servers": [{"name": "a", "protocol": "ollama"}]})


def test_env_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "servers:\n  - name: a\n    url: ${OLLAMA_URL:-http://localhost:11434}\n    headers:\n      Authorization: Bearer ${TOKEN}\n"
    monkeypatch.setenv("TOKEN", "s3cret")
    team = load_team(write(tmp_path, "t.yaml", text))
    assert team.servers[0].url == "http://localhost:11434"
    assert team.servers[0].headers == {"Authorization": "Bearer s3cret"}
    monkeypatch.delenv("TOKEN")
    with pytest.raises(ConfigError) as err:
        load_team(tmp_path / "t.yaml")
    assert "environment variable TOKEN is not set" in str(err.value)
    assert err.value.field == "servers[0].headers.Authorization"


def test_team_file_replaces_fleet_and_overrides_specialists(tmp_path: Path) -> None:
    team_file = write(
        tmp_path,
        "team.yaml",
        "servers:\n  - {name: gpu1, url: 'http://127.0.0.1:9', models: [llama3]}\ndefault_model: llama3\n"
        "specialists:\n  - {name: B, system_prompt: overridden}\n",
    )
    plan_file = write(tmp_path, "p.yaml", PLAN.replace(", model: other", ""))
    _, team = load_plan(plan_file, team_file)
    assert [s.name for s in team.servers] == ["gpu1"]
    assert team.specialist("A").model == "llama3"
    assert team.specialist("B").system_prompt == "overridden"


def test_context_files_are_inlined_relative_to_plan(tmp_path: Path) -> None:
    write(tmp_path, "code.py", "print('hi')\n")
    text = PLAN.replace(", model: other", "") + "context_files: {code: code.py}\n"
    plan, _ = load_plan(write(tmp_path, "p.yaml", text))
    assert plan.context["code"] == "print('hi')\n"


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", PLAN.replace(", model: other", ""))
    assert main(["validate", str(good)]) == 0
    cycle = PLAN.replace(", model: other", "").replace(
        "  - {task_id: one, specialist: A}",
        "  - {task_id: one, specialist: A, depends_on: [two]}\n  - {task_id: two, specialist: A, depends_on: [one]}",
    )
    assert main(["validate", str(write(tmp_path, "bad.yaml", cycle))]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "dependency cycle" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_scenarios_validate() -> None:
    from teamorch.api import expand

    paths = sorted(Path(__file__).parents[1].joinpath("scenarios").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        runnable, _team = load_plan(path)
        assert expand(runnable).tasks, path


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(__file__).parents[1].joinpath("cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises on schema violations
    assert prepared["provider"]["type"] == "local"
    assert any("make install" in c for c in prepared["setup_commands"])
