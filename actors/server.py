"""One model server as a Ray actor: it owns the connection pool and nothing else.

Keeping the httpx clients (or the llama.cpp context) inside one actor
means one event loop owns it, connections are reused across every specialist,
and a stuck server can only ever block its own actor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict
from ray.actor import ActorHandle

from teamorch.actors import KeyedJobs, settle_heap
from teamorch.actors.backends import TokenSink, make_backend
from teamorch.config import ServerConfig
from teamorch.errors import ServerError
from teamorch.journal import TokensGenerated
from teamorch.messages import ChatRequest, ChatResponse, ErrorClass, ProbeResult
from teamorch.policies.progress import ProgressThrottle

# Answers kept by key after they were sent: long enough for a restarted specialist to ask again (seconds), bounded
# because each can be up to `max_response_bytes`.
ANSWERS_KEPT = 64
# How often the raylet watchdog looks for its raylet where the kernel cannot say it at once (no pidfd): seconds.
RAYLET_POLL = 0.1

log = logging.getLogger(__name__)


class ProgressTo(BaseModel):
    """Where a call's progress goes: which attempt of which task of which run it is.

    The server knows no runs, so the specialist names them with the call. The
    coordinator they go to is the server's own (given once, at construction):
    an actor handle sent with every call cost a pickle on the specialist and
    an unpickle here per request, a tenth of this actor's CPU (measured).
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    task_id: str
    attempt: int


class ChatCall(BaseModel):
    """What `ModelServer.chat` takes, as one message: a call of a `chat_many` batch (those have a dispatch
    `key`, by which `cancel_chats` stops them)."""

    model_config = ConfigDict(frozen=True)

    req: ChatRequest
    key: str | None = None
    progress: ProgressTo | None = None


class ChatOutcome(BaseModel):
    """How one call of a batch ended: its answer, or the error it raised as data (`teamorch.errors.server_error`
    rebuilds it), because one call's failure must not end the batch's stream."""

    index: int  # the call's place in the batch
    response: ChatResponse | None = None
    error_class: ErrorClass = "error"
    error: str = ""
    status: int | None = None


class ModelServer:
    """One server of the fleet, whatever protocol it speaks (Ollama, OpenAI-compatible, embedded llama.cpp).

    Its state is the backend (which request goes here, and how many at once,
    is the balancer's business) and, per call key (run, task, attempt), the
    request running for it (`calls`, with how many callers wait on it) and
    the last answers sent (`answered`): a specialist that Ray restarted
    mid-task sends the same attempt again, and must get the one answer, not
    cause a second generation.

    `gate` admits `slots` requests to the box at once. The balancer may grant
    a slot shortly before the request on it ends (an early grant, see
    `teamorch.policies.balancing.early_slot`); that request waits here and is
    sent the moment a stream before it ends, with no Ray hop in between, so
    the slot is not left idle and the box never sees more than `slots`.
    A request cancelled while it waits simply leaves the queue; one whose
    predecessor fails is sent (and fails or succeeds on its own).
    """

    def __init__(self, config: ServerConfig, coordinator: ActorHandle | None = None) -> None:
        self.config = config
        self.coordinator = coordinator  # where `progress` reports go (the coordinator that started this actor)
        self.backend = make_backend(config)
        self.calls: dict[str, asyncio.Future[ChatResponse]] = {}
        self.callers: Counter[str] = Counter()
        self.answered: OrderedDict[str, ChatResponse] = OrderedDict()
        self.gate = asyncio.Semaphore(config.slots)
        self._batched: KeyedJobs[ChatResponse] = KeyedJobs()  # the calls of `chat_many` batches, by key
        self._watch_raylet()
        settle_heap()

    def _watch_raylet(self) -> None:
        """Exit as soon as this node's raylet is gone, so no box keeps generating answers nobody will record.

        When the raylet dies (a driver SIGKILLed with the private Ray it
        started, a node lost), Ray's own check (`ExitIfParentRayletDies`, every
        `raylet_death_check_interval_milliseconds`, 1 s by default) leaves every
        worker running for up to a second. A server actor alive in that second
        finishes requests whose answers the dying coordinator never journals,
        and `teamorch resume` asks for them again: duplicated generations. So
        the server actor, the only one holding model requests, goes first:
        exiting closes every HTTP stream it holds at once (the box sees the
        client disconnect and stops generating; an embedded llama.cpp model
        stops with the process), and cannot be held up by a busy event loop as
        a cancellation would be. The coordinator and specialists keep Ray's
        slower check on purpose: answers already on their way are still
        journaled. Lowering Ray's interval instead would make every worker die
        at the same moment and lose that ordering.
        """
        raylet = int(os.environ.get("RAY_RAYLET_PID", "0"))
        if not raylet:
            return  # not in a Ray worker (a test building the class directly)
        try:
            gone: int | None = os.pidfd_open(raylet)  # readable once the raylet exits: no polling delay
        except ProcessLookupError:
            log.warning("raylet pid %d is not visible from this worker: no raylet watchdog", raylet)
            return
        except (AttributeError, OSError):
            gone = None  # no pidfd (old kernel or not Linux): poll
        threading.Thread(target=_exit_when_gone, args=(raylet, gone), name="raylet-watchdog", daemon=True).start()

    async def ready(self) -> str:
        """Returns once the actor is up and its backend warmed up (an embedded server loads its model)."""
        await self.backend.warm_up()
        return self.config.name

    async def chat(self, req: ChatRequest, key: str | None = None, progress: ProgressTo | None = None) -> ChatResponse:
        """One completion. Cancellation (ray.cancel) arrives as CancelledError and closes the HTTP stream,
        once no other caller of the same `key` still waits for it. With `progress`, a streaming backend's
        tokens are reported to that coordinator as they come (throttled; fire-and-forget)."""
        if key is None:
            return await self._send(req, self._reporter(progress))
        if key in self.answered:
            return self.answered[key]
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = asyncio.ensure_future(self._call(key, req, self._reporter(progress)))
        self.callers[key] += 1
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if self.callers[key] == 1:
                call.cancel()
            raise
        finally:
            self.callers[key] -= 1
            if not self.callers[key]:
                del self.callers[key]

    async def chat_many(self, calls: list[ChatCall]) -> AsyncIterator[list[ChatOutcome]]:
        """`chat` for every call of `calls` at once; yields together the outcomes that end in one loop turn.

        A specialist sends the calls of one loop turn to one server this way,
        as a Ray streaming generator: one actor call for them all (see
        `Specialist.run_many` for the measured cost of a call each). Each
        runs as `chat` runs it (dedup by key, the gate, progress), and each
        error comes back as its outcome. `cancel_chats` stops single calls,
        as `ray.cancel` stops a call of its own.
        """
        async for done in self._batched.run([(c.key, self.chat(c.req, c.key, c.progress)) for c in calls]):
            yield [self._outcome(index, job) for index, job in done]

    async def cancel_chats(self, keys: list[str]) -> None:
        """Stop calls of `chat_many` batches by key: each is cancelled as `ray.cancel` cancels a `chat`."""
        self._batched.cancel(keys)

    def _outcome(self, index: int, job: asyncio.Future[ChatResponse]) -> ChatOutcome:
        exc = job.exception()
        if exc is None:
            return ChatOutcome(index=index, response=job.result())
        if isinstance(exc, ServerError):
            return ChatOutcome(index=index, error_class=exc.error_class, error=exc.message, status=exc.status)
        return ChatOutcome(index=index, error=f"{type(exc).__name__}: {exc}")

    async def _send(self, req: ChatRequest, on_tokens: TokenSink | None) -> ChatResponse:
        async with self.gate:
            return await self.backend.chat(req, on_tokens)

    async def _call(self, key: str, req: ChatRequest, on_tokens: TokenSink | None) -> ChatResponse:
        try:
            response = await self._send(req, on_tokens)
        finally:
            self.calls.pop(key, None)
        self.answered[key] = response
        while len(self.answered) > ANSWERS_KEPT:
            self.answered.popitem(last=False)
        return response

    def _reporter(self, to: ProgressTo | None) -> TokenSink | None:
        """The token counter a backend calls for this call: each count goes through the call's throttle, and
        what passes is told to the coordinator without waiting, as `Specialist._tell` does (a lost report
        costs one redraw, never the result)."""
        coordinator = self.coordinator
        if to is None or coordinator is None:
            return None
        throttle = ProgressThrottle(started=time.monotonic())

        def seen(tokens: int) -> None:
            step = throttle.seen(tokens, time.monotonic())
            if step is not None:
                event = TokensGenerated(
                    task_id=to.task_id,
                    attempt=to.attempt,
                    server=self.config.name,
                    tokens=step.tokens,
                    tokens_per_second=step.tokens_per_second,
                    ttft=step.ttft,
                )
                coordinator.task_event.remote(to.run_id, event)

        return seen

    async def probe(self) -> ProbeResult:
        """Health and models, for the balancer's poll loop."""
        started = time.monotonic()
        try:
            present, loaded = await self.backend.models()
        except ServerError as exc:
            return ProbeResult(healthy=False, error=str(exc), checked_at=time.time())
        return ProbeResult(
            healthy=True,
            models_present=present,
            models_loaded=loaded,
            latency=time.monotonic() - started,
            checked_at=time.time(),
        )


def _exit_when_gone(raylet: int, pidfd: int | None) -> None:
    """Block until process `raylet` exits (on its pidfd, else by polling), then end this process at once."""
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        while _alive(raylet):
            time.sleep(RAYLET_POLL)
    log.warning("raylet %d is gone: exiting, which closes every model request in flight", raylet)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    return True
