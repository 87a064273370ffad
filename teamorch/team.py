"""A team that stays up: one detached, named coordinator per team on a running Ray, shared by every process.

A cold `teamorch run` pays for Ray's start and one worker process per actor (~15 s on 2 cores) before
its first request; `up` pays that once and leaves the team running, so a run against it costs a
connection (~0.3 s) and an actor lookup. Every process that runs plans on one team shares its
balancer, so each server's `slots` hold fleet-wide, not per run; each run keeps its own id, journal
and report.

Lifetimes: the coordinator is detached, so it outlives the process that ran `up`. It creates its
servers, balancer and specialists itself, which makes it their owner, and Ray keeps an actor alive
exactly as long as its owner: the fleet survives the `up` process (tests/test_team.py checks it) and
dies with the coordinator. So `down`, or a crash of the coordinator, takes the whole team, and
nothing is left running by accident.

The team's config outlives its coordinator: `up` records the team as written (`${ENV}` references
unexpanded, so the cluster holds no secret) in Ray's GCS key-value store, which every driver, actor and
`ray://` client of the cluster reads (Ray's job submission keeps its records there too). A run on a
team whose coordinator died (`join`) starts a new one from that record, and the run journal makes
resuming on it safe; `down` deletes the record, so a team stopped on purpose stays stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from pydantic import BaseModel
from ray.actor import ActorHandle
from ray.experimental import internal_kv

from teamorch.api import DEFAULT_NAME, NAMESPACE, start_coordinator, stop_coordinator
from teamorch.cluster import Head, connect, find_cluster, running_head, start_head, stop_head
from teamorch.config import TeamConfig, interpolate, parse_team
from teamorch.errors import ConfigError, TeamorchError
from teamorch.journal import RunState
from teamorch.messages import RunTotals, ServerLoad

KV_NAMESPACE = "teamorch_teams"  # Ray GCS key-value namespace of the teams' records (key: the team's name)


@dataclass(frozen=True)
class Launched:
    """What `up` did: the coordinator, where it runs, the private head it started (if any), and what it replaced."""

    coordinator: ActorHandle
    address: str
    head: Head | None
    previous: str | None


@dataclass(frozen=True)
class Attached:
    """A team that is up, as a run uses it: its coordinator and config, the team as `up` recorded it (`${ENV}`
    unexpanded; None for a team started without a record), and the line to print if a dead one was replaced."""

    coordinator: ActorHandle
    config: TeamConfig
    raw: dict[str, Any] | None
    replaced: str | None


class TeamRecord(BaseModel):
    """What `up` leaves in the cluster so the team can be started again without the file it came from."""

    team: dict[str, Any]  # as written: `${ENV}` references stay unexpanded, expanded by whoever starts it
    source: str  # the file it was read from, for messages
    max_workers: int | None = None

    def config(self, name: str) -> TeamConfig:
        where = f"team {name!r} as `teamorch up` recorded it (from {self.source})"
        try:
            return parse_team(interpolate(self.team), where).resolved()
        except ConfigError as exc:
            raise exc.located(where) from None


@dataclass(frozen=True)
class TeamStatus:
    name: str
    loads: list[ServerLoad]
    totals: RunTotals
    runs: list[RunState]  # in progress first, then the last finished ones the coordinator keeps


def locate() -> str | None:
    """The Ray cluster a team command means when given no address: RAY_ADDRESS, the last `ray start`
    on this machine, or the private head teamorch started."""
    head = running_head()
    return find_cluster() or (head.address if head else None)


def up(
    team: TeamConfig,
    name: str = DEFAULT_NAME,
    address: str | None = None,
    replace: bool = False,
    max_workers: int | None = None,
    raw: dict[str, Any] | None = None,
    source: str = "",
) -> Launched:
    """Start team `name` as a detached coordinator (and its fleet) on a running Ray, or on a private head.

    With no `address` and no Ray to be found (`locate`), a private head is started and left running.
    A team of that name already up is an error unless `replace`; a dead one is replaced, and
    `Launched.previous` says how it died. `raw` is the team as written in `source` (`${ENV}`
    unexpanded): recorded in the cluster, so that a run finding the coordinator dead can start it
    again (`join`); without it, no record is kept (nor an older one of the same name).
    """
    head = None
    if address is None and (address := locate()) is None:
        head = start_head()
        address = head.address
    joined = connect(address, NAMESPACE)
    previous = _clear_name(name, replace)
    handle = start_coordinator(team, name=name, detached=True, max_workers=max_workers)
    if raw is None:
        forget(name)
    else:
        _record_put(name, TeamRecord(team=raw, source=source, max_workers=max_workers))
    return Launched(handle, joined, head, previous)


def join(name: str = DEFAULT_NAME, address: str | None = None) -> Attached:
    """`attach` for a run: a team whose coordinator died is started again from its record first.

    No live coordinator and no record (never up, or stopped with `down`) is bad input: a ConfigError on
    `--coordinator`. Two processes finding the team dead at once start one coordinator between them.
    """
    connect(_where(address), NAMESPACE)
    record = recorded(name)
    replaced = None
    try:
        coordinator = get_coordinator(name)
    except TeamorchError as exc:
        if record is None:
            raise ConfigError(str(exc), field="--coordinator") from None
        coordinator, replaced = _revive(name, record)
    config = ray.get(coordinator.config.remote())
    return Attached(coordinator, config, record.team if record else None, replaced)


def _revive(name: str, record: TeamRecord) -> tuple[ActorHandle, str]:
    team = record.config(name)
    cause = _death(name, NAMESPACE, stopped=True) or "no cause recorded"
    try:
        handle = start_coordinator(team, name=name, detached=True, max_workers=record.max_workers)
    except ValueError:  # the name is taken: another process replaced the coordinator a moment ago
        return get_coordinator(name), f"team {name!r} was down; another process has just started it again"
    return handle, (
        f"team {name!r} was down (its coordinator died: {cause}); started it again from the team "
        f"`teamorch up` recorded ({record.source})"
    )


def recorded(name: str) -> TeamRecord | None:
    """The record `up` left for team `name` in the cluster's key-value store (Ray's GCS), if any."""
    value = internal_kv._internal_kv_get(name, namespace=KV_NAMESPACE)
    return TeamRecord.model_validate_json(value) if value else None


def forget(name: str) -> bool:
    """Delete team `name`'s record; returns whether there was one."""
    return bool(internal_kv._internal_kv_del(name, namespace=KV_NAMESPACE))


def _record_put(name: str, record: TeamRecord) -> None:
    internal_kv._internal_kv_put(name, record.model_dump_json(), overwrite=True, namespace=KV_NAMESPACE)


def attach(name: str = DEFAULT_NAME, address: str | None = None) -> ActorHandle:
    """Join the cluster the team runs on and return its coordinator: what `teamorch run --coordinator` uses.

    Fast by design (~0.3 s after `import ray`): no actor starts, one probe, one lookup.
    """
    connect(_where(address), NAMESPACE)
    return get_coordinator(name)


def get_coordinator(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> ActorHandle:
    """The coordinator of team `name`, from any driver, Ray actor or `ray://` client joined to its cluster."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    start = f"`teamorch up --name {name} --team TEAM.yaml`"
    died = _death(name, namespace)
    if died:
        raise TeamorchError(f"team {name!r} is down: its coordinator died ({died}); start it again with {start}")
    raise TeamorchError(f"no team {name!r} is up on this Ray cluster (namespace {namespace!r}): start one with {start}")


def down(name: str = DEFAULT_NAME, address: str | None = None, stop_ray: bool = False) -> Head | None:
    """Stop team `name` (coordinator and fleet); with `stop_ray`, also the private head teamorch started.

    Returns the head it stopped, if any. A team that is not up is an error, unless `stop_ray` has a
    head to stop.
    """
    where = address or locate()
    if where is None and stop_ray:  # no Ray to find the team on, and so no head of teamorch's either
        return stop_head()
    connect(_where(where), NAMESPACE)
    had_record = forget(name)  # stopped on purpose: no run may start it again
    try:
        stop_coordinator(get_coordinator(name))
    except TeamorchError:
        if not (had_record or (stop_ray and running_head())):
            raise
    if not stop_ray:
        return None
    ray.shutdown()
    return stop_head()


def _where(address: str | None) -> str:
    where = address or locate()
    if where is None:
        raise TeamorchError(
            "no Ray cluster found to look for the team on: pass --address HOST:PORT (or set RAY_ADDRESS), "
            "or start a team with `teamorch up`"
        )
    return where


def status(name: str = DEFAULT_NAME, address: str | None = None) -> TeamStatus:
    coordinator = attach(name, address)
    refs = [coordinator.servers_load.remote(), coordinator.statistics.remote(), coordinator.runs.remote()]
    loads, totals, runs = ray.get(refs)
    return TeamStatus(name=name, loads=loads, totals=totals, runs=runs)


def death_of(name: str, namespace: str = NAMESPACE, stopped: bool = False) -> str | None:
    """Why the last actor named `name` died, unless it was stopped on purpose (`down`, `--replace`, `ray.kill`)
    and `stopped` is False.

    Read from the GCS actor table (`ray._private.state`): Ray's public state API needs the dashboard,
    which a private head does not run.
    """
    latest: tuple[int, str] | None = None
    for record in ray._private.state.actors().values():
        context = record["DeathCause"].actor_died_error_context
        if record["State"] != "DEAD" or context.name != name or context.ray_namespace != namespace:
            continue
        if latest is None or record["EndTime"] > latest[0]:
            intentional = type(context).Reason.Name(context.reason) == "RAY_KILL" and not stopped
            latest = (record["EndTime"], "" if intentional else context.error_message)
    return (latest[1] or None) if latest else None


def _death(name: str, namespace: str, stopped: bool = False) -> str | None:
    if ray.util.client.ray.is_connected():  # a `ray://` client: the actor table is read on the cluster
        return ray.get(ray.remote(num_cpus=0)(death_of).remote(name, namespace, stopped))
    return death_of(name, namespace, stopped)


def _clear_name(name: str, replace: bool) -> str | None:
    """Make `name` free for a new coordinator; returns what happened to the one before, if worth saying."""
    try:
        existing = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        died = _death(name, NAMESPACE)
        return f"the previous coordinator of team {name!r} had died ({died}); started a new one" if died else None
    if not replace:
        raise TeamorchError(
            f"team {name!r} is already up on this cluster: run plans on it (--coordinator {name}), "
            f"stop it (`teamorch down {name}`), or start it again with --replace"
        )
    stop_coordinator(existing)
    return f"replaced the running team {name!r}"
