"""A team that stays up (`teamorch up | status | down`), shared by processes, actors and `ray://` clients.

Everything runs as users run it: the `teamorch` command and Python processes of their own, against a
private Ray head that `teamorch up` starts (in its own RAY_TMPDIR, so no other Ray on the machine is
found) and `teamorch down --stop-ray` stops. The simulator in this process stands in for Ollama; its
own counters are the truth about what reached the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from teamorch.cli_team import default_team, team_from, team_raw_from
from teamorch.config import interpolate, parse_team
from teamorch.sim import SimConfig, SimServer
from tests.test_cluster import REPO, python, ray_env, short_tmpdir

TEAMORCH = str(Path(sys.executable).with_name("teamorch"))
SPECIALISTS = ["Syntax Analyst", "Whitespace Analyst", "Architect"]


@dataclass
class Team:
    name: str
    env: dict[str, str]
    home: Path
    team_file: Path
    sim: SimServer

    def head(self) -> dict[str, str | int]:
        return json.loads((self.home / "head.json").read_text())


def teamorch(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TEAMORCH, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def write_plan(path: Path, n: int, prefix: str = "t", num_predict: int = 20) -> Path:
    tasks = [
        {
            "task_id": f"{prefix}{i}",
            "specialist": SPECIALISTS[i % 2],
            "input_data": {"i": i},
            "options": {"num_predict": num_predict},
        }
        for i in range(n)
    ]
    path.write_text(yaml.safe_dump({"problem": "Analyze main.py", "waves": [{"wave_number": 1, "tasks": tasks}]}))
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """`teamorch up` with no Ray running: it starts a private head and leaves team 'it' on it."""
    home = tmp_path_factory.mktemp("home")
    sim = SimServer(SimConfig(name="box", slots=4, tokens_per_second=40)).start_in_thread()
    team_file = home / "team.yaml"
    team_file.write_text(
        yaml.safe_dump(
            {
                "servers": [{"name": "box", "url": sim.url, "slots": 2}],  # the simulator would take 4
                "default_model": "gemma3:270m",
                "specialists": [{"name": n} for n in SPECIALISTS],
            }
        )
    )
    with short_tmpdir() as tmpdir:
        env = ray_env(tmpdir, home)
        up = teamorch(env, "up", "--team", str(team_file), "--name", "it")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "a private head teamorch started" in up.stdout and "box" in up.stdout
        state = Team("it", env, home, team_file, sim)
        assert ray_processes(tmpdir, wait=0)
        yield state
        down = teamorch(env, "down", "it", "--stop-ray")
        sim.stop()
        assert down.returncode == 0 and "Stopped the private Ray head" in down.stdout, down.stdout + down.stderr
        assert not ray_processes(tmpdir), "the private head's processes outlived `down --stop-ray`"
        assert not (Path(tmpdir) / "ray" / "ray_current_cluster").exists()  # 'auto' finds no stopped head


def ray_processes(tmpdir: str, wait: float = 10.0) -> list[str]:
    """Live processes of the Ray whose files are under `tmpdir` (they name it on their command lines)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # not a process, or gone meanwhile
            if tmpdir in command and state != "Z":
                found.append(command[:120])
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


ACTORS = """
import json, ray
from teamorch.cluster import connect
connect({address!r}, "teamorch")
print(json.dumps([(r["ActorClassName"], r["Name"], r["State"], r["IsDetached"], r["Pid"])
                  for r in ray._private.state.actors().values()]))
"""


def actors(team: Team) -> list[tuple[str, str, str, bool, int]]:
    done = python(ACTORS.format(address=team.head()["address"]), team.env)
    assert done.returncode == 0, done.stderr
    return [tuple(a) for a in json.loads(done.stdout.splitlines()[-1])]


def test_the_team_outlives_the_up_process_and_a_second_up_is_refused(team: Team) -> None:
    alive = [(cls, detached) for cls, _, state, detached, _ in actors(team) if state == "ALIVE"]
    # `up` has exited; its coordinator is detached and the fleet it owns lives on.
    assert ("Coordinator", True) in alive
    assert {cls for cls, _ in alive} >= {"ModelServer", "LoadBalancer", "Specialist"}
    again = teamorch(team.env, "up", "--team", str(team.team_file), "--name", "it")
    assert again.returncode == 3 and "team 'it' is already up" in again.stderr and "--replace" in again.stderr
    status = teamorch(team.env, "status", "it")
    assert status.returncode == 0, status.stderr
    assert "box" in status.stdout and "0/2" in status.stdout


def test_two_processes_share_the_teams_slots_and_each_gets_its_report(team: Team, tmp_path: Path) -> None:
    httpx.post(f"{team.sim.url}/sim/reset").raise_for_status()
    runs = []
    for name in ("a", "b"):
        plan = write_plan(tmp_path / f"{name}.yaml", 4, prefix=name, num_predict=60)  # 1.5 s per request
        args = ["run", str(plan), "--team", str(team.team_file), "--coordinator", "it", "--quiet"]
        args += ["--json", str(tmp_path / f"{name}.json"), "--runs-dir", str(tmp_path / "runs")]
        runs.append(subprocess.Popen([TEAMORCH, *args], env=team.env, cwd=REPO, stdout=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=120)[0] for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], outputs
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    assert reports[0]["run_id"] != reports[1]["run_id"]
    assert [sorted(t["task_id"] for t in r["tasks"]) for r in reports] == [[f"{p}{i}" for i in range(4)] for p in "ab"]
    assert all(t["status"] == "succeeded" for r in reports for t in r["tasks"])
    spans = [(min(t["started_at"] for t in r["tasks"]), max(t["ended_at"] for t in r["tasks"])) for r in reports]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two runs overlapped in time
    stats = team.sim.stats()
    assert stats["requests"] == 8
    assert stats["max_in_flight"] == 2  # the team's 2 slots held across both processes (the simulator takes 4)
    status = teamorch(team.env, "status", "it")  # a third process sees both runs
    assert all(f"run {r['run_id']}: finished, 4/4 tasks done" in status.stdout for r in reports), status.stdout


IN_ACTOR = """
import json, ray
from teamorch import api
from teamorch.cluster import connect
from teamorch.messages import ExecutionWave, OrchestrationPlan, RunReport, Task
from teamorch.team import get_coordinator

connect({address!r}, "agents")


@ray.remote(num_cpus=0)
class Agent:
    def ask(self, team: str, plan: OrchestrationPlan) -> RunReport:
        return api.execute(get_coordinator(team), plan)


tasks = [Task(task_id="look", specialist="Syntax Analyst", input_data={{"file": "main.py"}})]
plan = OrchestrationPlan(problem="from an actor", waves=[ExecutionWave(wave_number=1, tasks=tasks)])
print(json.dumps(ray.get(Agent.remote().ask.remote("it", plan)).model_dump(mode="json")))
"""


def test_a_ray_actor_gets_the_coordinator_by_name_and_runs_a_plan(team: Team) -> None:
    done = python(IN_ACTOR.format(address=team.head()["address"]), team.env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["success"] and [(t["task_id"], t["server"]) for t in report["tasks"]] == [("look", "box")]


def test_a_ray_client_with_token_auth_runs_a_plan_on_the_team(team: Team, tmp_path: Path) -> None:
    client = str(team.head()["client_address"])
    plan = write_plan(tmp_path / "plan.yaml", 2)
    args = ["run", str(plan), "--team", str(team.team_file), "--coordinator", "it", "--address", client]
    done = teamorch(team.env, *args, "--json", str(tmp_path / "r.json"), "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["success"] and {t["server"] for t in report["tasks"]} == {"box"}


def test_a_second_process_follows_the_runs_an_agent_loop_submits(team: Team) -> None:
    loop = [sys.executable, "-m", "teamorch.scenarios.agent_loop"]
    watcher = subprocess.Popen(
        [*loop, "watch", "--session", "s", "--coordinator", "it", "--idle", "5"],
        env=team.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    agent = subprocess.run(
        [*loop, "run", "--session", "s", "--coordinator", "it", "--team", str(team.team_file)],
        env=team.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    watched = watcher.communicate(timeout=60)[0]
    assert agent.returncode == 0, agent.stdout + agent.stderr
    # Two analysts (the roster minus its last member) first, then the Architect merges their findings.
    assert "agent: run s-1: analysis-syntax-analyst, analysis-whitespace-analyst" in agent.stdout
    assert "agent: run s-2: fix-plan" in agent.stdout and "done after 2 runs" in agent.stdout
    assert watcher.returncode == 0, watched
    for line in ("s-1 #", "analysis-syntax-analyst succeeded", "analysis-whitespace-analyst succeeded"):
        assert line in watched, watched
    assert "fix-plan succeeded" in watched and "s-2 #" in watched and "no run s-3 after 2 runs" in watched
    finished = [line for line in watched.splitlines() if "finished, success=True" in line]
    assert [line.split()[1] for line in finished] == ["s-1", "s-2"]


def test_a_crashed_coordinator_is_reported_and_replaced(team: Team) -> None:
    up = teamorch(team.env, "up", "--team", str(team.team_file), "--name", "crashy")
    assert up.returncode == 0, up.stdout + up.stderr
    (pid,) = [p for cls, name, state, _, p in actors(team) if name == "crashy" and state == "ALIVE"]
    os.kill(pid, signal.SIGKILL)  # the coordinator's worker process dies: not a `down`
    deadline = time.monotonic() + 30
    while (status := teamorch(team.env, "status", "crashy")).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status.returncode == 3 and "team 'crashy' is down: its coordinator died" in status.stderr, status.stderr
    again = teamorch(team.env, "up", "--team", str(team.team_file), "--name", "crashy")
    assert again.returncode == 0 and "coordinator of team 'crashy' had died" in again.stdout, again.stdout
    assert teamorch(team.env, "down", "crashy").returncode == 0
    gone = teamorch(team.env, "status", "crashy")
    assert gone.returncode == 3 and "no team 'crashy' is up" in gone.stderr  # a `down` is not a death


def test_default_team_is_the_demo_roster_on_the_embedded_fleet() -> None:
    team = default_team()
    assert [s.name for s in team.specialists] == [
        "Syntax Analyst",
        "Whitespace Analyst",
        "Logic Analyst",
        "Root Cause Analyst",
        "Architect",
    ]
    assert team.servers == [] and {s.protocol for s in team.resolved().servers} == {"embedded"}
    plan_file = REPO / "scenarios" / "consensus.yaml"  # a plan file: its `team:` section is the team
    named = [s["name"] for s in yaml.safe_load(plan_file.read_text())["team"]["specialists"]]
    assert [s.name for s in team_from(str(plan_file)).specialists] == named
    assert team_from(str(REPO / "scenarios" / "teams" / "ollama.example.yaml")).servers  # a team file


def test_up_records_the_team_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_TOKEN", "sk-record-0123456789")
    team_file = tmp_path / "team.yaml"
    team_file.write_text(
        yaml.safe_dump(
            {
                "servers": [
                    {"name": "b", "url": "http://b:11434", "headers": {"Authorization": "Bearer ${RECORD_TOKEN}"}}
                ],
                "default_model": "m",
                "specialists": [{"name": "A"}],
            }
        )
    )
    raw = team_raw_from(str(team_file))
    assert raw["servers"][0]["headers"] == {"Authorization": "Bearer ${RECORD_TOKEN}"}  # no secret in the record
    assert parse_team(interpolate(raw)) == team_from(str(team_file))  # the record starts the same team
    plan_file = REPO / "scenarios" / "consensus.yaml"
    assert parse_team(interpolate(team_raw_from(str(plan_file)))) == team_from(str(plan_file))
    assert parse_team(interpolate(team_raw_from(None))) == default_team()


@pytest.mark.model
def test_plan_without_team_asks_the_demo_roster(tmp_path: Path) -> None:
    with short_tmpdir() as tmpdir:
        done = teamorch(ray_env(tmpdir, tmp_path), "plan", "Why does inventory.py crash on startup?", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("# plan_source:")
    plan = yaml.safe_load(done.stdout)
    used = {t["specialist"] for t in plan["tasks"]}
    assert used and used <= {s.name for s in default_team().specialists}


KILL_AND_READ = """
import json, time, ray
from teamorch.cluster import connect
from teamorch.team import recorded
connect({address!r}, "teamorch")
ray.kill(ray.get_actor({name!r}), no_restart=True)  # not a `down`: the record stays
while {name!r} in {{a["Name"] for a in ray._private.state.actors().values() if a["State"] != "DEAD"}}:
    time.sleep(0.1)
print(recorded({name!r}).model_dump_json())
"""

CONFIG = """
import ray
from teamorch.team import attach
print(ray.get(attach({name!r}, {address!r}).config.remote()).model_dump_json())
"""


def test_a_killed_team_is_started_again_by_the_next_run_which_checks_its_plan_against_it(
    team: Team, tmp_path: Path
) -> None:
    name, env = "phoenix", {**team.env, "PHOENIX_TOKEN": "sk-phoenix-0123456789abcdef"}
    team_file = tmp_path / "team.yaml"
    raw = yaml.safe_load(team.team_file.read_text())
    raw["servers"][0]["headers"] = {"Authorization": "Bearer ${PHOENIX_TOKEN}"}
    team_file.write_text(yaml.safe_dump(raw))
    assert teamorch(env, "up", "--team", str(team_file), "--name", name).returncode == 0
    address = str(team.head()["address"])
    config = json.loads(python(CONFIG.format(name=name, address=address), env).stdout.splitlines()[-1])
    assert config["servers"][0]["headers"] == {"Authorization": "[redacted]"}  # names, never the credential

    killed = python(KILL_AND_READ.format(address=address, name=name), env)
    assert killed.returncode == 0, killed.stderr[-3000:]
    record = json.loads(killed.stdout.splitlines()[-1])
    assert record["team"]["servers"][0]["headers"] == {"Authorization": "Bearer ${PHOENIX_TOKEN}"}  # unexpanded

    # The plan file carries no team: the team that is up is the one it is checked against and runs on.
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"problem": "p", "tasks": [{"task_id": "x", "specialist": "Architect"}]}))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    done = teamorch(env, "run", str(plan), "--coordinator", name, "--json", str(tmp_path / "r.json"), *runs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"team {name!r} was down (its coordinator died: " in done.stdout, done.stdout
    assert f"started it again from the team `teamorch up` recorded ({team_file})" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["success"]
    status = teamorch(env, "status", name)
    assert status.returncode == 0 and "box" in status.stdout, status.stdout + status.stderr
    assert "finished, 1/1 tasks done" in status.stdout

    # `servers --coordinator` brings a dead team back too (the same record), then shows its fleet.
    assert python(KILL_AND_READ.format(address=address, name=name), env).returncode == 0
    shown = teamorch(env, "servers", "--coordinator", name)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"team {name!r} was down (its coordinator died: " in shown.stdout and "box" in shown.stdout, shown.stdout

    # A specialist the up team lacks is bad input, even when the plan's own `team:` has it; no model call.
    own_team = {"specialists": [{"name": "Ghost"}], "default_model": "gemma3:270m"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"problem": "p", "tasks": [{"task_id": "g", "specialist": "Ghost"}], "team": own_team})
    )
    asked = team.sim.stats()["requests"]
    refused = teamorch(env, "run", str(bad), "--coordinator", name, *runs)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{bad}: tasks[0].specialist: task 'g' names unknown specialist 'Ghost'" in refused.stderr
    assert team.sim.stats()["requests"] == asked

    # `down` deletes the record: the next run does not bring the team back.
    assert teamorch(env, "down", name).returncode == 0
    gone = teamorch(env, "run", str(plan), "--coordinator", name, *runs)
    assert gone.returncode == 2 and f"--coordinator: no team {name!r} is up" in gone.stderr, gone.stderr
