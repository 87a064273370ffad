"""Running on a Ray cluster: joining with token authentication, placement (cluster.yaml: test_cluster_yaml.py).

Tests that need a Ray of their own run it in a subprocess (a `ray start --head`, or a
`ray.cluster_utils.Cluster`), never in the pytest process: that one may hold the session's local Ray
(`ray_cluster` in conftest.py), and a process joins one cluster only. Each subprocess gets its own
RAY_TMPDIR, so `address="auto"` and the `ray_current_cluster` file of other Ray instances on the
machine are out of reach.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from teamorch.errors import TeamorchError

REPO = Path(__file__).parents[1]


@contextmanager
def short_tmpdir() -> Iterator[str]:
    """A RAY_TMPDIR short enough for Ray's Unix socket paths (107 bytes), unlike pytest's tmp_path."""
    path = tempfile.mkdtemp(prefix="tt", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ray_env(tmpdir: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, "RAY_TMPDIR": tmpdir, "TEAMORCH_HOME": str(home), **extra}


def python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------ joining, no cluster needed


def test_nothing_listening_fails_at_once_with_what_to_check() -> None:
    from teamorch.cluster import authenticate

    started = time.monotonic()
    with pytest.raises(TeamorchError, match=r"nothing answers at 127\.0\.0\.1:1 .*ray start --head"):
        authenticate("127.0.0.1:1")
    with pytest.raises(TeamorchError, match=r"nothing answers at ray://127\.0\.0\.1:1 "):
        authenticate("ray://127.0.0.1:1")
    assert time.monotonic() - started < 2


def test_auto_means_ray_address_or_a_live_ray_start_never_a_stale_one(monkeypatch, tmp_path) -> None:
    from teamorch.cluster import find_cluster, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a `ray start` long gone
    assert find_cluster() is None
    with pytest.raises(TeamorchError, match="no running Ray cluster found"):
        resolve_address("auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address("auto") == "10.0.0.5:6379"
    assert resolve_address("ray://10.0.0.7:10001") == "ray://10.0.0.7:10001"


# ------------------------------------------------------------------------------ a head with token auth


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A `ray start --head` with token authentication (teamorch's private head), in its own RAY_TMPDIR."""
    with short_tmpdir() as tmpdir:
        env = ray_env(tmpdir, tmp_path_factory.mktemp("home"))
        start = "from teamorch.cluster import start_head; import dataclasses, json; "
        start += "print(json.dumps(dataclasses.asdict(start_head())))"
        done = python(start, env)
        assert done.returncode == 0, done.stderr
        info = {**json.loads(done.stdout.splitlines()[-1]), "env": env}
        yield info
        stopped = python("from teamorch.cluster import stop_head; print(stop_head().pid)", env)
        assert stopped.returncode == 0 and int(stopped.stdout.split()[-1]) == info["pid"], stopped.stderr


JOIN = """
import sys, time
started = time.monotonic()
import ray
from teamorch.cluster import connect
from teamorch.errors import TeamorchError
try:
    connect(sys.argv[1], "join-test")
except TeamorchError as exc:
    print(f"ERROR {time.monotonic() - started:.1f} {exc}")
    sys.exit(3)

@ray.remote(num_cpus=0)
class Echo:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

print("JOINED", ray.get(Echo.remote().node.remote(), timeout=60))
"""


@pytest.mark.parametrize("kind", ["gcs", "client"])
def test_a_driver_joins_a_token_cluster_with_the_token_and_fails_fast_without(head, tmp_path, kind) -> None:
    address = head["address"] if kind == "gcs" else head["client_address"]
    env = head["env"]
    joined = python(JOIN.replace("sys.argv[1]", repr(address)), env)
    assert joined.returncode == 0 and "JOINED" in joined.stdout, joined.stdout + joined.stderr

    no_token = python(JOIN.replace("sys.argv[1]", repr(address)), {**env, "HOME": str(tmp_path)})
    assert no_token.returncode == 3, no_token.stdout + no_token.stderr
    seconds, message = no_token.stdout.split(" ", 2)[1:]
    assert float(seconds) < 5  # Ray alone retries for 20 s (GCS) or 30 s (Ray Client), then says nothing useful
    assert "requires token authentication and this machine has no token" in message
    assert "~/.ray/auth_token" in message and "RAY_AUTH_TOKEN" in message

    wrong = python(JOIN.replace("sys.argv[1]", repr(address)), {**env, "RAY_AUTH_TOKEN": "not-this-clusters"})
    assert wrong.returncode == 3 and "rejected this machine's token" in wrong.stdout, wrong.stdout + wrong.stderr


def test_a_driver_without_auth_joins_a_cluster_without_auth(tmp_path) -> None:
    """The reverse case: token mode must stay off, or the driver's actors die before they run (measured)."""
    with short_tmpdir() as tmpdir:
        env = ray_env(tmpdir, tmp_path, RAY_AUTH_MODE="disabled")
        head = python("from teamorch.cluster import start_head; print(start_head().address)", env)
        assert head.returncode == 0, head.stderr
        address = head.stdout.split()[-1]
        try:
            joined = python(JOIN.replace("sys.argv[1]", repr(address)), ray_env(tmpdir, tmp_path))  # a token is here
            assert joined.returncode == 0 and "JOINED" in joined.stdout, joined.stdout + joined.stderr
        finally:
            python("from teamorch.cluster import stop_head; stop_head()", env)


# ------------------------------------------------------------------------------ placement on a real cluster


def placement_run() -> None:
    """Runs in its own process: a head and two worker nodes, each worker next to one 'Ollama box'.

    Prints one JSON line: the nodes, where each actor runs, a plan across both boxes, and a plan
    during which box 2's node is removed.
    """
    import ray
    from ray.cluster_utils import Cluster

    from teamorch import api
    from teamorch.cluster import connect
    from teamorch.config import TeamConfig
    from teamorch.messages import ExecutionWave, OrchestrationPlan, Task
    from teamorch.sim import SimConfig, SimServer

    boxes = [SimServer(SimConfig(name=f"box{i}", tokens_per_second=20)).start_in_thread() for i in (1, 2)]
    fast_failure_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_failure_detection})
    workers = [cluster.add_node(num_cpus=1, resources={f"ollama_box_{i}": 1}) for i in (1, 2)]
    cluster.wait_for_nodes()
    connect(cluster.address, "placement")
    team = TeamConfig.model_validate(
        {
            "servers": [
                {"name": b.config.name, "url": b.url, "ray_resources": {f"ollama_box_{i}": 1}}
                for i, b in enumerate(boxes, 1)
            ],
            "default_model": "gemma3:270m",
            "specialists": [{"name": "Analyst"}, {"name": "Reviewer"}],
        }
    )
    coordinator = api.start_coordinator(team)

    def plan(n: int) -> OrchestrationPlan:
        tasks = [
            Task(task_id=f"t{i}", specialist=("Analyst", "Reviewer")[i % 2], input_data={"i": i}) for i in range(n)
        ]
        return OrchestrationPlan(problem="placement", waves=[ExecutionWave(wave_number=1, tasks=tasks)])

    across = ray.get(coordinator.run_plan.remote(plan(4), "across"))
    actors = [  # after a run: every specialist it used has started
        (r["ActorClassName"], r["Address"]["NodeID"])
        for r in ray._private.state.actors().values()
        if r["State"] == "ALIVE"
    ]
    during = coordinator.run_plan.remote(plan(6), "node-loss")
    while boxes[1].stats()["in_flight"] == 0:  # box 2 is answering a request: now its node goes
        time.sleep(0.01)
    cluster.remove_node(workers[1])
    lost = ray.get(during)
    out = {
        "head": cluster.head_node.node_id,
        "workers": [w.node_id for w in workers],
        "actors": actors,
        "across": across.model_dump(mode="json"),
        "node_loss": lost.model_dump(mode="json"),
    }
    print("RESULT " + json.dumps(out))


def test_servers_run_on_their_boxes_nodes_and_a_lost_node_fails_over(tmp_path) -> None:
    started = time.monotonic()
    with short_tmpdir() as tmpdir:
        done = python("from tests.test_cluster import placement_run; placement_run()", ray_env(tmpdir, tmp_path), 120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(line.removeprefix("RESULT "))
    head, (node1, node2) = out["head"], out["workers"]
    nodes: dict[str, list[str]] = {}
    for cls, node in out["actors"]:
        nodes.setdefault(cls, []).append(node)
    # Each server actor on the node that advertises its box's resource (one node each: both pinned right).
    assert sorted(nodes["ModelServer"]) == sorted([node1, node2])
    # The control plane stays on the head, so losing a box's node cannot take the team with it.
    assert set(nodes["Coordinator"] + nodes["LoadBalancer"] + nodes["Specialist"]) == {head}

    across = out["across"]
    assert across["success"] and {t["server"] for t in across["tasks"]} == {"box1", "box2"}

    lost = out["node_loss"]
    assert lost["success"], lost
    assert all(t["server"] == "box1" for t in lost["tasks"])  # every task finished on the surviving box
    failed_over = [t for t in lost["tasks"] if len(t["attempts"]) > 1]
    # The lost box's attempts: its actor "restarting" (busy) for a grace period at most, or unreachable; then
    # the balancer takes it out of rotation (or the task rules it out) and the task finishes on box1.
    assert failed_over
    for t in failed_over:
        before = t["attempts"][:-1]
        assert {a["server"] for a in before} == {"box2"}, t["attempts"]
        assert {a["outcome"] for a in before} <= {"busy", "unreachable"}, t["attempts"]
    assert time.monotonic() - started < 60
