"""One model server as a Ray actor: it owns the connection pool and nothing else.

Keeping the `httpx.AsyncClient` (or the llama.cpp context) inside one actor
means one event loop owns it, connections are reused across every specialist,
and a stuck server can only ever block its own actor.
"""

from __future__ import annotations

import time

from teamorch.actors.backends import make_backend
from teamorch.config import ServerConfig
from teamorch.errors import ServerError
from teamorch.messages import ChatRequest, ChatResponse, ProbeResult


class ModelServer:
    """One server of the fleet, whatever protocol it speaks (Ollama, OpenAI-compatible, embedded llama.cpp).

    Its only state is the backend: which request goes here, and how many at
    once, is the balancer's business.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend = make_backend(config)

    async def ready(self) -> str:
        """Returns once the actor is up and its backend warmed up (an embedded server loads its model)."""
        await self.backend.warm_up()
        return self.config.name

    async def chat(self, req: ChatRequest) -> ChatResponse:
        # Cancellation (ray.cancel) arrives here as CancelledError and closes the HTTP stream.
        return await self.backend.chat(req)

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
