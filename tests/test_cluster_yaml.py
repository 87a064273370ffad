"""`cluster.yaml` (the `ray up` path) checked with Ray's own tools, and against the README's walkthrough.

There are no SSH hosts here, so `ray up` itself is never run: what can be checked without one is that
Ray's cluster launcher accepts the file (its validator and `ray-schema.json`), that every start command
parses with `ray start`'s own option parser, and that the README tells the same story (the same ports
pinned, the token, the resource a team pins its servers to).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).parents[1]
PORT_OPTIONS = {  # the `ray start` options that choose a port a firewall must know about
    "port",
    "ray_client_server_port",
    "dashboard_port",
    "node_manager_port",
    "object_manager_port",
    "dashboard_agent_listen_port",
    "dashboard_agent_grpc_port",
    "runtime_env_agent_port",
    "metrics_export_port",
    "min_worker_port",
    "max_worker_port",
}
HEAD_ONLY = {"port", "ray_client_server_port", "dashboard_port"}


def cluster() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def ray_start(command: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The options a `... ray start ...` shell command passes, as `ray start` itself parses them, and the
    environment it sets; the shell's `$RAY_HEAD_IP` and `$(hostname -s)` stand for a head and a box."""
    from ray.scripts.scripts import start

    shell = command.replace("$RAY_HEAD_IP", "10.0.0.1").replace("$(hostname -s)", "gpu1")
    words = shlex.split(shell.split(";")[-1])
    at = next(i for i, w in enumerate(words) if w.endswith("/ray") or w == "ray")
    assert words[at + 1] == "start", command
    env = dict(w.split("=", 1) for w in words[:at])
    context = start.make_context("start", words[at + 2 :])  # unknown options and bad values raise here
    given = {k: v for k, v in context.params.items() if context.get_parameter_source(k).name == "COMMANDLINE"}
    return given, env


def starts(config: dict[str, Any], key: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    return [ray_start(c) for c in config[key] if re.search(r"\bray start\b", c)]


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### On a real cluster") :]
    return section[: section.index("\n## ")]


def test_ray_accepts_cluster_yaml_and_rejects_a_broken_copy() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(cluster())
    validate_config(config)  # Ray's ray-schema.json and its own checks
    assert config["provider"]["type"] == "local" and config["max_workers"] == len(config["provider"]["worker_ips"])
    assert any("make install" in c for c in config["setup_commands"])  # every node installs what the README does
    broken = copy.deepcopy(config)
    broken["head_start_ray_commands"] = "ray start --head"  # a string where Ray wants a list of commands
    with pytest.raises(jsonschema.ValidationError, match=r"'ray start --head' is not of type 'array'"):
        validate_config(broken)


def test_every_node_pins_the_ports_the_readme_tells_a_firewall_to_open() -> None:
    config = cluster()
    ((head, head_env),) = starts(config, "head_start_ray_commands")
    ((worker, worker_env),) = starts(config, "worker_start_ray_commands")
    assert head["head"] and worker["address"] == "10.0.0.1:6379"
    assert set(head) >= PORT_OPTIONS and set(worker) >= PORT_OPTIONS - HEAD_ONLY
    assert {k: worker[k] for k in PORT_OPTIONS - HEAD_ONLY} == {k: head[k] for k in PORT_OPTIONS - HEAD_ONLY}
    section = readme_section()
    table = {row.split("|")[1].strip() for row in section.splitlines() if row.startswith("| ")}
    for option in PORT_OPTIONS - {"min_worker_port", "max_worker_port"}:
        assert str(head[option]) in table, f"README's port table lacks {option}={head[option]}"
    assert f"{head['min_worker_port']}–{head['max_worker_port']}" in table
    # The by-hand commands in the README are the same commands.
    manual = [ray_start(line) for line in section.splitlines() if line.lstrip().startswith(("ray start", "RAY_"))]
    assert [m[0].get("head", False) for m in manual] == [True, False]
    assert {k: v for k, v in manual[0][0].items() if k in PORT_OPTIONS} == {k: head[k] for k in PORT_OPTIONS}
    assert {k: manual[1][0][k] for k in PORT_OPTIONS - HEAD_ONLY} == {k: worker[k] for k in PORT_OPTIONS - HEAD_ONLY}
    assert worker_env == manual[1][1] == {"RAY_AUTH_MODE": "token"} and not head_env


def test_workers_advertise_the_resource_the_readme_team_pins_its_servers_to() -> None:
    config = cluster()
    ((worker, _),) = starts(config, "worker_start_ray_commands")
    assert json.loads(worker["resources"]) == {"ollama_box_gpu1": 1}  # named after the host: gpu1 here
    section = readme_section()
    assert "`ollama_box_<its short hostname>` (e.g. `ollama_box_gpu1`)" in section
    assert "ray_resources: {ollama_box_gpu1: 1}" in section
    manual_worker = next(ray_start(line)[0] for line in section.splitlines() if line.startswith("RAY_AUTH_MODE"))
    (box,) = json.loads(manual_worker["resources"])
    assert f"ray_resources: {{{box}: 1}}" in section  # the by-hand team pins to what the by-hand worker offers


def test_the_token_reaches_every_node_as_the_readme_says() -> None:
    config = cluster()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    section = readme_section()
    assert "ray get-auth-token --generate" in section and "~/.ray/auth_token" in section
    assert "schema-checked,\nnot exercised here" in section
