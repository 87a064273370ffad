"""One model server as a Ray actor: it owns the connection pool and nothing else.

Keeping the `httpx.AsyncClient` (or the llama.cpp context) inside one actor
means one event loop owns it, connections are reused across every specialist,
and a stuck server can only ever block its own actor.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict

from pydantic import BaseModel, ConfigDict
from ray.actor import ActorHandle

from teamorch.actors.backends import TokenSink, make_backend
from teamorch.config import ServerConfig
from teamorch.errors import ServerError
from teamorch.journal import TokensGenerated
from teamorch.messages import ChatRequest, ChatResponse, ProbeResult
from teamorch.policies.progress import ProgressThrottle

# Answers kept by key after they were sent: long enough for a restarted specialist to ask again (seconds), bounded
# because each can be up to `max_response_bytes`.
ANSWERS_KEPT = 64


class ProgressTo(BaseModel):
    """Where a call's progress goes: the coordinator of the run, and which attempt of which task it is.

    The server knows no runs, so the specialist names them with the call. It
    lives here rather than in `teamorch.messages` because it carries a Ray
    actor handle, and the messages module never imports Ray.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    coordinator: ActorHandle
    run_id: str
    task_id: str
    attempt: int


class ModelServer:
    """One server of the fleet, whatever protocol it speaks (Ollama, OpenAI-compatible, embedded llama.cpp).

    Its state is the backend (which request goes here, and how many at once,
    is the balancer's business) and, per call key (run, task, attempt), the
    request running for it (`calls`, with how many callers wait on it) and
    the last answers sent (`answered`): a specialist that Ray restarted
    mid-task sends the same attempt again, and must get the one answer, not
    cause a second generation.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend = make_backend(config)
        self.calls: dict[str, asyncio.Future[ChatResponse]] = {}
        self.callers: Counter[str] = Counter()
        self.answered: OrderedDict[str, ChatResponse] = OrderedDict()

    async def ready(self) -> str:
        """Returns once the actor is up and its backend warmed up (an embedded server loads its model)."""
        await self.backend.warm_up()
        return self.config.name

    async def chat(self, req: ChatRequest, key: str | None = None, progress: ProgressTo | None = None) -> ChatResponse:
        """One completion. Cancellation (ray.cancel) arrives as CancelledError and closes the HTTP stream,
        once no other caller of the same `key` still waits for it. With `progress`, a streaming backend's
        tokens are reported to that coordinator as they come (throttled; fire-and-forget)."""
        if key is None:
            return await self.backend.chat(req, self._reporter(progress))
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

    async def _call(self, key: str, req: ChatRequest, on_tokens: TokenSink | None) -> ChatResponse:
        try:
            response = await self.backend.chat(req, on_tokens)
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
        if to is None:
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
                to.coordinator.task_event.remote(to.run_id, event)

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
