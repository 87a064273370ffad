"""Exceptions users catch, each naming *where* the problem is.

They cross Ray process boundaries, so every constructor argument is passed to
`super().__init__` (Ray re-creates exceptions from `args` when unpickling).
`PlanError` and `ConfigError` deliberately do not subclass `ValueError`: pydantic
would otherwise fold them into a `ValidationError` and lose the field path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teamorch.messages import ErrorClass


class TeamorchError(Exception):
    """Base class for every error teamorch raises on purpose."""


class ConfigError(TeamorchError):
    """Invalid team or plan input; the CLI maps it to exit code 2."""

    def __init__(self, message: str, field: str | None = None, file: str | None = None) -> None:
        super().__init__(message, field, file)
        self.message = message
        self.field = field
        self.file = file

    def located(self, file: str) -> ConfigError:
        return type(self)(self.message, self.field, self.file or file)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.field) if part)
        return f"{where}: {self.message}" if where else self.message


class PlanError(ConfigError):
    """A plan that cannot run: duplicate ids, unknown dependencies, cycles, unknown specialists."""


class ServerError(TeamorchError):
    """A model server failed one request. `retry_elsewhere` drives failover."""

    retry_elsewhere = True
    error_class: ErrorClass = "error"

    def __init__(self, server: str, message: str, status: int | None = None) -> None:
        super().__init__(server, message, status)
        self.server = server
        self.message = message
        self.status = status

    def __str__(self) -> str:
        code = f" (HTTP {self.status})" if self.status else ""
        return f"server {self.server!r}{code}: {self.message}"


class ServerUnreachable(ServerError):
    """Connection refused, DNS failure or connection dropped: the box is down."""

    error_class: ErrorClass = "unreachable"


class ServerBusy(ServerError):
    """HTTP 503: Ollama's queue is full. Back-pressure, not a task failure."""

    error_class: ErrorClass = "busy"


class ModelNotFound(ServerError):
    """HTTP 404: this server lacks the model. Never retry the same server."""

    error_class: ErrorClass = "model_not_found"


class MalformedResponse(ServerError):
    """The server answered something that is not the protocol (bad JSON, no final line)."""

    error_class: ErrorClass = "malformed"


class ServerTimeout(ServerError):
    """No answer within the task's deadline."""

    error_class: ErrorClass = "timeout"


def server_error(error_class: ErrorClass, server: str, message: str, status: int | None = None) -> ServerError:
    """The `ServerError` subclass of `error_class`, rebuilt where an error crossed an actor boundary as data
    (a batched call's outcome, `ModelServer.chat_many`)."""
    kinds = (ServerUnreachable, ServerBusy, ModelNotFound, MalformedResponse, ServerTimeout)
    kind = next((k for k in kinds if k.error_class == error_class), ServerError)
    return kind(server, message, status)


class NoServerAvailable(TeamorchError):
    """No server can ever take this request (model missing everywhere, all excluded or broken)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RunInterrupted(TeamorchError):
    """The coordinator died mid-run; `finished` holds every result that had completed."""

    def __init__(self, message: str, finished: list[Any]) -> None:
        super().__init__(message, finished)
        self.message = message
        self.finished = finished

    def __str__(self) -> str:
        return self.message


class RunCancelled(RunInterrupted):
    """The user interrupted the run (Ctrl-C); in-flight requests were cancelled."""


def unwrap(exc: BaseException) -> BaseException:
    """The exception an actor raised, without Ray's `RayTaskError` wrapper around it."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) and exc.__class__.__name__.startswith("RayTaskError") else exc
