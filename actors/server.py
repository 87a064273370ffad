"""One model server as a Ray actor: it owns the connection pool and nothing else.

Keeping the `httpx.AsyncClient` (or the llama.cpp context) inside one actor
means one event loop owns it, connections are reused across every specialist,
and a stuck server can only ever block its own actor.
"""

from __future__ import annotations

import time
from typing import Any

from actors.backends import make_backend
from teamorch.config import ServerConfig
from teamorch.errors import ServerError
from teamorch.messages import ChatRequest, ChatResponse


class OllamaServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend = make_backend(config)
        self.in_flight = 0

    async def ready(self) -> str:
        """Returns once the actor is up; embedded servers also load their model here."""
        ensure = getattr(self.backend, "ensure_loaded", None)
        if ensure is not None:
            await ensure()
        return self.config.name

    async def chat(self, req: ChatRequest) -> ChatResponse:
        # Cancellation (ray.cancel) arrives here as CancelledError and closes the HTTP stream.
        self.in_flight += 1
        try:
            return await self.backend.chat(req)
        finally:
            self.in_flight -= 1

    async def probe(self) -> dict[str, Any]:
        """Health and models, for the balancer's poll loop."""
        started = time.monotonic()
        try:
            present, loaded = await self.backend.models()
        except ServerError as exc:
            return {"healthy": False, "error": str(exc), "checked_at": time.time()}
        return {
            "healthy": True,
            "models_present": present,
            "models_loaded": loaded,
            "latency": time.monotonic() - started,
            "checked_at": time.time(),
        }

    async def close(self) -> None:
        await self.backend.aclose()
