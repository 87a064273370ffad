"""Joining a Ray cluster in seconds, token authentication included; the private head `teamorch up` starts.

Ray 2.60 runs a head with token authentication whenever a token exists where `ray start --head` runs
(`~/.ray/auth_token`; `ray.init()`'s own local cluster writes one). A driver that joins by explicit
address sends no token unless `RAY_AUTH_MODE=token` was set before Ray read its config: it retries for
20 s, then fails with a bare `ConnectionError` (measured). The reverse fails too, later and worse: a
token-mode driver joins a cluster without authentication, but the actors it creates die before they
run. So `connect` asks the cluster one cheap question first (the GCS; or, for `ray://`, the Ray Client
server), a few ms with a 3 s deadline; only if the cluster wants a token does it switch token mode on
(when this machine has one) and ask again; and "nothing there" and "token missing or wrong" become
errors that say what to set.

A private head is `ray start --head --block` in a session of its own: that process owns every Ray
process of the head and takes them all down on SIGTERM, so `teamorch down --stop-ray` stops exactly
the head teamorch started (`ray stop` would kill every Ray process on the machine, other users'
included). Its pid and addresses are kept in `$TEAMORCH_HOME/head.json` (default `~/.teamorch`).

Ray internals used, each in one place here: `ray._raylet`'s token loader and config (to switch token
mode on after `import ray`), and Ray's gRPC channel and generated stubs for the probe (the GCS's
`GetClusterId`, the first call of every driver; the Ray Client's PING).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from teamorch.errors import TeamorchError

PROBE_TIMEOUT = 3.0  # seconds: a head that needs longer than this to answer one RPC is not worth waiting for
HEAD_PORT, CLIENT_PORT = 6379, 10001  # Ray's defaults: what `ray start --address` and `ray://` users expect
TOKEN_HELP = (
    "copy the head node's ~/.ray/auth_token to ~/.ray/auth_token here (or set RAY_AUTH_TOKEN=<token>, or "
    "RAY_AUTH_TOKEN_PATH=<file>); teamorch then sets RAY_AUTH_MODE=token itself"
)


# ---------------------------------------------------------------------------------------------- joining


def connect(address: str | None, namespace: str, num_cpus: int | None = None) -> str:
    """Join the Ray cluster at `address` ('auto', 'HOST:PORT' or 'ray://HOST:PORT'), or start a private one.

    `address=None` (or 'local') always starts a fresh in-process instance, even if RAY_ADDRESS is set,
    so a plain `teamorch run` never lands on somebody else's cluster by accident. Joining fails within
    seconds, with what to do, when nothing answers or the cluster rejects this machine's token.
    Returns the address joined ('local' for a private instance, or when this process had joined already).
    """
    if ray.is_initialized():
        return "local" if address is None else address
    kwargs: dict[str, Any] = {"namespace": namespace, "logging_level": "ERROR"}
    if address in (None, "local"):
        kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus or os.cpu_count() or 1)
    else:
        kwargs["address"] = resolve_address(address)
        authenticate(kwargs["address"])
    if not str(kwargs["address"]).startswith("ray://"):
        kwargs["log_to_driver"] = False  # actors' logs stay in Ray's log files, not on the user's terminal
    try:
        _init(kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"join the Ray cluster at {kwargs['address']!r}" if address else "start a local Ray instance"
        raise TeamorchError(f"cannot {where}: {exc}") from exc
    return str(kwargs["address"])


def _init(kwargs: dict[str, Any]) -> None:
    try:
        ray.init(**kwargs)
    except Exception:
        if not str(kwargs["address"]).startswith("ray://"):
            raise
        # Ray 2.60's Ray Client proxy spawns one server process per client, and about 2 in 5 first
        # connections to a fresh head lose it (it dies as it starts; Ray reports it after 30-40 s,
        # measured). A second connection has always worked.
        ray.shutdown()
        ray.init(**kwargs)


def find_cluster() -> str | None:
    """The cluster `address='auto'` means, if one answers: RAY_ADDRESS, else the last `ray start` here.

    Unlike Ray's own 'auto', a Ray that some process started for itself (a `teamorch run`, a test
    session) is never picked: a long-lived team must not land on a cluster that is about to go away.
    """
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    from ray._common.utils import get_ray_address_file  # where `ray start` records its GCS address

    path = Path(get_ray_address_file(None))
    recorded = path.read_text().strip() if path.exists() else ""
    return recorded if recorded and _listening(recorded) else None


def resolve_address(address: str) -> str:
    if address != "auto":
        return address
    found = find_cluster()
    if found is None:
        raise TeamorchError(
            "no running Ray cluster found (RAY_ADDRESS is unset and no `ray start` on this machine answers): "
            "start one with `ray start --head` (or let `teamorch up` start one), or pass --address HOST:PORT"
        )
    return found


def token_available() -> bool:
    """Whether Ray finds a token here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def authenticate(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Make sure this process may join the cluster at `address`: raise TeamorchError within seconds if not.

    Token mode is switched on only when the cluster asks for a token (and RAY_AUTH_MODE is unset): a
    token-mode driver joins a cluster without authentication but cannot create actors there (measured:
    they die "before they started running").
    """
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise TeamorchError(
            f"nothing answers at {address} ({exc.strerror or exc}): is Ray running there "
            f"(`ray start --head`), and is port {port} open from this machine?"
        ) from None
    if _answers(address, timeout):
        return
    if os.environ.get("RAY_AUTH_MODE") is None and token_available():
        _token_mode_on()
        if _answers(address, timeout):
            return
    raise TeamorchError(_auth_message(address))


def _token_mode_on() -> None:
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"  # inherited by the `ray` commands this process may run
    Config.initialize("")  # Ray read RAY_AUTH_MODE when it was imported: make it read it again


def _answers(address: str, timeout: float) -> bool:
    """One cheap RPC, the first a driver or a Ray Client sends; False if the cluster wants a (another) token.

    Plain gRPC rather than Ray's GcsClient, whose C++ logs a warning for every refused attempt.
    """
    import grpc
    from ray._private.grpc_utils import init_grpc_channel  # adds the token header in token mode

    client = address.startswith("ray://")
    channel = init_grpc_channel(address.removeprefix("ray://"), asynchronous=False)
    try:
        _ping(channel, client, timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        what = "Ray Client server" if client else "Ray head"
        raise TeamorchError(f"the {what} at {address} did not answer within {timeout:g}s: {exc.details()}") from None
    finally:
        channel.close()
    return True


def _ping(channel: Any, client: bool, timeout: float) -> None:
    if client:
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout)
    else:
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        request = gcs_service_pb2.GetClusterIdRequest()
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(request, timeout=timeout)


def _auth_message(address: str) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return f"the Ray cluster at {address} rejected this machine's token: {TOKEN_HELP}"
    if token_available():  # RAY_AUTH_MODE says otherwise although a token is here
        return f"the Ray cluster at {address} requires token authentication: unset RAY_AUTH_MODE or set it to 'token'"
    return f"the Ray cluster at {address} requires token authentication and this machine has no token: {TOKEN_HELP}"


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise TeamorchError(f"not a Ray address: {address!r} (expected HOST:PORT, ray://HOST:PORT or 'auto')")
    return host.strip("[]"), int(port)


def _listening(address: str) -> bool:
    try:
        socket.create_connection(_host_port(address), timeout=1.0).close()
    except (OSError, TeamorchError):
        return False
    return True


# ----------------------------------------------------------------------------------------- private head


@dataclass(frozen=True)
class Head:
    """A Ray head teamorch started: `pid` of its `ray start --block`, its GCS `address`, its `ray://` address."""

    pid: int
    address: str
    client_address: str
    log: str


def home() -> Path:
    return Path(os.environ.get("TEAMORCH_HOME") or Path.home() / ".teamorch")


def _head_file() -> Path:
    return home() / "head.json"


def running_head() -> Head | None:
    """The private head teamorch started, if its `ray start` process is still alive."""
    path = _head_file()
    if not path.exists():
        return None
    head = Head(**json.loads(path.read_text()))
    if _alive(head.pid):
        return head
    path.unlink(missing_ok=True)
    return None


def start_head(port: int | None = None, client_port: int | None = None, timeout: float = 90.0) -> Head:
    """Start a Ray head in the background that outlives this process; returns once it takes drivers.

    Flags and why: `--block` (the process that owns the head, so stopping it stops exactly this head),
    no dashboard (a process and ~130 MB nobody asked for; the team's load table is `teamorch status`),
    no usage stats, token authentication on unless RAY_AUTH_MODE=disabled (a token is generated if this
    machine has none): the GCS listens on every interface, and the token is what keeps strangers from
    running code on it.
    Ports: Ray's defaults (GCS 6379, Ray Client 10001) when free, else free ones.
    """
    ray_bin = Path(sys.executable).with_name("ray")
    ray_cmd = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    if ray_cmd is None:
        raise TeamorchError("cannot start a Ray head: the `ray` command is not installed next to this Python")
    _ensure_token(ray_cmd)
    port = port or _free_port(HEAD_PORT)
    client_port = client_port or _free_port(CLIENT_PORT)
    log = home() / "ray-head.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ray_cmd, "start", "--head", f"--port={port}", f"--ray-client-server-port={client_port}"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", "--block"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    ip = ray.util.get_node_ip_address()
    head = Head(pid=proc.pid, address=f"{ip}:{port}", client_address=f"ray://{ip}:{client_port}", log=str(log))
    _head_file().write_text(json.dumps(asdict(head)))  # before waiting: an interrupted `up` can still stop it
    try:
        _wait_ready(proc, log, head, timeout)
    except BaseException:
        proc.terminate()
        _head_file().unlink(missing_ok=True)
        raise
    return head


def stop_head(timeout: float = 45.0) -> Head | None:
    """Stop the private head (SIGTERM: Ray drains the node, up to 30 s, then stops); None if none runs."""
    head = running_head()
    if head is None:
        return None
    os.kill(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(head.pid):
        os.kill(head.pid, signal.SIGKILL)  # its Ray processes die with it (Ray ties them to their parent)
    _head_file().unlink(missing_ok=True)
    from ray._common.utils import get_ray_address_file

    recorded = Path(get_ray_address_file(None))  # as `ray stop` does: 'auto' must not find a head that is gone
    if recorded.exists() and recorded.read_text().strip() == head.address:
        recorded.unlink()
    return head


def _ensure_token(ray_cmd: str) -> None:
    if token_available() or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    subprocess.run([ray_cmd, "get-auth-token", "--generate"], check=True, capture_output=True)
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()  # `ray start` finds the new token itself


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, head: Head, timeout: float) -> None:
    """Wait for `ray start` to report the head up (its last line before blocking) and for the Ray Client
    server, a process of its own that binds its port later (measured), to take connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            raise TeamorchError(f"`ray start --head` exited with code {proc.returncode}; its log ({log}):\n{tail}")
        if "Ray runtime started" in log.read_text(errors="replace") and _listening(head.client_address):
            return
        time.sleep(0.2)
    raise TeamorchError(f"the Ray head did not start within {timeout:g}s; see {log}")


def _free_port(preferred: int) -> int:
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise TeamorchError("no free TCP port for the Ray head")


def _alive(pid: int) -> bool:
    """Whether `pid` is still a `ray start` process (not a recycled pid, not a zombie)."""
    import psutil  # vendored by Ray (ray/thirdparty_files, on sys.path once ray is imported)

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "start" in proc.cmdline()
    except psutil.Error:
        return False
