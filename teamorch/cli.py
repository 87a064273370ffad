"""`teamorch run | resume | runs | validate | plan | servers | simulate | timeline`.

Exit codes: 0 success; 1 the run finished but failed its success criteria;
2 invalid input (the message names the file and field); 3 the run could not
complete (Ray would not start, the coordinator died) — finished results are
still printed and written to `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teamorch.cli_team import add_team_commands, default_team
from teamorch.config import TeamConfig, read_yaml
from teamorch.errors import ConfigError, RunCancelled, RunInterrupted, TeamorchError
from teamorch.journal import (
    JournalError,
    JournalEvent,
    RunJournal,
    RunResumed,
    TaskFinished,
    list_runs,
    new_run_dir,
    resolve_run_id,
    resolve_runs_dir,
    secret_values,
)
from teamorch.messages import JournalSpec, RunReport, ServerLoad, TaskResult
from teamorch.plans import Runnable, expand, load_plan, read_plan_raw

if TYPE_CHECKING:
    from teamorch.team import Attached

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUNS_DIR_HELP = "where run journals are (default: $TEAMORCH_RUNS_DIR, else .teamorch/runs)"
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
    if s.prompt_tokens:
        share = s.cached_tokens / s.prompt_tokens
        print(f"  prompt cache: {s.cached_tokens} of {s.prompt_tokens} prompt tokens reused ({share:.0%})", file=out)
    if len(report.sessions) > 1:
        print("\nSessions (the run was resumed):", file=out)
        for span in report.sessions:
            when = time.strftime("%H:%M:%S", time.localtime(span.started_at))
            seconds = span.ended_at - span.started_at
            print(f"  {span.session}: from {when} for {seconds:.1f}s, ran {', '.join(span.tasks) or '-'}", file=out)
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
    plan = expand(runnable)
    pattern = getattr(runnable, "pattern", None)
    if plan is None:
        return "pattern auto: the planner specialist writes the plan at run time"
    shape = f"{len(plan.tasks)} tasks in {len(plan.waves)} waves"
    if pattern == "consensus" and getattr(runnable, "rounds", 1) > 1:
        shape += f" (at most {runnable.rounds} rounds; stops early at {runnable.agreement_threshold:.0%} agreement)"
    return f"{pattern or 'plan'}: {shape}"


def cmd_validate(args: argparse.Namespace) -> int:
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
    """Every run is journaled (`<runs dir>/<run id>/`); bad input fails before Ray is even imported, except what
    only the team that is up can tell (`--coordinator`): the plan file is read first, then checked against it."""
    runs_dir = resolve_runs_dir(args.runs_dir)
    run_id = resolve_run_id(args.run_id)
    new_run_dir(runs_dir, run_id)
    print(f"Run {run_id}", flush=True)  # first, so whoever started it can resume it whatever happens next
    plan_raw = read_plan_raw(args.plan)
    if args.priority_class:  # kept in the journaled plan, so `teamorch resume` runs in the same class
        plan_raw["priority_class"] = args.priority_class
    up = _join(args)
    plan, team = load_plan(args.plan, args.team, team=up.team.config if up else None)
    if args.priority_class:
        plan = plan.model_copy(update={"priority_class": args.priority_class})
    team_raw = up.team.raw if up else None  # the team that runs: with --coordinator, as `teamorch up` recorded it
    if team_raw is None and args.team:
        team_raw = read_yaml(args.team, expand_env=False)
    journal = JournalSpec(
        runs_dir=str(runs_dir),
        plan_raw=plan_raw,
        team_raw=team_raw,
        secrets=secret_values(plan_raw) + secret_values(team_raw),
    )
    return _run(args, plan, team, run_id, journal, session=1, up=up)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a run whose driver died: journaled results are kept, the rest runs now."""
    runs_dir = resolve_runs_dir(args.runs_dir, writable=False)
    journal = RunJournal.open(runs_dir, args.run_id)
    state = journal.state()
    if state.status == "finished":
        print(f"Run {args.run_id} finished already; its report, from the journal:")
        return _report(args, journal.rebuild_report(), None, None)
    if state.status == "running":
        raise JournalError(f"run {args.run_id!r} is being written by another live process; wait for it or stop it")
    plan_raw = read_plan_raw(journal.plan_file)
    journal.check_plan(plan_raw)  # the run directory's plan.yaml edited since: its results belong to another plan
    team_path = args.team or journal.team_file
    up = _join(args)
    plan, team = load_plan(journal.plan_file, team_path, team=up.team.config if up else None)
    team_raw = read_yaml(team_path, expand_env=False) if team_path else None
    print(f"Run {args.run_id}: resuming session {journal.session + 1}, {state.done} tasks journaled", flush=True)
    spec = JournalSpec(runs_dir=str(runs_dir), secrets=[*journal.secrets, *secret_values(team_raw)], resume=True)
    return _run(args, plan, team, args.run_id, spec, session=journal.session + 1, up=up)


def cmd_runs(args: argparse.Namespace) -> int:
    runs_dir = resolve_runs_dir(args.runs_dir, writable=False)
    states = list_runs(runs_dir)
    if not states:
        print(f"no runs in {runs_dir}")
        return EXIT_OK
    verdict = {True: "yes", False: "no", None: "-"}
    rows = [
        [
            s.run_id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started_at)),
            s.status,
            f"{s.done}/{'?' if s.total is None else s.total}",
            str(s.sessions),
            verdict[s.success],
        ]
        for s in states
    ]
    print(_table(rows, ["run", "started", "status", "done", "sessions", "success"]))
    return EXIT_OK


class _Progress:
    """Today's plain progress lines, from the run's events: one per finished task. Results a resumed run
    took from its journal are marked so."""

    def __init__(self, session: int) -> None:
        self.session = session

    def __call__(self, event: JournalEvent) -> None:
        if isinstance(event, RunResumed):
            print(f"  resumed: session {event.session}", flush=True)
        elif isinstance(event, TaskFinished):
            r = event.result
            where = f" (journaled in session {event.session})" if event.session < self.session else ""
            line = f"  [{r.status:>9}] {r.task_id} ({r.specialist}) on {r.server or '-'} in {r.duration:.1f}s{where}"
            print(line, flush=True)


@contextmanager
def _progress(
    args: argparse.Namespace, coordinator: Any, session: int
) -> Iterator[Callable[[JournalEvent], None] | None]:
    """What follows the run's events: the live display on a terminal, else today's plain lines (none if --quiet)."""
    from teamorch import live

    if not live.use_live(sys.stdout, args.quiet, args.plain):
        yield None if args.quiet else _Progress(session)
        return
    with live.LiveView(live.coordinator_loads(coordinator)) as view:
        yield view


@dataclass(frozen=True)
class _Up:
    """The team `--coordinator` names, joined (`teamorch.team.Attached`), and the seconds joining took."""

    team: Attached
    seconds: float


def _join(args: argparse.Namespace) -> _Up | None:
    """With `--coordinator NAME`: the team that is up, before the plan is checked against its config (the team
    that will run it, whatever the plan file's own `team:` says). A team whose coordinator died is started
    again from the config `teamorch up` recorded, and a line says so."""
    if not getattr(args, "coordinator", None):
        return None
    return _join_named(args.coordinator, args.address)


def _join_named(name: str, address: str | None) -> _Up:
    from teamorch.team import join

    t0 = time.monotonic()
    attached = join(name, address)
    if attached.replaced:
        print(attached.replaced, flush=True)
    return _Up(attached, time.monotonic() - t0)


def _open_team(args: argparse.Namespace, team: TeamConfig, up: _Up | None = None) -> tuple[Any, bool]:
    """The coordinator a command runs on, and whether the command owns it (and so must stop it).

    `--coordinator NAME` attaches to the team `teamorch up` started (no actor starts: ~0.3 s after
    `import ray`; `up` if `_join` did it already); otherwise a fleet is started for this command alone.
    """
    from teamorch import api

    if up is not None:
        return up.team.coordinator, False
    if getattr(args, "coordinator", None):
        from teamorch.team import attach

        return attach(args.coordinator, args.address), False
    api.connect(args.address)
    runs_dir = getattr(args, "runs_dir", None)
    return api.start_coordinator(api.with_fleet_memory(team, resolve_runs_dir(runs_dir, writable=False))), True


def _run(
    args: argparse.Namespace,
    runnable: Runnable,
    team: TeamConfig,
    run_id: str,
    journal: JournalSpec,
    session: int,
    up: _Up | None = None,
) -> int:
    from teamorch import api

    if all(s.protocol == "embedded" for s in team.servers):
        print(EMBEDDED_NOTE)
    print(f"Problem: {runnable.problem.strip().splitlines()[0][:100]}  ({_describe(runnable)})")
    t0 = time.monotonic() - (up.seconds if up else 0.0)
    coordinator, owned = _open_team(args, team, up)
    fleet = f"servers {', '.join(s.name for s in team.servers)}" if owned else f"team {args.coordinator!r}"
    print(f"Team ready in {time.monotonic() - t0:.1f}s: {fleet}", flush=True)
    try:
        with _progress(args, coordinator, session) as on_event:
            report = api.execute(coordinator, runnable, on_event=on_event, run_id=run_id, journal=journal)
    except RunInterrupted as exc:
        print(f"error: {exc}; {len(exc.finished)} finished results kept", file=sys.stderr)
        for r in exc.finished:
            print(f"  [{r.status:>9}] {r.task_id} ({r.specialist}) on {r.server or '-'}", file=sys.stderr)
        print(f"continue the run with: teamorch resume {run_id}", file=sys.stderr)
        _write_json(args.json, {"error": str(exc), "tasks": [r.model_dump() for r in exc.finished]})
        return EXIT_INTERRUPTED if isinstance(exc, RunCancelled) else EXIT_ERROR
    finally:
        if owned:
            api.stop_coordinator(coordinator)
    return _report(args, report, runnable, team)


def _report(args: argparse.Namespace, report: RunReport, runnable: Runnable | None, team: TeamConfig | None) -> int:
    """Print the report, write --json and --trace; the exit code says whether the run met its criteria."""
    print_report(report)
    _write_json(args.json, report.model_dump())
    if args.json:
        print(f"report written to {args.json}")
    if getattr(args, "trace", None) and runnable is not None and team is not None:
        from teamorch.trace import write_trace

        write_trace(report, args.trace, plan=expand(runnable), slots={s.name: s.slots for s in team.servers})
        print(f"trace written to {args.trace} (open it in ui.perfetto.dev)")
    return EXIT_OK if report.success else EXIT_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    """Ask the planner for a plan; print it as YAML (save, edit, run) or run it with --run."""
    import ray
    import yaml

    from teamorch import api
    from teamorch.config import load_team
    from teamorch.messages import AutoSpec

    team = load_team(args.team) if args.team else default_team()
    context = {"notes": Path(args.context_file).read_text(encoding="utf-8")} if args.context_file else {}
    coordinator, owned = _open_team(args, team, _join(args))
    out = sys.stdout  # the plan is for a pipe or a file: Ray's own notices (e.g. as actors stop) go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        try:
            plan = ray.get(coordinator.create_plan.remote(AutoSpec(problem=args.problem, context=context)))
            print(f"# plan_source: {plan.plan_source}", file=out)
            for note in plan.plan_notes:
                print(f"# {note}", file=out)
            body = plan.model_dump(include={"problem", "pattern", "synthesis_strategy", "success_criteria"})
            body["tasks"] = [
                t.model_dump(include={"task_id", "specialist", "input_data", "depends_on"}, exclude_defaults=True)
                for t in plan.tasks
            ]
            print(yaml.safe_dump(body, sort_keys=False), file=out, flush=True)
            if not args.run:
                return EXIT_OK
            report = api.execute(coordinator, plan)
        finally:
            if owned:
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

    if args.team is not None:
        coordinator, own = _open_team(args, load_team(args.team))
    else:  # like `run --coordinator`: a team whose coordinator died is started again from its record
        coordinator, own = _join_named(args.coordinator or args.name, args.address).team.coordinator, False
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
                prefill_tps=args.prefill_tps,
                max_loaded=args.max_loaded,
                load_time=args.load_time,
            )
        ]
    print("Ollama-API simulator (not a real model: deterministic text, Ollama's slot/queue/503 semantics).")
    run_fleet(configs)
    return EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    from teamorch.journal import resolve_runs_dir
    from teamorch.trace import load_run_for_timeline, write_timeline

    report, plan = load_run_for_timeline(args.run, resolve_runs_dir(args.runs_dir, writable=False))
    slots = None
    if args.plan:
        runnable, team = load_plan(args.plan, args.team)
        plan, slots = plan or expand(runnable), {s.name: s.slots for s in team.servers}
    write_timeline(report, args.output, plan=plan, slots=slots)
    print(f"timeline of run {report.run_id} written to {args.output}")
    return EXIT_OK


def _add_run_commands(sub: Any) -> None:
    """`run`, `resume` and `runs`: the commands that make and read run journals."""
    run = sub.add_parser("run", help="run a plan file")
    run.add_argument("plan")
    run.add_argument("--team", help="team YAML: replaces the plan's servers, overrides specialists by name")
    run.add_argument("--json", help="write the RunReport as JSON here")
    run.add_argument("--address", help="Ray address ('auto' joins a `ray start` cluster); default: a private local Ray")
    run.add_argument("--quiet", action="store_true", help="no per-task progress lines")
    run.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal (no live display)")
    run.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace of the run (ui.perfetto.dev)")
    run.add_argument("--run-id", help="name the run (default: UTC time + random suffix); printed first")
    run.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    run.add_argument("--coordinator", metavar="NAME", help=COORDINATOR_HELP)
    run.add_argument(
        "--priority-class",
        choices=["interactive", "batch"],
        help="on a team several runs share: batch runs wait for interactive ones (default: the plan's, else interactive)",
    )
    run.set_defaults(func=cmd_run)

    res = sub.add_parser("resume", help="continue a journaled run whose driver died; finished tasks are not rerun")
    res.add_argument("run_id", metavar="RUN_ID")
    res.add_argument("--json", help="write the whole run's RunReport as JSON here")
    res.add_argument("--team", help="team YAML to continue on (default: the team the run started with)")
    res.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    res.add_argument("--address", help="Ray address; default: a private local Ray")
    res.add_argument("--quiet", action="store_true", help="no per-task progress lines")
    res.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal (no live display)")
    res.add_argument("--coordinator", metavar="NAME", help=COORDINATOR_HELP)
    res.set_defaults(func=cmd_resume)

    runs = sub.add_parser("runs", help="list journaled runs: id, started, status, tasks done/total")
    runs.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    runs.set_defaults(func=cmd_runs)


COORDINATOR_HELP = (
    "run on the team `teamorch up` started under NAME (--address: where its Ray is; default: RAY_ADDRESS, the "
    "last `ray start` here, or teamorch's private head) instead of starting a fleet for this command; run and "
    "resume check the plan against that team, and run, resume, plan and servers start a team whose "
    "coordinator died again from what `up` recorded"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teamorch", description="Run a team of LLM specialists across Ollama servers on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_commands(sub)

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
    pln.add_argument("--coordinator", metavar="NAME", help=COORDINATOR_HELP)
    pln.set_defaults(func=cmd_plan)

    srv = sub.add_parser("servers", help="show the balancer's live load table")
    srv.add_argument("--team", help="start this team's fleet and show it (otherwise attach to --name)")
    srv.add_argument("--name", default="teamorch", help="named coordinator to attach to")
    srv.add_argument("--address", help="Ray address; default: a private local Ray")
    srv.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    srv.add_argument("--interval", type=float, default=1.0)
    srv.add_argument("--coordinator", metavar="NAME", help=COORDINATOR_HELP)
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
    sim.add_argument(
        "--prefill-tps",
        type=float,
        default=None,
        help="uncached prompt tokens per second (default: free beyond --ttft)",
    )
    sim.add_argument("--max-loaded", type=int, default=None, help="models resident at once, LRU evicted (default: all)")
    sim.add_argument("--load-time", type=float, default=0.0, help="seconds to load a model that is not resident")
    sim.set_defaults(func=cmd_simulate)

    tl = sub.add_parser("timeline", help="draw a run as a Gantt chart per server (HTML, or PNG with matplotlib)")
    tl.add_argument("run", metavar="REPORT_OR_RUN_ID", help="a `teamorch run --json` report, or a journaled run id")
    tl.add_argument("-o", "--output", required=True, help="run.html (self-contained) or run.png (needs matplotlib)")
    tl.add_argument("--plan", help="the plan file the run came from: its dependencies mark the critical path")
    tl.add_argument("--team", help="with --plan: the team YAML the run used (slot counts per server)")
    tl.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    tl.set_defaults(func=cmd_timeline)

    add_team_commands(sub)  # up, status, down
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
