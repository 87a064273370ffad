"""The server actor's plain-HTTP lane (`actors/backends/wire.py`) against the simulator over real loopback HTTP:
the keep-alive and failure behaviour httpx's own transport gave, kept while the socket layer is ours.

Each test runs on asyncio's loop and on uvloop's: Ray runs the server actors on uvloop (a dependency), and
uvloop's transports are not asyncio's classes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest

from teamorch.actors.backends.ollama import OllamaBackend
from teamorch.actors.backends.wire import HIGH_WATER, Lane, httpx_error
from teamorch.config import ServerConfig
from teamorch.errors import ServerTimeout, ServerUnreachable
from teamorch.messages import ChatRequest

MODEL = "gemma3:270m"
REQ = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "asyncio":
        return asyncio.run
    return pytest.importorskip("uvloop").run  # a dependency except on Windows, where Ray falls back to asyncio


def _calls(run: Runner, backend: OllamaBackend, between: object = None, n: int = 2) -> list[int]:
    """`n` calls in turn on one backend; `between` (a callable) runs in a thread after the first."""

    async def calls() -> list[int]:
        try:
            tokens = [(await backend.chat(REQ)).tokens]
            if callable(between):
                await asyncio.to_thread(between)
            tokens += [(await backend.chat(REQ)).tokens for _ in range(n - 1)]
            return tokens
        finally:
            await backend.aclose()

    return run(calls())


def test_a_keep_alive_connection_the_server_dropped_while_idle_is_reopened_and_the_call_succeeds(sims, run) -> None:
    """A box restarted between two calls closed the idle connection: the lane sees it closed before sending
    (no failed attempt, no failover) and opens a new one."""
    sim = sims(name="box", tokens_per_second=1e6, ttft=0.0)
    backend = OllamaBackend(ServerConfig(name="box", url=sim.url))
    assert _calls(run, backend, between=lambda: sim.restart(down=0.0), n=3) == [3, 3, 3]
    assert sim.stats()["requests"] == 3 and sim.stats()["connections"] == 2  # one before the restart, one after


def test_a_silent_stream_fails_as_a_stall_after_read_timeout(sims, run) -> None:
    sim = sims(name="stuck", stall=True)
    backend = OllamaBackend(ServerConfig(name="stuck", url=sim.url, read_timeout=0.3))
    with pytest.raises(ServerTimeout, match=r"stalled: no data for 0.3s"):
        _calls(run, backend, n=1)


def test_a_refused_connection_names_the_server_and_its_url(run) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        backend = OllamaBackend(ServerConfig(name="gone", url=url, connect_timeout=2.0))
        with pytest.raises(ServerUnreachable) as caught:
            _calls(run, backend, n=1)
    assert "'gone'" in str(caught.value) and url in str(caught.value)


def test_an_answer_many_times_the_read_buffer_is_read_whole_and_the_connection_kept(sims, run) -> None:
    """Past HIGH_WATER unread bytes the socket pauses reading and resumes as httpcore reads: nothing is lost."""
    size = 8 * HIGH_WATER
    sim = sims(name="big", tokens_per_second=1e6, ttft=0.0, reply_bytes=size)
    backend = OllamaBackend(ServerConfig(name="big", url=sim.url, max_response_bytes=4 * size))

    async def calls() -> list[int]:
        try:
            return [len((await backend.chat(REQ)).text) for _ in range(2)]
        finally:
            await backend.aclose()

    assert run(calls()) == [size, size]
    assert sim.stats()["connections"] == 1


def test_plain_http_servers_get_the_lane_and_tls_or_a_proxy_gets_httpx_own_transport(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)

    async def kind(url: str) -> type:
        backend = OllamaBackend(ServerConfig(name="s", url=url))
        async with backend.lane() as transport:
            return type(transport)

    assert asyncio.run(kind("http://10.0.0.5:11434")) is Lane
    assert asyncio.run(kind("https://ollama.example.com")) is httpx.AsyncHTTPTransport
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert asyncio.run(kind("http://10.0.0.5:11434")) is httpx.AsyncHTTPTransport


def test_httpcore_errors_become_the_httpx_errors_of_the_same_name() -> None:
    import httpcore

    assert type(httpx_error(httpcore.ReadTimeout("x"))) is httpx.ReadTimeout
    assert type(httpx_error(httpcore.RemoteProtocolError("x"))) is httpx.RemoteProtocolError
    assert type(httpx_error(httpcore.ConnectionNotAvailable())) is httpx.TransportError
