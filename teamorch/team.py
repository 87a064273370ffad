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
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.actor import ActorHandle

from teamorch.api import DEFAULT_NAME, NAMESPACE, start_coordinator, stop_coordinator
from teamorch.cluster import Head, connect, find_cluster, running_head, start_head, stop_head
from teamorch.config import TeamConfig
from teamorch.errors import TeamorchError
from teamorch.journal import RunState
from teamorch.messages import RunTotals, ServerLoad


@dataclass(frozen=True)
class Launched:
    """What `up` did: the coordinator, where it runs, the private head it started (if any), and what it replaced."""

    coordinator: ActorHandle
    address: str
    head: Head | None
    previous: str | None


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
) -> Launched:
    """Start team `name` as a detached coordinator (and its fleet) on a running Ray, or on a private head.

    With no `address` and no Ray to be found (`locate`), a private head is started and left running.
    A team of that name already up is an error unless `replace`; a dead one is replaced, and
    `Launched.previous` says how it died.
    """
    head = None
    if address is None and (address := locate()) is None:
        head = start_head()
        address = head.address
    joined = connect(address, NAMESPACE)
    previous = _clear_name(name, replace)
    handle = start_coordinator(team, name=name, detached=True, max_workers=max_workers)
    return Launched(handle, joined, head, previous)


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
    try:
        stop_coordinator(get_coordinator(name))
    except TeamorchError:
        if not (stop_ray and running_head()):
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


def death_of(name: str, namespace: str = NAMESPACE) -> str | None:
    """Why the last actor named `name` died, unless it was stopped on purpose (`down`, `--replace`, `ray.kill`).

    Read from the GCS actor table (`ray._private.state`): Ray's public state API needs the dashboard,
    which a private head does not run.
    """
    latest: tuple[int, str] | None = None
    for record in ray._private.state.actors().values():
        context = record["DeathCause"].actor_died_error_context
        if record["State"] != "DEAD" or context.name != name or context.ray_namespace != namespace:
            continue
        if latest is None or record["EndTime"] > latest[0]:
            intentional = type(context).Reason.Name(context.reason) == "RAY_KILL"
            latest = (record["EndTime"], "" if intentional else context.error_message)
    return (latest[1] or None) if latest else None


def _death(name: str, namespace: str) -> str | None:
    if ray.util.client.ray.is_connected():  # a `ray://` client: the actor table is read on the cluster
        return ray.get(ray.remote(num_cpus=0)(death_of).remote(name, namespace))
    return death_of(name, namespace)


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
