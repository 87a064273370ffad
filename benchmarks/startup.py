"""Time to first request and per-run overhead: a cold `teamorch run` vs a run on a team that stays up.

Both paths run the same 4-task plan with the real `teamorch` command, as a user would, against the
same two simulators:

* cold: `teamorch run PLAN --team TEAM` starts a private Ray, the coordinator, balancer, servers and
  specialists (one worker process each), runs, and tears everything down;
* up: `teamorch up --team TEAM` once (its cost is shown apart), then
  `teamorch run PLAN --team TEAM --coordinator NAME`, which only joins Ray and looks the team up.

Time to first request is measured from just before the command is launched (so it includes Python's
start and `import ray`) to the arrival time the simulator itself logs for the run's first request.
Per-run overhead is the command's wall time minus the plan's own duration in its report.
The warm team runs on a private head started in a temporary RAY_TMPDIR and stopped at the end, so
the benchmark neither uses nor disturbs any Ray already running on the machine.

Run: `.venv/bin/python -m benchmarks.startup [--cold N] [--warm N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import MODEL, REPO, SIM_NOTE, Fleet, machine_info, table
from teamorch.sim import SimConfig

TEAMORCH = str(Path(sys.executable).with_name("teamorch"))
NAME = "bench-startup"
SPECIALISTS = ["Analyst", "Reviewer"]


def _files(fleet: Fleet, where: Path) -> tuple[Path, Path]:
    team = {
        "servers": [{"name": n, "url": u, "slots": 2} for n, u in fleet.urls.items()],
        "default_model": MODEL,
        "specialists": [{"name": s} for s in SPECIALISTS],
    }
    tasks = [{"task_id": f"t{i}", "specialist": SPECIALISTS[i % 2], "input_data": {"i": i}} for i in range(4)]
    plan = {"problem": "startup benchmark", "waves": [{"wave_number": 1, "tasks": tasks}]}
    (where / "team.yaml").write_text(yaml.safe_dump(team))
    (where / "plan.yaml").write_text(yaml.safe_dump(plan))
    return where / "team.yaml", where / "plan.yaml"


def _teamorch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([TEAMORCH, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"teamorch {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _first_request_after(fleet: Fleet, launched: float) -> float:
    arrivals = [r["at"] for s in fleet.stats().values() for r in s["requests_log"] if r["at"] >= launched]
    return min(arrivals) - launched


def one_run(fleet: Fleet, env: dict[str, str], args: list[str], where: Path) -> dict[str, float]:
    fleet.reset()
    report = where / "report.json"
    launched = time.time()
    _teamorch(env, "run", *args, "--quiet", "--json", str(report), "--runs-dir", str(where / "runs"))
    wall = time.time() - launched
    duration = float(json.loads(report.read_text())["duration"])
    return {"first": _first_request_after(fleet, launched), "wall": wall, "run": duration, "overhead": wall - duration}


def _row(path: str, samples: list[dict[str, float]]) -> list[Any]:
    med = {k: statistics.median(s[k] for s in samples) for k in ("first", "wall", "run", "overhead")}
    return [path, len(samples), med["first"], med["wall"], med["run"], med["overhead"]]


def main(cold: int = 3, warm: int = 5) -> dict[str, Any]:
    configs = [SimConfig(name=f"sim{i}", slots=2, tokens_per_second=100.0) for i in (1, 2)]
    with tempfile.TemporaryDirectory(prefix="tsb") as tmp, Fleet(configs) as fleet:
        where = Path(tmp)
        team, plan = _files(fleet, where)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(where), TEAMORCH_HOME=str(where / "home"))
        cold_runs = [one_run(fleet, env, [str(plan), "--team", str(team)], where) for _ in range(cold)]
        started = time.monotonic()
        _teamorch(env, "up", "--team", str(team), "--name", NAME)
        up_seconds = time.monotonic() - started
        try:
            args = [str(plan), "--team", str(team), "--coordinator", NAME]
            warm_runs = [one_run(fleet, env, args, where) for _ in range(warm)]
        finally:
            _teamorch(env, "down", NAME, "--stop-ray")
    rows = [_row("cold `teamorch run`", cold_runs), _row("`teamorch run --coordinator` (team up)", warm_runs)]
    headers = ["path", "runs", "first request (s)", "wall (s)", "plan (s)", "overhead (s)"]
    text = "\n".join(
        [
            "## Startup: cold run vs a team that stays up",
            SIM_NOTE,
            "Medians; a 4-task plan on two simulators; first request from the command's launch.",
            "",
            table(headers, rows),
            f"`teamorch up` (private head + team, paid once): {up_seconds:.1f} s",
        ]
    )
    print(text)
    return {"text": text, "cold": cold_runs, "warm": warm_runs, "up": up_seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=3, help="cold runs (each starts and stops Ray)")
    parser.add_argument("--warm", type=int, default=5, help="runs on the team that stays up")
    ns = parser.parse_args()
    print(json.dumps(machine_info()))
    main(ns.cold, ns.warm)
