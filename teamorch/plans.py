"""Plan files -> something runnable, validated before anything starts.

Kept apart from `teamorch.api` (which needs Ray) so `teamorch validate`, the
journal and the tests can load and check a plan without a cluster: everything
a run would trip over later is checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teamorch.config import (
    TeamConfig,
    check_plan_against_team,
    parse_pattern,
    parse_plan,
    read_yaml,
    split_plan_file,
)
from teamorch.errors import ConfigError
from teamorch.messages import AutoSpec, OrchestrationPlan, PatternSpec
from teamorch.policies.planning import build_plan, check_limits
from teamorch.policies.synthesis import resolve_strategy

Runnable = OrchestrationPlan | PatternSpec


def load_plan(
    path: str | Path, team_path: str | Path | None = None, team: TeamConfig | None = None
) -> tuple[Runnable, TeamConfig]:
    """Read and fully validate a plan file (and optional team file) without starting anything.

    Returns an `OrchestrationPlan` (explicit tasks/waves) or a pattern spec
    (`pattern:` files), and the resolved team. Everything a run would trip
    over later is checked here, including that a custom `synthesis_strategy`
    imports: `teamorch validate` and `teamorch run` fail before any model call.
    `team`, when given, is the team the plan will run on instead of the file's
    own (a team that is up: `Coordinator.config()`); the file's `team:` and
    `team_path` are then still read and checked, but not run.
    """
    file = str(path)
    data, own = split_plan_file(path, team_path)
    team = team or own
    _inline_files(data, Path(path))
    if "pattern" not in data:
        plan = parse_plan(data, file)
        _check(plan, plan.synthesis_strategy, file)
        return plan, check_plan_against_team(plan, team, file)
    spec = parse_pattern(data, file)
    if isinstance(spec, AutoSpec):
        _check(None, spec.synthesis_strategy, file)
        return spec, check_plan_against_team(None, team, file)
    try:
        shape = build_plan(spec)
    except ConfigError as exc:
        raise exc.located(file) from None
    _check(shape, spec.synthesis_strategy, file)
    return spec, check_plan_against_team(shape, team, file)


def read_plan_raw(path: str | Path) -> dict[str, Any]:
    """The plan file as written (`${ENV}` unexpanded, its `team:` kept), with `context_files` and
    `item_files` inlined: the self-contained copy a run journal keeps, so `teamorch resume` needs
    neither the environment's secrets in the file nor the files next to it."""
    data = read_yaml(path, expand_env=False)
    _inline_files(data, Path(path))
    return data


def _check(plan: OrchestrationPlan | None, strategy: str | None, file: str) -> None:
    """What the coordinator would refuse, refused here: too many tasks, and a strategy that is not
    built in or a `module:function` that imports from here and is callable."""
    try:
        if plan is not None:
            check_limits(plan)
        if strategy is not None:
            resolve_strategy(strategy)
    except ConfigError as exc:
        raise exc.located(file) from None


def expand(runnable: Runnable) -> OrchestrationPlan | None:
    """The plan a runnable stands for (None for `auto`, which the planner writes at run time)."""
    if isinstance(runnable, OrchestrationPlan):
        return runnable
    return None if isinstance(runnable, AutoSpec) else build_plan(runnable)


def _inline_files(data: dict[str, Any], plan_path: Path) -> None:
    _inline_context_files(data, plan_path)
    if "pattern" in data:
        _inline_item_files(data, plan_path)


def _inline_item_files(data: dict[str, Any], plan_path: Path) -> None:
    """`item_files: [glob, ...]` (relative to the plan file) become items {name, content}, sorted by path."""
    patterns = data.pop("item_files", None) or []
    if not isinstance(patterns, list):
        raise ConfigError("expected a list of glob patterns", field="item_files", file=str(plan_path))
    items = list(data.get("items") or [])
    for index, pattern in enumerate(patterns):
        matches = sorted(p for p in plan_path.parent.glob(str(pattern)) if p.is_file())
        if not matches:
            raise ConfigError(f"no file matches {pattern!r}", field=f"item_files[{index}]", file=str(plan_path))
        for match in matches:
            rel = match.relative_to(plan_path.parent).as_posix()
            items.append({"name": rel, "content": match.read_text(encoding="utf-8")})
    if patterns:
        data["items"] = items


def _inline_context_files(data: dict[str, Any], plan_path: Path) -> None:
    """`context_files: {name: relative/path}` puts each file's text into `context[name]`."""
    files = data.pop("context_files", None) or {}
    if not isinstance(files, dict):
        raise ConfigError("expected a mapping of name: path", field="context_files", file=str(plan_path))
    context = data.setdefault("context", {})
    for name, rel in files.items():
        target = (plan_path.parent / str(rel)).resolve()
        try:
            context[name] = target.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read {target}: {exc.strerror}", field=f"context_files.{name}", file=str(plan_path)
            ) from exc
