"""A server actor's lane to a plain-HTTP server: httpx's request and response on httpcore's HTTP/1.1
connection, carried by an asyncio protocol instead of anyio.

Why this exists: the server actor is the busiest process of a dispatch run, and
most of its CPU is its HTTP client. Profiled at 32 requests in flight against
the simulator, a stock one-connection `httpx.AsyncHTTPTransport` spends about a
third of its time outside HTTP: anyio's cancel scopes and `fail_after` around
every socket read and write (each one asks sniffio and asyncio for the current
library and task) and the pool's locks and readability syscall per request. The
same `OllamaBackend.chat` costs 0.36 ms of client CPU per call through it and
0.25 ms through `Lane` (measured in the same run, same machine).

What stays httpx's and httpcore's: the request (`httpx.Request`, headers,
timeouts in its `timeout` extension), the HTTP/1.1 state machine and keep-alive
rules (`httpcore.AsyncHTTP11Connection`, h11), the response and its content
decoding (`httpx.Response`) and the error types (`httpx.ConnectError`,
`httpx.ReadTimeout`, ...), so everything above the lane is unchanged. What is
ours is the socket: `_Socket` buffers what arrives and `_Stream` hands it to
httpcore, with a read/write timeout as one timer per wait, and knows without a
syscall whether an idle connection was closed by the server (httpcore's
`has_expired`). TLS and proxies are not handled here: an `https://` server or
one behind the environment's proxy gets a stock httpx transport
(`HttpBackend.lane`), where they cost little beside the TLS work itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httpcore
import httpx

# Past this much unread data the socket stops reading until httpcore catches up (TCP then slows the server):
# a runaway answer is cut by `max_response_bytes` as it is read, never held here whole.
HIGH_WATER = 256 * 1024
KEEPALIVE_EXPIRY = httpx.Limits().keepalive_expiry  # httpx's default: an idle connection older than this is reopened
_HTTPCORE_ERRORS = (
    httpcore.ConnectionNotAvailable,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
    httpcore.ProtocolError,
    httpcore.NetworkError,
    httpcore.TimeoutException,
)


def httpx_error(exc: Exception) -> httpx.TransportError:
    """httpcore's error as the httpx error of the same name (httpx mirrors httpcore's names), as httpx's own
    transport maps them."""
    kind = getattr(httpx, type(exc).__name__, None)
    if not (isinstance(kind, type) and issubclass(kind, httpx.TransportError)):
        kind = httpx.TransportError
    return kind(str(exc) or type(exc).__name__)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Socket(asyncio.Protocol):
    transport: asyncio.Transport  # set by `connection_made`, before `_connect` hands the socket to a `_Stream`

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False  # reading paused: HIGH_WATER unread
        self.closed = False
        self.error: Exception | None = None
        self.reading: asyncio.Future[None] | None = None  # a read waiting for data
        self.writing: asyncio.Future[None] | None = None  # set while the transport's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, so no isinstance

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        _wake(self.reading)

    def eof_received(self) -> bool:
        self.closed = True
        _wake(self.reading)
        return False  # close our side too: a half-closed HTTP/1.1 connection is of no further use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self.error = True, exc
        _wake(self.reading)
        _wake(self.writing)

    def pause_writing(self) -> None:
        self.writing = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self.writing)
        self.writing = None


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _until(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Wait for `waiter`, raising TimeoutError after `timeout` seconds: a timer, not a task per wait."""
    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, socket: _Socket) -> None:
        self._socket = socket

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        socket = self._socket
        while not socket.chunks:
            if socket.closed:
                if socket.error is not None:
                    raise httpcore.ReadError(str(socket.error) or type(socket.error).__name__)
                return b""  # the server closed the connection: httpcore decides what that means here
            socket.reading = asyncio.get_running_loop().create_future()
            try:
                await _until(socket.reading, timeout)
            except TimeoutError:
                raise httpcore.ReadTimeout(f"no data for {timeout:g}s") from None
            finally:
                socket.reading = None
        chunk = socket.chunks.popleft()
        if len(chunk) > max_bytes:
            socket.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        socket.buffered -= len(chunk)
        if socket.paused and socket.buffered <= HIGH_WATER and not socket.closed:
            socket.transport.resume_reading()
            socket.paused = False
        return chunk

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        socket = self._socket
        if not buffer:
            return
        if socket.closed:
            raise httpcore.WriteError("connection closed")
        socket.transport.write(buffer)
        if socket.writing is not None:
            try:
                await _until(socket.writing, timeout)
            except TimeoutError:
                raise httpcore.WriteTimeout(f"could not send for {timeout:g}s") from None
            if socket.closed:
                raise httpcore.WriteError(str(socket.error or "connection closed"))

    async def aclose(self) -> None:
        self._socket.transport.close()

    def get_extra_info(self, info: str) -> Any:
        socket = self._socket
        if info == "is_readable":  # asked of an idle connection: anything there means the server closed it
            return socket.closed or bool(socket.chunks)
        return {
            "socket": socket.transport.get_extra_info("socket"),
            "client_addr": socket.transport.get_extra_info("sockname"),
            "server_addr": socket.transport.get_extra_info("peername"),
        }.get(info)


async def _connect(host: str, port: int, timeout: float | None) -> _Stream:
    loop = asyncio.get_running_loop()
    try:  # once per connection, so a task for the timeout is fine here
        _transport, socket = await asyncio.wait_for(loop.create_connection(_Socket, host, port), timeout)
    except asyncio.TimeoutError:
        raise httpcore.ConnectTimeout(f"no connection within {timeout:g}s") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    return _Stream(socket)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except _HTTPCORE_ERRORS as exc:
            raise httpx_error(exc) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class Lane(httpx.AsyncBaseTransport):
    """An httpx transport of one keep-alive HTTP/1.1 connection to a plain-HTTP server, one request at a time.

    The connection is reopened when the server closed it while idle, when it
    was idle longer than httpx's keep-alive expiry, or when the last response
    was not read to its end (httpcore closes it then, as a pool would).
    """

    def __init__(self) -> None:
        self._connection: httpcore.AsyncHTTP11Connection | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout", {})
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]  # an httpx request's stream is an async byte stream
            extensions=request.extensions,
        )
        try:
            connection = self._connection
            if connection is None or not connection.is_idle() or connection.has_expired():
                if connection is not None:
                    await connection.aclose()
                self._connection = None
                stream = await _connect(url.host, url.port or 80, timeouts.get("connect"))
                connection = httpcore.AsyncHTTP11Connection(
                    httpcore.Origin(url.raw_scheme, url.raw_host, url.port or 80), stream, KEEPALIVE_EXPIRY
                )
                self._connection = connection
            response = await connection.handle_async_request(core)
        except _HTTPCORE_ERRORS as exc:
            raise httpx_error(exc) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None
