"""Team and plan files: YAML in, validated models out, every error located.

A team is the fleet (`servers`) plus the people (`specialists`). When a team
names no servers, two embedded llama.cpp servers `ollama01` and `ollama02`
start with the Gemma 3 270M model shipped on PyPI, so a laptop with no Ollama
can run every scenario. Secrets stay out of files: any string may use
`${VAR}` or `${VAR:-default}`, resolved from the environment at load time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from teamorch.errors import ConfigError, PlanError
from teamorch.messages import PATTERN_SPECS, OrchestrationPlan, PatternSpec, Policy

EMBEDDED_MODEL = "gemma3:270m"
DEFAULT_SERVER_NAMES = ("ollama01", "ollama02")

# `${VAR}` or `${VAR:-default}`: group 1 the variable, group 2 the default. The journal reads it too, to tell
# which values of a team are secrets.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Model):
    """One model server: where it is, what protocol it speaks, how much it can run at once.

    `slots` must equal the server's OLLAMA_NUM_PARALLEL: the balancer never
    sends more concurrent requests than that, because a loaded Ollama model
    queues the excess without bound and its 503 comes too late. `models: None`
    means "ask the server" (`/api/tags`); a list is trusted as given and lets
    `teamorch validate` catch a specialist whose model no server has.
    """

    name: str = Field(min_length=1)  # how plans (`server:`), reports and the load table name it
    url: str | None = None  # http(s) base URL; required unless `protocol: embedded`
    protocol: Literal["ollama", "openai", "embedded"] = "ollama"  # native /api/chat, /v1/chat/completions, llama.cpp
    slots: int = Field(default=1, ge=1)
    models: list[str] | None = None
    tags: list[str] = Field(default_factory=list)  # what the box offers (gpu, big-context): matched by `requires`
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. Authorization for a proxy; use ${VAR} for secrets
    connect_timeout: float = Field(default=5.0, gt=0)  # seconds: a box that does not answer is down, fail over fast
    read_timeout: float = Field(default=120.0, gt=0)  # seconds of silence mid-stream before a request counts as stalled
    poll_interval: float = Field(default=10.0, gt=0)  # seconds between health and model checks
    # Bytes one response may carry (counted as they arrive): a misbehaving server cannot exhaust the actor's memory.
    max_response_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    model_path: str | None = None  # embedded only: a GGUF file; default the Gemma 3 270M shipped on PyPI
    n_threads: int = Field(default=1, ge=1)  # embedded only: one thread each lets two servers use two cores
    n_ctx: int = Field(default=2048, ge=256)  # embedded only: context window in tokens
    # Ray custom resources the server actor needs, e.g. {ollama_box_1: 1}: the actor (and so its HTTP pool) is
    # placed on the node started with `ray start --resources '{"ollama_box_1": 1}'`, next to that Ollama box.
    ray_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _url_for_network_protocols(self) -> ServerConfig:
        if self.protocol == "embedded":
            if self.slots != 1:
                raise ValueError(
                    f"server {self.name!r}: an embedded server runs one generation at a time; set slots: 1"
                )
            if self.models is None:
                self.models = [EMBEDDED_MODEL]
        elif not self.url:
            raise ValueError(f"server {self.name!r} uses protocol {self.protocol!r} and needs a url")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"server {self.name!r}: url must start with http:// or https://, got {self.url!r}")
        if self.url:
            self.url = self.url.rstrip("/")
        return self


class SpecialistConfig(_Model):
    """A role on the team: who it is (prompt), what it runs on (model), what it is good at.

    The planner reads `capabilities` to pick specialists for tasks, and the
    `capability` balancing policy prefers servers whose `tags` match them;
    `requires` is a hard filter instead (only servers with all those tags).
    """

    name: str = Field(min_length=1)  # what tasks name in `specialist:`
    model: str | None = None  # None: the team's `default_model`
    system_prompt: str = ""  # the role; empty means "You are {name}."
    capabilities: list[str] = Field(default_factory=list)
    requires: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)  # generation options (num_predict, temperature, ...)
    ray_resources: dict[str, float] = Field(default_factory=dict)  # Ray custom resources its actor needs (placement)


class BalancerConfig(_Model):
    """How the balancer chooses a server for each request.

    `peak_ewma` (default) plans the whole queue by expected finish time from
    measured speeds; the others are simpler baselines. `model_affinity`
    prefers servers that already have the model loaded, because a cold load
    can cost more than the request. `backoff_seconds` is how long a server
    that answered 503 (its own queue is full: someone else is using it) runs
    with one slot fewer.

    `hedge` (off by default) cuts the tail: a call that has run past its
    server's `hedge_quantile` of latency for its size gets one duplicate on
    another server with a free slot, and the loser is cancelled
    (`teamorch.policies.hedging`). A server's quantile is trusted once it has
    `hedge_min_samples` answers; no call is hedged before `hedge_min_seconds`,
    because below that a duplicate costs as much as it can save.

    `fleet_memory` is the JSON file where the balancer keeps what it learned
    about each server's speed, so the next run plans with it from its first
    request (`teamorch.policies.fleet.remember`): a path, `true` for
    `.teamorch/fleet.json`, `false` for none. Unset, `teamorch run` keeps it
    next to its runs directory and the Python API keeps none.

    `measure_first` (on by default): before its first plan, the balancer
    has each server it knows nothing about (no fleet memory of it) answer one
    short speed probe (a 32-token prompt, 8 tokens out, with a team model
    the server already holds), so the first requests are placed by measured
    speeds. Without it, each server's first request is its probe, chosen
    before any answer, and which specialist's prompt lands on which server
    (and stays cached there) depends on the order the servers are listed
    (`python -m benchmarks.replay --orders`). A one-server fleet has nothing
    to choose and is not probed.
    """

    policy: Policy = "peak_ewma"
    model_affinity: bool = True
    backoff_seconds: float = Field(default=5.0, ge=0)
    hedge: bool = False
    hedge_quantile: float = Field(default=0.95, ge=0.5, lt=1.0)
    hedge_min_samples: int = Field(default=10, ge=1)
    hedge_min_seconds: float = Field(default=0.1, ge=0)
    fleet_memory: bool | str | None = None
    measure_first: bool = True
    # Runs of two priority classes on one team: how long the batch class may go without a grant while
    # interactive requests are served first (`teamorch.policies.priority`).
    aging_seconds: float = Field(default=30.0, gt=0)
    # "reference" plans the whole queue from scratch on every event (`plan_dispatch`): the benchmarks' baseline.
    planner: Literal["incremental", "reference"] = "incremental"


class RetryConfig(_Model):
    """Failover timing and the circuit breaker (`policies.retry`).

    A failed attempt is retried after an exponential backoff from `base_delay`
    capped at `max_delay` (seconds, with jitter, so specialists do not retry in
    lockstep). After `circuit_failures` consecutive failures a server's
    circuit opens: no requests for `circuit_reset` seconds, then one probe.
    """

    base_delay: float = Field(default=0.2, ge=0)
    max_delay: float = Field(default=5.0, ge=0)
    circuit_failures: int = Field(default=3, ge=1)
    circuit_reset: float = Field(default=30.0, gt=0)


class TeamConfig(_Model):
    """A team: the fleet (`servers`) plus the people (`specialists`), and how work is spread over the fleet.

    No `servers` means the embedded default (two llama.cpp servers); see
    `resolved()`. `default_model` is the model of every specialist that names
    none. `planner` names the specialist that writes plans for `pattern: auto`
    and `teamorch plan` (None: a built-in planner on the default model).
    """

    servers: list[ServerConfig] = Field(default_factory=list)
    specialists: list[SpecialistConfig] = Field(default_factory=list)
    default_model: str | None = None
    planner: str | None = None
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("servers", "specialists")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for item in items:
            if item.name in seen:
                raise ValueError(f"duplicate name {item.name!r}")
            seen.add(item.name)
        return items

    def resolved(self) -> TeamConfig:
        """The team as it will run: default servers filled in, every model named."""
        servers = self.servers or [ServerConfig(name=n, protocol="embedded") for n in DEFAULT_SERVER_NAMES]
        default_model = self.default_model or (EMBEDDED_MODEL if not self.servers else None)
        specialists = []
        for index, spec in enumerate(self.specialists):
            model = spec.model or default_model
            if not model:
                raise ConfigError(
                    f"specialist {spec.name!r} has no model and the team sets no default_model",
                    field=f"specialists[{index}].model",
                )
            specialists.append(spec.model_copy(update={"model": model}))
        if self.planner is not None and self.planner not in {s.name for s in specialists}:
            raise ConfigError(f"planner {self.planner!r} is not one of the specialists", field="planner")
        return self.model_copy(update={"servers": servers, "specialists": specialists, "default_model": default_model})

    def specialist(self, name: str) -> SpecialistConfig:
        for spec in self.specialists:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def merged(self, other: TeamConfig) -> TeamConfig:
        """`other` (a --team file) replaces the fleet and overrides specialists by name.

        This is what lets a scenario that ships its specialists run unchanged on
        a user's own Ollama boxes: their team file brings servers and a
        default_model, the scenario keeps its roles.
        """
        by_name = {s.name: s for s in self.specialists}
        by_name.update({s.name: s for s in other.specialists})
        fields = other.model_fields_set
        return TeamConfig(
            servers=other.servers if other.servers else self.servers,
            specialists=list(by_name.values()),
            default_model=other.default_model or self.default_model,
            planner=other.planner or self.planner,
            balancer=other.balancer if "balancer" in fields else self.balancer,
            retry=other.retry if "retry" in fields else self.retry,
        )


def interpolate(value: Any, path: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; a missing variable is an error at its field."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)", path)

        return ENV_REFERENCE.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_error_from(exc: ValidationError, prefix: str = "") -> ConfigError:
    """Turn pydantic's error list into one message that names the field(s)."""
    errors = exc.errors()
    lines = []
    for err in errors:
        loc = _loc(tuple(err["loc"]))
        field = ".".join(p for p in (prefix, loc) if p) if not loc.startswith("[") else prefix + loc
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] != "value_error" and isinstance(value, str | int | float | bool):
            msg += f", got {value!r}"  # a wrong type or range: say what was there (our own messages already do)
        lines.append((field, msg))
    first_field, first_msg = lines[0]
    if len(lines) > 1:
        first_msg += "; also " + "; ".join(f"{f}: {m}" for f, m in lines[1:])
    return ConfigError(first_msg, field=first_field or None)


def read_yaml(path: str | Path, expand_env: bool = True) -> dict[str, Any]:
    """Read a YAML mapping; syntax errors name the line and column.

    `expand_env=False` keeps `${VAR}` as written: what a run journal stores, so its copy holds no secret.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror}", file=file) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", field=where, file=file) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", file=file)
    if not expand_env:
        return data
    try:
        return interpolate(data)
    except ConfigError as exc:
        raise exc.located(file) from None


def parse_team(data: dict[str, Any], file: str | None = None, prefix: str = "") -> TeamConfig:
    try:
        return TeamConfig.model_validate(data)
    except ValidationError as exc:
        err = config_error_from(exc, prefix)
        raise (err.located(file) if file else err) from None


def load_team(path: str | Path) -> TeamConfig:
    return parse_team(read_yaml(path), str(path))


def parse_plan(data: dict[str, Any], file: str | None = None) -> OrchestrationPlan:
    """Validate a plan mapping (no `team:` key) and locate any error in `file`."""
    try:
        return OrchestrationPlan.model_validate(data)
    except ValidationError as exc:
        err = config_error_from(exc)
        raise (err.located(file) if file else err) from None
    except ConfigError as exc:
        raise (exc.located(file) if file else exc) from None


def parse_pattern(data: dict[str, Any], file: str | None = None) -> PatternSpec:
    """Validate a `pattern:` plan (parallel_analysis, divide_and_conquer, pipeline, consensus, auto)."""
    name = data.get("pattern")
    if name not in PATTERN_SPECS:
        err = ConfigError(f"unknown pattern {name!r}; use one of {', '.join(PATTERN_SPECS)}", field="pattern")
        raise (err.located(file) if file else err)
    try:
        return PATTERN_SPECS[name].model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        err = config_error_from(exc)
        raise (err.located(file) if file else err) from None


def split_plan_file(path: str | Path, team_path: str | Path | None = None) -> tuple[dict[str, Any], TeamConfig]:
    """Read a plan file: its plan mapping, and its team (embedded `team:` merged with `--team`)."""
    file = str(path)
    data = read_yaml(path)
    team_data = data.pop("team", None) or {}
    if not isinstance(team_data, dict):
        raise ConfigError("expected a mapping", field="team", file=file)
    team = parse_team(team_data, file, prefix="team")
    if team_path is not None:
        team = team.merged(load_team(team_path))
    return data, team


def check_plan_against_team(plan: OrchestrationPlan | None, team: TeamConfig, file: str | None = None) -> TeamConfig:
    """Everything a plan names must exist in the team; returns the resolved team.

    Checked before any actor starts, so a typo costs milliseconds, not a run.
    """
    try:
        resolved = team.resolved()
    except ConfigError as exc:
        raise (exc.located(file) if file else exc) from None
    names = [s.name for s in resolved.specialists]
    servers = {s.name: s for s in resolved.servers}
    for index, task in enumerate(plan.tasks if plan else []):
        if task.specialist not in names:
            raise PlanError(
                f"task {task.task_id!r} names unknown specialist {task.specialist!r}; the team has: {', '.join(names) or 'none'}",
                field=f"tasks[{index}].specialist",
                file=file,
            )
        if task.server is not None and task.server not in servers:
            raise PlanError(
                f"task {task.task_id!r} is pinned to unknown server {task.server!r}; the team has: {', '.join(servers)}",
                field=f"tasks[{index}].server",
                file=file,
            )
    for index, spec in enumerate(resolved.specialists):
        known = [s for s in resolved.servers if s.models is not None]
        if known and len(known) == len(resolved.servers) and not any(spec.model in (s.models or []) for s in known):
            raise ConfigError(
                f"specialist {spec.name!r} needs model {spec.model!r} but no server lists it "
                f"(servers have: {sorted({m for s in known for m in s.models or []})})",
                field=f"specialists[{index}].model",
                file=file,
            )
    return resolved
