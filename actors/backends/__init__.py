"""The one seam between a server actor and the protocol it speaks.

Like httpx's transport interface, this cut exists so nothing above it knows
whether a server is native Ollama, an OpenAI-compatible endpoint or llama.cpp
running in-process: the server actor holds a `Backend`, the balancer and
specialists only ever see `ChatRequest` / `ChatResponse` and the typed errors
in `teamorch.errors`.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from teamorch.config import ServerConfig
from teamorch.errors import MalformedResponse, ModelNotFound, ServerBusy, ServerError, ServerTimeout, ServerUnreachable
from teamorch.messages import ChatRequest, ChatResponse

# Called on the server actor's event loop with the tokens generated so far, as a stream advances: the server
# actor turns it into throttled progress reports (`policies.progress`), the backend only counts.
TokenSink = Callable[[int], None]


class Backend(ABC):
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = config.name

    @abstractmethod
    async def chat(self, req: ChatRequest, on_tokens: TokenSink | None = None) -> ChatResponse:
        """One completion; raises a `teamorch.errors.ServerError` subclass on failure. A streaming backend
        calls `on_tokens` as tokens arrive; one that is not streaming never does."""

    @abstractmethod
    async def models(self) -> tuple[list[str] | None, list[str] | None]:
        """(present, loaded) model names; None where the protocol cannot tell."""

    async def warm_up(self) -> None:
        """Get ready for the first request, so its latency is the model's and not the setup's.

        Network backends have nothing to do: the server owns the model.
        """
        return None

    async def aclose(self) -> None:
        return None


# What a request raises when the transport fails (refused, reset, dropped mid-stream, timed out): `unreachable`
# says which `ServerError` it is.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class HttpBackend(Backend):
    """Shared by the network protocols: one pooled client per server actor.

    The pool is sized to `slots` because the balancer never sends more
    concurrent requests than that. `read_timeout` bounds the silence between
    two chunks of a stream (Ollama streams a line per token), so a stalled
    server fails over long before the task deadline; its default is generous
    because a cold model load sends nothing for a while.

    The client is aiohttp's: with a pool of `slots` keep-alive connections,
    httpx's pool rescans every connection (a readability syscall each) for
    every request and response, which at 64 slots cost 0.8-4 ms of CPU per
    call against aiohttp's 0.12 ms (measured on the simulator); the server
    actor was the busiest process of the fleet.
    """

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self._client: aiohttp.ClientSession | None = None

    @property
    def client(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the actor's own event loop.
        if self._client is None:
            self._client = aiohttp.ClientSession(
                headers=self.config.headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.config.connect_timeout, sock_read=self.config.read_timeout
                ),
                connector=aiohttp.TCPConnector(limit=self.config.slots + 4),
                trust_env=True,  # proxies from the environment, as httpx's client did
            )
        return self._client

    def url(self, path: str) -> str:
        """`path` on this server: appended to the configured URL, whose own path (a proxy prefix) is kept."""
        return (self.config.url or "").rstrip("/") + path

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def unreachable(self, exc: BaseException) -> ServerError:
        """A transport failure: a silent stream is a stall (timeout), anything else means the box is gone."""
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return ServerTimeout(self.name, f"stalled: no data for {self.config.read_timeout:g}s ({self.config.url})")
        detail = str(exc) or type(exc).__name__
        return ServerUnreachable(self.name, f"{detail} ({self.config.url})")

    def error_for(self, status: int, body: bytes, model: str) -> ServerError:
        """Map an HTTP error to the error kind that decides retry and failover."""
        message = _error_message(body) or f"HTTP {status}"
        if status == 404:
            return ModelNotFound(self.name, f"model {model!r} not found: {message}", status)
        if status in (429, 503):
            return ServerBusy(self.name, message, status)
        return ServerError(self.name, message, status)

    def too_big(self) -> MalformedResponse:
        limit = self.config.max_response_bytes
        return MalformedResponse(
            self.name, f"response larger than max_response_bytes={limit} ({self.config.url}): stream closed"
        )

    async def capped_bytes(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body as it arrives, counted: past `max_response_bytes` the attempt fails (and, raised inside
        the caller's request block, the connection closes) before the excess is ever held in memory."""
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if received > self.config.max_response_bytes:
                raise self.too_big()
            yield chunk

    async def capped_lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        """NDJSON lines of a capped body; split here, not by the client, whose line reader would buffer an
        endless line whole."""
        pending = b""
        async for chunk in self.capped_bytes(response):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    async def read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        return b"".join([chunk async for chunk in self.capped_bytes(response)])

    async def get_json(self, path: str) -> Any:
        try:
            async with self.client.get(self.url(path)) as response:
                body = await self.read_capped(response)
        except TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from exc
        if response.status != 200:
            raise self.error_for(response.status, body, "")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedResponse(self.name, f"{path} returned invalid JSON") from exc


def _error_message(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:300] or None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err) if err else None


def make_backend(config: ServerConfig) -> Backend:
    if config.protocol == "ollama":
        from teamorch.actors.backends.ollama import OllamaBackend

        return OllamaBackend(config)
    if config.protocol == "openai":
        from teamorch.actors.backends.openai import OpenAIBackend

        return OpenAIBackend(config)
    from teamorch.actors.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(config)
