"""The one seam between a server actor and the protocol it speaks.

Like httpx's transport interface, this cut exists so nothing above it knows
whether a server is native Ollama, an OpenAI-compatible endpoint or llama.cpp
running in-process: the server actor holds a `Backend`, the balancer and
specialists only ever see `ChatRequest` / `ChatResponse` and the typed errors
in `teamorch.errors`.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from teamorch.actors.backends.wire import Lane
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


class HttpBackend(Backend):
    """Shared by the network protocols: the server actor's httpx clients.

    `read_timeout` bounds the silence between two chunks of a stream (Ollama
    streams a line per token), so a stalled server fails over long before the
    task deadline; its default is generous because a cold model load sends
    nothing for a while.

    Completions go through `lane()`: an httpx transport of one keep-alive
    connection per request in flight, taken from a free list (for a plain
    `http://` server with no proxy, `wire.Lane`: httpcore's connection on an
    asyncio socket, a third less client CPU per call). One shared pool
    of `slots` connections would do the same job, but httpcore's pool checks
    every idle connection (a readability syscall each) on every request and
    every response: on the simulator at 64 requests in flight that cost
    2.7-4.3 ms of CPU per call in the server actor, against 0.5 ms with lanes.
    The balancer never sends more than `slots` at once, so there are about
    `slots` lanes. A completion is a prebuilt `httpx.Request` handed to the
    lane's transport (`post_lines`), not `AsyncClient.stream`: what the client
    adds per request (URL and header merging, cookies, auth flow, redirects,
    event hooks, the environment's proxy looked up again) is fixed for a
    server, so it is done once here (measured: 0.44-0.47 ms of client CPU per
    streamed call through the client, 0.34-0.41 ms through the transport).
    Model lists and probes use `client`.
    """

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self._client: httpx.AsyncClient | None = None
        self._lanes: list[httpx.AsyncBaseTransport] = []  # idle, each holding at most one keep-alive connection
        self._opened: list[httpx.AsyncBaseTransport] = []  # every lane, to close them all
        self._ssl: ssl.SSLContext | None = None
        # What AsyncClient would put on every request, fixed for a server: the timeouts (read: the silence
        # allowed mid-stream) and the proxy the environment names for it; headers are `client`'s (httpx's
        # defaults and the configured ones).
        self._timeout = httpx.Timeout(None, connect=config.connect_timeout, read=config.read_timeout).as_dict()
        self._proxy = env_proxy(config.url)
        self._plain = urllib.parse.urlsplit(config.url or "").scheme == "http" and self._proxy is None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:  # one context for every client: building one loads the CA bundle (~ms)
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily so it binds to the actor's own event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.config.url or "",
                headers=self.config.headers,
                timeout=httpx.Timeout(**self._timeout),
                limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
                verify=self._ssl_context(),
            )
        return self._client

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[httpx.AsyncBaseTransport]:
        """A transport for one request, alone on its keep-alive connection while the request runs."""
        if self._lanes:
            transport = self._lanes.pop()
        else:
            transport = (
                Lane()
                if self._plain
                else httpx.AsyncHTTPTransport(  # TLS or a proxy: httpx's own transport does them
                    verify=self._ssl_context(),
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    proxy=self._proxy,
                )
            )
            self._opened.append(transport)
        try:
            yield transport
        finally:
            self._lanes.append(transport)

    @asynccontextmanager
    async def post_lines(self, path: str, payload: dict[str, Any], model: str) -> AsyncIterator[AsyncIterator[str]]:
        """POST `payload` as JSON on a lane and give the lines of its 200 response as they arrive.

        A status other than 200 raises its error (`error_for`), a transport
        failure `ServerUnreachable` or, after `read_timeout` of silence,
        `ServerTimeout`. Leaving the block before the body's end (an error, a
        cancellation) closes the connection, so the box sees the client go and
        stops generating; read to its end, the connection stays for the next.
        """
        request = httpx.Request(
            "POST",
            f"{self.config.url}{path}",
            json=payload,
            headers=self.client.headers,
            extensions={"timeout": self._timeout},
        )
        try:
            async with self.lane() as transport:
                response = await transport.handle_async_request(request)
                try:
                    if response.status_code != 200:
                        raise self.error_for(response.status_code, await self.read_capped(response), model)
                    yield self.capped_lines(response)
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    async def aclose(self) -> None:
        for transport in self._opened:
            await transport.aclose()
        if self._client is not None:
            await self._client.aclose()
        self._client, self._lanes, self._opened = None, [], []

    def unreachable(self, exc: Exception) -> ServerError:
        """A transport failure: a silent stream is a stall (timeout), anything else means the box is gone."""
        if isinstance(exc, httpx.ReadTimeout):
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

    async def capped_bytes(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The body as it arrives, counted: past `max_response_bytes` the attempt fails (and, raised inside
        the caller's `post_lines()` block, the connection closes) before the excess is ever held in memory."""
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > self.config.max_response_bytes:
                raise self.too_big()
            yield chunk

    async def capped_lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """NDJSON lines of a capped body; split here, not by httpx, whose line reader would buffer an
        endless line whole."""
        pending = b""
        async for chunk in self.capped_bytes(response):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    async def read_capped(self, response: httpx.Response) -> bytes:
        return b"".join([chunk async for chunk in self.capped_bytes(response)])

    async def get_json(self, path: str) -> Any:
        try:
            async with self.client.stream("GET", path) as response:
                body = await self.read_capped(response)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code != 200:
            raise self.error_for(response.status_code, body, "")
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


def stream_object(server: str, text: str, what: str) -> dict[str, Any]:
    """One JSON object of a streamed answer (an NDJSON line, an event's data). A stream can end in an `error`
    object after a 200, which must fail the request rather than return half an answer."""
    try:
        chunk = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedResponse(server, f"invalid {what}: {text[:120]!r}") from exc
    if not isinstance(chunk, dict):
        raise MalformedResponse(server, f"{what} is not a JSON object: {text[:120]!r}")
    if "error" in chunk:
        error = chunk["error"]  # Ollama: a string; OpenAI-compatible servers: {"message": ...}
        raise ServerError(
            server, f"error in stream: {error.get('message', error) if isinstance(error, dict) else error}", 200
        )
    return chunk


def env_proxy(url: str | None) -> str | None:
    """The proxy the environment names for `url` (`HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`, minus `NO_PROXY`), as an httpx
    client with `trust_env` applies it; read once per server for its lanes, which are bare transports."""
    parts = urllib.parse.urlsplit(url or "")
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    return proxy if not proxy or "://" in proxy else f"http://{proxy}"  # httpx reads `host:port` as http://


def make_backend(config: ServerConfig) -> Backend:
    if config.protocol == "ollama":
        from teamorch.actors.backends.ollama import OllamaBackend

        return OllamaBackend(config)
    if config.protocol == "openai":
        from teamorch.actors.backends.openai import OpenAIBackend

        return OpenAIBackend(config)
    from teamorch.actors.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(config)
