"""`teamorch run | validate | servers | simulate`.

Exit codes: 0 success; 1 the run finished but failed its success criteria;
2 invalid input (the message names the file and field); 3 the run could not
complete (Ray would not start, the coordinator died) — finished results are
still printed and written to `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from teamorch.errors import ConfigError, RunCancelled, RunInterrupted, TeamorchError
from teamorch.messages import RunReport, ServerLoad, TaskResult

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EMBEDDED_NOTE = (
    "No servers configured: using the embedded default, two llama.cpp servers (ollama01, ollama02) running\n"
    "Gemma 3 270M — real inference by a tiny base model, so answers are shallow. Point the team at real\n"
    "Ollama servers (--team TEAM.yaml) for real work."
)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def _task_row(r: TaskResult) -> list[str]:
    return [
        str(r.wave),
        r.task_id,
        r.specialist,
        r.server or "-",
        r.status,
        f"{r.duration:.1f}",
        str(len(r.attempts)),
        str(r.tokens),
    ]


TASK_HEADER = ["wave", "task", "specialist", "server", "status", "seconds", "attempts", "tokens"]


def print_report(report: RunReport, out: Any = None) -> None:
    rows = [_task_row(r) for r in sorted(report.tasks, key=lambda r: (r.wave, r.task_id))]
    print("\n" + _table(rows, TASK_HEADER), file=out)
    for r in report.tasks:
        if r.error:
            print(f"  {r.task_id}: {r.error}", file=out)
    print(f"\nSynthesis ({report.synthesis.strategy}):", file=out)
    if report.synthesis.error:
        print(f"  error: {report.synthesis.error}", file=out)
    else:
        print(_indent(_render_result(report.synthesis.result)), file=out)
    s = report.statistics
    print("\nStatistics:", file=out)
    print(
        f"  tasks: {s.successful_tasks}/{s.total_tasks} succeeded ({s.success_rate:.0%}), {s.failed_tasks} failed",
        file=out,
    )
    print(f"  wall time: {s.total_duration:.1f}s   sequential sum: {s.sequential_duration:.1f}s", file=out)
    print(
        f"  parallel efficiency: {s.parallel_efficiency:.2f}x   parallelism factor: {s.parallelism_factor:.0%}",
        file=out,
    )
    util = ", ".join(f"{k} {v:.0%}" for k, v in s.server_utilization.items()) or "-"
    print(f"  server utilization: {util}   tokens: {s.tokens}", file=out)
    verdict = "SUCCESS" if report.success else "FAILED"
    print(
        f"\n{verdict}: run {report.run_id} ({report.pattern or 'plan'}, {report.plan_source}) in {report.duration:.1f}s",
        file=out,
    )


def _render_result(result: Any) -> str:
    if isinstance(result, dict) and result and all(isinstance(v, dict) and "output" in v for v in result.values()):
        return "\n\n".join(
            f"[{key}] {v.get('specialist')} @ {v.get('server')}:\n{_indent(str(v.get('output') or '').strip())}"
            for key, v in result.items()
        )
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2, default=str)


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def _describe(runnable: Any) -> str:
    from teamorch.api import expand

    plan = expand(runnable)
    pattern = getattr(runnable, "pattern", None)
    if plan is None:
        return "pattern auto: the planner specialist writes the plan at run time"
    shape = f"{len(plan.tasks)} tasks in {len(plan.waves)} waves"
    if pattern == "consensus" and getattr(runnable, "rounds", 1) > 1:
        shape += f" (at most {runnable.rounds} rounds; stops early at {runnable.agreement_threshold:.0%} agreement)"
    return f"{pattern or 'plan'}: {shape}"


def cmd_validate(args: argparse.Namespace) -> int:
    from teamorch.api import expand, load_plan

    runnable, team = load_plan(args.plan, args.team)
    embedded = all(s.protocol == "embedded" for s in team.servers)
    print(
        f"{args.plan}: valid — {_describe(runnable)}; {len(team.specialists)} specialists; "
        f"servers: {', '.join(s.name for s in team.servers)}" + (" (embedded default)" if embedded else "")
    )
    plan = expand(runnable)
    for wave in plan.waves if plan else []:
        print(f"  wave {wave.wave_number}: " + ", ".join(f"{t.task_id} ({t.specialist})" for t in wave.tasks))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from teamorch import api

    plan, team = api.load_plan(args.plan, args.team)
    if all(s.protocol == "embedded" for s in team.servers):
        print(EMBEDDED_NOTE)
    print(f"Problem: {plan.problem.strip().splitlines()[0][:100]}  ({_describe(plan)})")
    t0 = time.monotonic()
    api.connect(args.address)
    coordinator = api.start_coordinator(team)
    print(f"Team ready in {time.monotonic() - t0:.1f}s: servers {', '.join(s.name for s in team.servers)}")

    def on_result(r: TaskResult) -> None:
        if not args.quiet:
            print(f"  [{r.status:>9}] {r.task_id} ({r.specialist}) on {r.server or '-'} in {r.duration:.1f}s")

    try:
        report = api.run_plan(coordinator, plan, on_result=on_result)
    except RunInterrupted as exc:
        print(f"error: {exc}; {len(exc.finished)} finished results kept", file=sys.stderr)
        for r in exc.finished:
            print(f"  [{r.status:>9}] {r.task_id} ({r.specialist}) on {r.server or '-'}", file=sys.stderr)
        _write_json(args.json, {"error": str(exc), "tasks": [r.model_dump() for r in exc.finished]})
        return EXIT_INTERRUPTED if isinstance(exc, RunCancelled) else EXIT_ERROR
    finally:
        api.stop_coordinator(coordinator)
    print_report(report)
    _write_json(args.json, report.model_dump())
    if args.json:
        print(f"report written to {args.json}")
    return EXIT_OK if report.success else EXIT_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    """Ask the planner for a plan; print it as YAML (save, edit, run) or run it with --run."""
    import ray
    import yaml

    from teamorch import api
    from teamorch.config import load_team

    team = load_team(args.team) if args.team else None
    context = {"notes": Path(args.context_file).read_text(encoding="utf-8")} if args.context_file else {}
    if team is None:
        raise ConfigError("teamorch plan needs --team TEAM.yaml (the roster the planner chooses from)", field="--team")
    api.connect(args.address)
    coordinator = api.start_coordinator(team)
    try:
        plan = ray.get(coordinator.create_plan.remote(args.problem, context))
        print(f"# plan_source: {plan.plan_source}")
        for note in plan.plan_notes:
            print(f"# {note}")
        body = plan.model_dump(include={"problem", "pattern", "synthesis_strategy", "success_criteria"})
        body["tasks"] = [
            t.model_dump(include={"task_id", "specialist", "input_data", "depends_on"}, exclude_defaults=True)
            for t in plan.tasks
        ]
        print(yaml.safe_dump(body, sort_keys=False))
        if not args.run:
            return EXIT_OK
        report = api.run_plan(coordinator, plan)
    finally:
        api.stop_coordinator(coordinator)
    print_report(report)
    _write_json(args.json, report.model_dump())
    return EXIT_OK if report.success else EXIT_FAILED


def print_loads(loads: list[ServerLoad]) -> None:
    rows = []
    for s in loads:
        lat = f"{s.ewma_latency:.2f}" if s.ewma_latency is not None else "-"
        tok = f"{1 / s.ewma_token_seconds:.0f}" if s.ewma_token_seconds else "-"
        ttft = f"{s.ewma_ttft:.2f}" if s.ewma_ttft is not None else "-"
        loaded = ",".join(s.models_loaded or []) if s.models_loaded is not None else "?"
        rows.append(
            [
                s.name,
                "up" if s.healthy else "DOWN",
                s.circuit,
                f"{s.in_flight}/{s.effective_slots}",
                str(s.waiting),
                lat,
                ttft,
                tok,
                f"{s.error_rate:.0%}",
                str(s.completed),
                str(s.failed),
                loaded,
            ]
        )
    header = [
        "server",
        "health",
        "circuit",
        "in-flight",
        "waiting",
        "latency",
        "ttft",
        "tok/s",
        "errors",
        "done",
        "failed",
        "loaded",
    ]
    print(_table(rows, header))


def cmd_servers(args: argparse.Namespace) -> int:
    import ray

    from teamorch import api
    from teamorch.config import load_team

    api.connect(args.address)
    own = args.team is not None
    coordinator = api.start_coordinator(load_team(args.team)) if own else api.get_coordinator(args.name)
    try:
        while True:
            loads = ray.get(coordinator.servers_load.remote())
            if args.watch:
                print("\033[2J\033[H", end="")
            print(time.strftime("%H:%M:%S"))
            print_loads(loads)
            if not args.watch:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if own:
            api.stop_coordinator(coordinator)


def cmd_simulate(args: argparse.Namespace) -> int:
    from teamorch.sim import SimConfig, load_fleet, run_fleet

    if args.fleet:
        configs = load_fleet(args.fleet)
    else:
        configs = [
            SimConfig(
                name=args.name,
                port=args.port,
                slots=args.slots,
                tokens_per_second=args.tps,
                ttft=args.ttft,
                models=args.models.split(","),
                error_rate=args.error_rate,
                die_after=args.die_after,
            )
        ]
    print("Ollama-API simulator (not a real model: deterministic text, Ollama's slot/queue/503 semantics).")
    run_fleet(configs)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teamorch", description="Run a team of LLM specialists across Ollama servers on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a plan file")
    run.add_argument("plan")
    run.add_argument("--team", help="team YAML: replaces the plan's servers, overrides specialists by name")
    run.add_argument("--json", help="write the RunReport as JSON here")
    run.add_argument("--address", help="Ray address ('auto' joins a `ray start` cluster); default: a private local Ray")
    run.add_argument("--quiet", action="store_true", help="no per-task progress lines")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a plan (and team) without running it")
    val.add_argument("plan")
    val.add_argument("--team")
    val.set_defaults(func=cmd_validate)

    pln = sub.add_parser("plan", help="let the planner specialist write a plan for a problem")
    pln.add_argument("problem")
    pln.add_argument("--team", help="team YAML whose specialists the planner may use")
    pln.add_argument("--context-file", help="a file whose text is given to the planner as context")
    pln.add_argument("--run", action="store_true", help="run the plan after printing it")
    pln.add_argument("--json", help="with --run: write the RunReport as JSON here")
    pln.add_argument("--address", help="Ray address; default: a private local Ray")
    pln.set_defaults(func=cmd_plan)

    srv = sub.add_parser("servers", help="show the balancer's live load table")
    srv.add_argument("--team", help="start this team's fleet and show it (otherwise attach to --name)")
    srv.add_argument("--name", default="teamorch", help="named coordinator to attach to")
    srv.add_argument("--address", help="Ray address; default: a private local Ray")
    srv.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    srv.add_argument("--interval", type=float, default=1.0)
    srv.set_defaults(func=cmd_servers)

    sim = sub.add_parser("simulate", help="serve the Ollama-API simulator (for tests, benchmarks, capacity planning)")
    sim.add_argument("--fleet", help="YAML with servers: [SimConfig...]")
    sim.add_argument("--name", default="sim")
    sim.add_argument("--port", type=int, default=11434)
    sim.add_argument("--slots", type=int, default=1)
    sim.add_argument("--tps", type=float, default=50.0, help="tokens per second per request")
    sim.add_argument("--ttft", type=float, default=0.05, help="seconds to first token")
    sim.add_argument("--models", default="gemma3:270m", help="comma-separated model names")
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--die-after", type=int, default=None)
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except TeamorchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
