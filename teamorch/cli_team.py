"""`teamorch up | status | down`: a team that stays up between runs (see `teamorch.team`).

Kept out of `teamorch.cli` so the CLI's module stays one screen per command; `cli.build_parser` calls
`add_team_commands`. Nothing here imports Ray at module level: `teamorch validate` stays fast.
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path
from typing import Any

from teamorch.config import TeamConfig, load_team, read_yaml, split_plan_file
from teamorch.errors import ConfigError

DEFAULT_NAME = "teamorch"  # teamorch.api.DEFAULT_NAME, repeated so that this module does not import Ray
PLAN_KEYS = {"problem", "waves", "tasks", "pattern"}  # a plan file, whose `team:` is the team


def _demo_file() -> Path:
    return Path(str(files("teamorch.scenarios").joinpath("complex_error.yaml")))


def default_team() -> TeamConfig:
    """The team a command uses when given none: the embedded fleet and `make demo`'s five analysts."""
    _, team = split_plan_file(_demo_file())
    return team


def team_from(path: str | None) -> TeamConfig:
    """`--team`: a team YAML, or a plan file whose `team:` section is the team; none: `default_team()`."""
    if path is None:
        return default_team()
    if PLAN_KEYS & set(read_yaml(path)):
        return split_plan_file(path)[1]
    return load_team(path)


def team_raw_from(path: str | None) -> dict[str, Any]:
    """The team `team_from(path)` reads, as written (`${ENV}` unexpanded): what `up` records in the cluster."""
    data = read_yaml(path or _demo_file(), expand_env=False)
    if path is None or PLAN_KEYS & set(data):
        return data.get("team") or {}
    return data


def cmd_up(args: argparse.Namespace) -> int:
    from teamorch import team as teams
    from teamorch.cli import EXIT_OK, print_loads

    spec = team_from(args.team).resolved()
    if not spec.specialists:
        raise ConfigError("the team has no specialists: nothing could run on it", field="specialists", file=args.team)
    raw, source = team_raw_from(args.team), args.team or "the default team"
    launched = teams.up(spec, name=args.name, address=args.address, replace=args.replace, raw=raw, source=source)
    if launched.previous:
        print(launched.previous)
    where = f"Ray at {launched.address}"
    if launched.head:
        where += (
            f" (a private head teamorch started; Ray Client at {launched.head.client_address}; "
            f"`teamorch down {args.name} --stop-ray` stops it)"
        )
    print(f"Team {args.name!r} is up on {where}.")
    print(f"  specialists: {', '.join(s.name for s in spec.specialists)}")
    import ray

    print_loads(ray.get(launched.coordinator.servers_load.remote()))
    flag = "" if launched.head or args.address is None else f" --address {args.address}"
    print(f"\nRun plans on it: teamorch run PLAN.yaml --coordinator {args.name}{flag}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from teamorch import team as teams
    from teamorch.cli import EXIT_OK, print_loads

    state = teams.status(args.name, args.address)
    t = state.totals
    print(f"Team {state.name!r}: {t.runs} runs finished, {t.successful_tasks}/{t.total_tasks} tasks succeeded")
    print_loads(state.loads)
    for run in state.runs:
        total = "?" if run.total is None else run.total
        print(f"  run {run.run_id}: {run.status}, {run.done}/{total} tasks done, session {run.sessions}")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from teamorch import team as teams
    from teamorch.cli import EXIT_OK

    head = teams.down(args.name, args.address, stop_ray=args.stop_ray)
    print(f"Team {args.name!r} stopped.")
    if head:
        print(f"Stopped the private Ray head at {head.address}.")
    elif args.stop_ray:
        print("No private Ray head of teamorch's was running (a `ray start` of your own stays up: `ray stop`).")
    return EXIT_OK


def add_team_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `up`, `status` and `down` to the `teamorch` parser's subcommands."""
    address_help = (
        "Ray address (HOST:PORT, ray://HOST:PORT or 'auto'); default: RAY_ADDRESS, the last `ray start` on this "
        "machine, or teamorch's private head"
    )
    up = sub.add_parser("up", help="start a team that stays up (detached coordinator + fleet) and return")
    up.add_argument(
        "--team", help="team YAML, or a plan file with a team: section (default: the embedded fleet, demo roster)"
    )
    up.add_argument("--name", default=DEFAULT_NAME, help="the team's name; runs use it as --coordinator NAME")
    up.add_argument("--address", help=address_help + "; none found: start a private head and leave it running")
    up.add_argument("--replace", action="store_true", help="stop a running team of the same name first")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show a team's fleet (live load table) and run totals")
    st.add_argument("name", nargs="?", default=DEFAULT_NAME)
    st.add_argument("--address", help=address_help)
    st.set_defaults(func=cmd_status)

    dn = sub.add_parser("down", help="stop a team (coordinator, balancer, servers, specialists)")
    dn.add_argument("name", nargs="?", default=DEFAULT_NAME)
    dn.add_argument("--address", help=address_help)
    dn.add_argument("--stop-ray", action="store_true", help="also stop the private Ray head `teamorch up` started")
    dn.set_defaults(func=cmd_down)
