"""One model server as a Ray actor: it owns the connection pool and nothing else.

Keeping the `httpx.AsyncClient` (or the llama.cpp context) inside one actor
means one event loop owns it, connections are reused across every specialist,
and a stuck server can only ever block its own actor.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict

from teamorch.actors.backends import make_backend
from teamorch.config import ServerConfig
from teamorch.errors import ServerError
from teamorch.messages import ChatRequest, ChatResponse, ProbeResult

# Answers kept by key after they were sent: long enough for a restarted specialist to ask again (seconds), bounded
# because each can be up to `max_response_bytes`.
ANSWERS_KEPT = 64


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

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend = make_backend(config)
        self.calls: dict[str, asyncio.Future[ChatResponse]] = {}
        self.callers: Counter[str] = Counter()
        self.answered: OrderedDict[str, ChatResponse] = OrderedDict()
        self.gate = asyncio.Semaphore(config.slots)

    async def ready(self) -> str:
        """Returns once the actor is up and its backend warmed up (an embedded server loads its model)."""
        await self.backend.warm_up()
        return self.config.name

    async def chat(self, req: ChatRequest, key: str | None = None) -> ChatResponse:
        """One completion. Cancellation (ray.cancel) arrives as CancelledError and closes the HTTP stream,
        once no other caller of the same `key` still waits for it."""
        if key is None:
            return await self._send(req)
        if key in self.answered:
            return self.answered[key]
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = asyncio.ensure_future(self._call(key, req))
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

    async def _send(self, req: ChatRequest) -> ChatResponse:
        async with self.gate:
            return await self.backend.chat(req)

    async def _call(self, key: str, req: ChatRequest) -> ChatResponse:
        try:
            response = await self._send(req)
        finally:
            self.calls.pop(key, None)
        self.answered[key] = response
        while len(self.answered) > ANSWERS_KEPT:
            self.answered.popitem(last=False)
        return response

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
