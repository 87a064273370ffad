"""`make bench-faults`: what each fault a long run meets costs, measured against the same run without it.

Every row runs one plan (independent tasks, each instruction carrying a
marker) twice on a fresh simulator fleet: once clean, once with the fault.
The simulators' own request logs are the ground truth: `duplicated` counts
tasks for which a server generated a whole answer more than once (completed
requests carrying the task's marker), `lost` tasks that did not end with a
result; `extra s` compares the runs' own spans (first task start to last
task end, across sessions). `recovery s` is, for the restarted server, the
seconds from its restart to its first new request (its log against the
restart time).

Rows whose team is the same share one clean run (each on its fresh fleet).
The simulators run in this process (threads): a fault row must stop, restart
and reconfigure them on cue, which a child process cannot do on time.

    .venv/bin/python -m benchmarks.faults [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import MODEL, SIM_NOTE, ensure_ray, machine_info, table
from teamorch.config import TeamConfig
from teamorch.journal import RunJournal
from teamorch.messages import OrchestrationPlan, RunReport
from teamorch.sim import SimConfig, SimServer

TASKS = 32
TOKENS = 20
SIM = {"slots": 2, "tokens_per_second": 40.0, "ttft": 0.05}
RUN_TIMEOUT = 90.0  # seconds; a clean run takes a few
POLL = 1.0  # the team's poll_interval: a restarted server should be back within this
STORM = {"slots": 1, "max_queue": 0}
# The SIGKILL row kills this long after a third of the results are journaled: tasks run in batches of equal length,
# so the moment a result is journaled is the moment its batch's other answers are on their way to the journal; half a
# task later the next batch is mid-stream, which is where a kill lands on average.
MID_STREAM = (SIM["ttft"] + TOKENS / SIM["tokens_per_second"]) / 2
HEADERS = ["fault", "tasks", "succeeded", "lost", "duplicated", "extra s", "recovery s"]

# A fault acts on a started run: (coordinator handle, the fleet).
Act = Callable[[Any, dict[str, SimServer]], None]


@dataclass(frozen=True)
class Row:
    """One fault: how the fleet differs (`sims`: per server knobs), how the team differs, what happens mid-run."""

    fault: str
    sims: dict[str, dict[str, Any]] | None = None
    team: dict[str, Any] | None = None
    act: Act | None = None


@dataclass(frozen=True)
class Measured:
    report: RunReport | None
    seconds: float
    log: list[dict[str, Any]]
    recovery: float | None = None


def plan(n: int = TASKS) -> dict[str, Any]:
    tasks = [
        {"task_id": f"t{i}", "specialist": "A", "input_data": {"instruction": f"MARK-t{i}. Step {i}."}}
        for i in range(n)
    ]
    return {"problem": "independent steps", "tasks": tasks}


def outputs(log: list[dict[str, Any]], n: int = TASKS) -> dict[str, int]:
    """Per task, how many whole answers the servers generated for it."""
    return {f"t{i}": sum(f"MARK-t{i}." in e["prompt"] and e["completed"] for e in log) for i in range(n)}


@contextmanager
def fleet(knobs: dict[str, dict[str, Any]] | None) -> Iterator[dict[str, SimServer]]:
    servers = {}
    try:
        for name in ("a", "b"):
            servers[name] = SimServer(SimConfig(name=name, **{**SIM, **(knobs or {}).get(name, {})})).start_in_thread()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def team_raw(servers: dict[str, SimServer], extra: dict[str, Any] | None) -> dict[str, Any]:
    """The team as a file would hold it; `extra["slots"]` is what the team claims (default: the truth)."""
    extra = dict(extra or {})
    claimed, server_extra = extra.pop("slots", None), extra.pop("server", {})
    return {
        "servers": [
            {
                "name": s.config.name,
                "url": s.url,
                "slots": claimed or s.config.slots,
                "models": [MODEL],
                "poll_interval": POLL,
                **server_extra,
            }
            for s in servers.values()
        ],
        "default_model": MODEL,
        "specialists": [{"name": "A", "options": {"num_predict": TOKENS}}],
        **extra,
    }


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(row: Row, faulty: bool) -> Measured:
    """One run of the plan on a fresh fleet and a fresh coordinator, with the row's fault or without it."""
    import ray

    from teamorch import api

    with fleet(row.sims if faulty else None) as servers:
        team = TeamConfig.model_validate(team_raw(servers, row.team))
        handle = api.start_coordinator(team)
        try:
            ref = handle.run_plan.remote(OrchestrationPlan.model_validate(plan()))
            if faulty and row.act:
                row.act(handle, servers)
            try:
                report: RunReport | None = ray.get(ref, timeout=RUN_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                report = None  # a hung run: every task counts as lost
        finally:
            api.stop_coordinator(handle)
        return Measured(report, span(report), sim_log(servers), recovery(servers["a"]))


def span(report: RunReport | None) -> float:
    """Seconds from the run's first task start to its last task end (wall clock, across sessions): the run's
    own time, without Ray's or a process's start-up and shutdown."""
    if report is None or not report.tasks:
        return RUN_TIMEOUT
    return max(t.ended_at for t in report.tasks) - min(t.started_at for t in report.tasks)


def sim_log(servers: dict[str, SimServer]) -> list[dict[str, Any]]:
    return [e for s in servers.values() for e in s.stats()["requests_log"]]


def recovery(server: SimServer) -> float | None:
    """Seconds from the server's (last) restart to its first request after it, from its own log."""
    if not server.restarts:
        return None
    after = [e["at"] for e in server.stats()["requests_log"] if e["at"] >= server.restarts[-1]]
    return min(after) - server.restarts[-1] if after else None


def generating(servers: dict[str, SimServer], name: str = "a") -> None:
    """Wait until `name` is mid-stream with a few tasks done, so the fault hits a run in full swing."""
    wait_for(lambda: servers[name].stats()["completed"] >= 2 and servers[name].stats()["in_flight"] >= 1)


def crash(kind: str, name: str = "") -> Act:
    def act(handle: Any, servers: dict[str, SimServer]) -> None:
        import ray

        generating(servers)
        ray.get(handle.crash.remote(kind, name), timeout=30)

    return act


def restart(handle: Any, servers: dict[str, SimServer]) -> None:
    generating(servers)
    servers["a"].restart(down=1.0)


def kill_process(handle: Any, servers: dict[str, SimServer]) -> None:
    generating(servers)
    servers["a"].stop()  # the box is gone for good: in-flight streams drop, new connections are refused


ROWS = [
    Row("server process killed mid-stream", act=kill_process),
    Row("503 storm (team claims 4 slots, box holds 1, no queue)", dict.fromkeys("ab", STORM), {"slots": 4}),
    Row("stalled stream (read_timeout 2 s)", {"a": {"stall": True}}, {"server": {"read_timeout": 2.0}}),
    Row("malformed/truncated NDJSON", {"a": {"malformed": True}}),
    Row("HTTP 200 with an error line mid-stream", {"a": {"error_line_rate": 1.0}}),
    Row("ray.kill server actor mid-task", act=crash("server", "a")),
    Row("ray.kill specialist actor mid-task", act=crash("specialist", "A")),
    Row("ray.kill balancer mid-task", act=crash("balancer")),
    Row("server restarted mid-run (down 1 s)", act=restart),
]


def result_row(fault: str, clean: Measured, hit: Measured) -> list[Any]:
    report = hit.report
    succeeded = sum(t.status == "succeeded" for t in report.tasks) if report else 0
    duplicated = sum(n > 1 for n in outputs(hit.log).values())
    recovery = round(hit.recovery, 2) if hit.recovery is not None else "-"
    return [fault, TASKS, succeeded, TASKS - succeeded, duplicated, round(hit.seconds - clean.seconds, 2), recovery]


# ---------------------------------------------------------------------- driver SIGKILL, then `teamorch resume`


def cli(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "teamorch.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its private Ray is in this process group: the kill takes the whole "machine"
    )


def journaled(events: Path) -> int:
    done = 0
    for line in events.read_text().splitlines() if events.is_file() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the line being written
        done += event.get("type") == "task_finished" and event["result"]["status"] == "succeeded"
    return done


def run_cli(tmp: Path, servers: dict[str, SimServer], kill_after: float | None) -> Measured:
    """`teamorch run` to the end (`kill_after` None), or SIGKILLed `kill_after` seconds after a third of the tasks
    were journaled, then resumed."""
    (tmp / "plan.yaml").write_text(yaml.safe_dump(plan()))
    (tmp / "team.yaml").write_text(yaml.safe_dump(team_raw(servers, None)))
    runs, run_id = tmp / "runs", "clean" if kill_after is None else "killed"
    proc = cli(tmp, "run", "plan.yaml", "--team", "team.yaml", "--runs-dir", str(runs), "--run-id", run_id)
    if kill_after is not None:
        wait_for(lambda: journaled(runs / run_id / "events.jsonl") >= TASKS // 3 or proc.poll() is not None, 90)
        time.sleep(kill_after)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    if kill_after is not None:
        # The dead driver's Ray workers hold the journal until they notice their raylet is gone (seconds).
        wait_for(lambda: RunJournal.open(runs, run_id).state().status != "running", 60)
        resumed = subprocess.run(
            [sys.executable, "-m", "teamorch.cli", "resume", run_id, "--runs-dir", str(runs)],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if resumed.returncode:
            print(f"resume exited {resumed.returncode}:\n{resumed.stdout}{resumed.stderr}", file=sys.stderr)
    report = RunJournal.open(runs, run_id).rebuild_report()
    return Measured(report, span(report), sim_log(servers))


# Two kill moments: mid-stream (requests are generating: they must be dropped, not finished), and right as a
# result is journaled (the tasks of the same equal-length batch are finishing too: answers in transit to the
# journal, which a resume must generate again — the one case that can still cost a duplicate generation).
KILLS = {"mid-stream": MID_STREAM, "as results are journaled": 0.0}


def resume_rows() -> list[list[Any]]:
    with tempfile.TemporaryDirectory() as tmp, fleet(None) as servers:
        clean = run_cli(Path(tmp), servers, None)
    rows = []
    for moment, delay in KILLS.items():
        with tempfile.TemporaryDirectory() as tmp, fleet(None) as servers:
            hit = run_cli(Path(tmp), servers, delay)
        rows.append(result_row(f"driver SIGKILL {moment}, then `teamorch resume`", clean, hit))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    began = time.monotonic()
    ensure_ray()
    rows, clean = [], {}
    for row in ROWS:
        key = json.dumps(row.team, sort_keys=True)  # rows whose team is the same share one clean run
        clean[key] = clean.get(key) or measure(row, faulty=False)
        rows.append(result_row(row.fault, clean[key], measure(row, faulty=True)))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    rows += resume_rows()
    info = machine_info()
    text = "\n".join(
        [
            f"## Fault suite ({TASKS} tasks of {TOKENS} tokens, 2 servers x {SIM['slots']} slots at "
            f"{SIM['tokens_per_second']:g} tok/s, poll_interval {POLL:g} s)",
            f"{SIM_NOTE} Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, Ray {info['ray']}.",
            "",
            table(HEADERS, rows),
            f"Whole suite: {time.monotonic() - began:.0f} s.",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
