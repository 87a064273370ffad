"""An agent that holds a team's coordinator and decides what to ask next from the last report.

Plain Python, no agent framework: the team is a long-lived one (`teamorch up`), the agent a loop.

    teamorch up --team scenarios/complex_error.yaml                    # once; the team stays up
    python -m teamorch.scenarios.agent_loop watch --session s1 &       # a second process follows the runs
    python -m teamorch.scenarios.agent_loop run --session s1           # the agent

The agent looks at a file with every analyst of the team at once; the analysts that failed are asked
again (at most twice); once every analysis is in, the last specialist on the roster (the Architect in
the demo team) turns the findings into one fix plan, and the agent stops. Its runs are named
`<session>-1`, `<session>-2`, ... so the watcher, in another process or on another machine, can follow
each one as it happens (`teamorch.api.follow_run` reads the coordinator's events) without being told
anything but the session. Both take `--coordinator NAME` and `--address` like `teamorch run`; the
agent's `--team` names the roster it plans with (default: the demo team, as `teamorch up` without
`--team`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from teamorch.cli_team import DEFAULT_NAME, team_from
from teamorch.messages import ExecutionWave, OrchestrationPlan, RunReport, Task

CODE = Path(__file__).parent / "data" / "complex_error" / "inventory.py"
MAX_RETRIES = 2


def next_plan(problem: str, code: str, roster: list[str], history: list[RunReport]) -> OrchestrationPlan | None:
    """The agent's whole policy: analyse, ask again whoever failed, then synthesize; None when done."""
    analysts, synthesizer = roster[:-1] or roster, roster[-1]
    if not history:
        return _plan(problem, code, [_analysis(name) for name in analysts])
    if any(t.task_id == "fix-plan" for t in history[-1].tasks):
        return None  # the synthesis ran: its report is the answer
    findings = {t.specialist: t.output or "" for r in history for t in r.tasks if t.status == "succeeded"}
    missing = [name for name in analysts if name not in findings]
    if missing and len(history) <= MAX_RETRIES:
        return _plan(problem, code, [_analysis(name) for name in missing])
    merged = "\n\n".join(f"{who}:\n{text}" for who, text in findings.items())
    return _plan(problem, code, [("fix-plan", synthesizer, f"Turn these findings into one fix plan:\n\n{merged}")])


def _analysis(name: str) -> tuple[str, str, str]:
    return f"analysis-{name.lower().replace(' ', '-')}", name, "Report every problem you find, with its line."


def _plan(problem: str, code: str, tasks: list[tuple[str, str, str]]) -> OrchestrationPlan:
    wave = [Task(task_id=tid, specialist=who, input_data={"instruction": text}) for tid, who, text in tasks]
    return OrchestrationPlan(
        problem=problem,
        context={"code": code},
        waves=[ExecutionWave(wave_number=1, tasks=wave)],
        synthesis_strategy="merge_all",
    )


def agent(args: argparse.Namespace) -> int:
    from teamorch import api
    from teamorch.team import attach

    roster = [s.name for s in team_from(args.team).specialists]
    coordinator = attach(args.coordinator, args.address)
    problem = "inventory.py crashes on startup and reports a total value that is too low."
    history: list[RunReport] = []
    while (plan := next_plan(problem, CODE.read_text(encoding="utf-8"), roster, history)) is not None:
        run_id = f"{args.session}-{len(history) + 1}"
        print(f"agent: run {run_id}: {', '.join(t.task_id for t in plan.tasks)}", flush=True)
        report = api.execute(coordinator, plan, run_id=run_id)
        done = sum(t.status == "succeeded" for t in report.tasks)
        print(f"agent: run {run_id} finished: {done}/{len(report.tasks)} succeeded", flush=True)
        history.append(report)
    print(f"agent: done after {len(history)} runs", flush=True)
    return 0 if history and history[-1].success else 1


def watch(args: argparse.Namespace) -> int:
    """Follow the session's runs one after another; stop when no next run starts within `--idle` seconds."""
    import ray

    from teamorch import api
    from teamorch.journal import RunFinished, TaskFinished, TaskStarted
    from teamorch.team import attach

    coordinator = attach(args.coordinator, args.address)
    number = 1
    while True:
        run_id = f"{args.session}-{number}"
        deadline = time.monotonic() + (args.idle if number > 1 else args.first_wait)
        while not ray.get(coordinator.events.remote(run_id, 0)):  # not started (yet)
            if time.monotonic() > deadline:
                print(f"watch: no run {run_id} after {number - 1} runs: the agent is done", flush=True)
                return 0
            time.sleep(0.1)
        for event in api.follow_run(coordinator, run_id):
            if isinstance(event, TaskStarted):
                print(f"watch: {run_id} #{event.seq} {event.task_id} started on {event.server}", flush=True)
            elif isinstance(event, TaskFinished):
                print(f"watch: {run_id} #{event.seq} {event.result.task_id} {event.result.status}", flush=True)
            elif isinstance(event, RunFinished):
                print(f"watch: {run_id} #{event.seq} finished, success={event.success}", flush=True)
        number += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teamorch.scenarios.agent_loop", description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["run", "watch"], help="run the agent, or watch its runs")
    parser.add_argument("--session", default="agent", help="names the runs: SESSION-1, SESSION-2, ...")
    parser.add_argument("--coordinator", default=DEFAULT_NAME, metavar="NAME", help="the team `teamorch up` started")
    parser.add_argument("--address", help="Ray address (default: as `teamorch run --coordinator`)")
    parser.add_argument("--team", help="the roster the agent plans with (a team YAML or a plan file with a team)")
    parser.add_argument("--idle", type=float, default=10.0, help="watch: seconds to wait for the next run")
    parser.add_argument("--first-wait", type=float, default=60.0, help="watch: seconds to wait for the first run")
    args = parser.parse_args(argv)
    return agent(args) if args.role == "run" else watch(args)


if __name__ == "__main__":
    sys.exit(main())
