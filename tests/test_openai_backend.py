"""The OpenAI-compatible backend (`/v1/chat/completions`, server-sent events) against the Ollama-API simulator
(teamorch.sim: a real HTTP server on loopback, which also speaks the OpenAI dialect), and its event parser alone
for what a simulator does not send (no usage chunk, keep-alive comments)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from teamorch.actors.backends.openai import OpenAIBackend, SseAnswer
from teamorch.config import ServerConfig
from teamorch.errors import MalformedResponse, ServerError
from teamorch.messages import ChatRequest, ChatResponse
from teamorch.sim import SimServer

ROLE = "You are a meticulous reviewer of Python services. " * 8


def ask(server: SimServer, task: str, seen: list[int] | None = None) -> ChatResponse:
    async def go() -> ChatResponse:
        backend = OpenAIBackend(ServerConfig(name="v", url=server.url, protocol="openai"))
        try:
            messages = [{"role": "system", "content": ROLE}, {"role": "user", "content": task}]
            req = ChatRequest(model="gemma3:270m", messages=messages, options={"num_predict": 7})
            return await backend.chat(req, seen.append if seen is not None else None)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def test_a_streamed_answer_carries_usage_time_to_first_token_and_progress(sims: Callable[..., SimServer]) -> None:
    server = sims(name="v", ttft=0.05, tokens_per_second=200)
    seen: list[int] = []
    first = ask(server, "review parser.py", seen)
    assert first.text.startswith("[v] ") and first.tokens == 7 and first.prompt_tokens > 0
    assert first.ttft is not None and first.ttft >= 0.05 and first.prompt_cached_tokens is None
    assert seen and seen == sorted(set(seen))  # progress: content chunks so far, increasing
    second = ask(server, "review lexer.py")  # the role prompt is in the slot's cache now
    assert second.prompt_cached_tokens is not None and second.prompt_cached_tokens > 0
    assert server.stats()["completed"] == 2


def test_an_error_event_mid_stream_fails_the_request(sims: Callable[..., SimServer]) -> None:
    server = sims(name="v", error_line_rate=1.0, tokens_per_second=1000)
    with pytest.raises(ServerError, match="error in stream: simulated error mid-stream"):
        ask(server, "review parser.py")


def test_the_parser_counts_chunks_without_usage_and_refuses_a_cut_stream() -> None:
    req = ChatRequest(model="m", messages=[])
    answer = SseAnswer("v")
    lines = [": keep-alive", "", 'data: {"choices": [{"delta": {"role": "assistant"}}]}']
    lines += [f'data: {{"choices": [{{"delta": {{"content": "t{i} "}}}}]}}' for i in range(3)]
    assert [answer.feed(line) for line in lines] == [False, False, False, True, True, True]
    with pytest.raises(MalformedResponse, match=r"server 'v': stream ended without \[DONE\]"):
        answer.response(req, 0.0, None)
    answer.feed("data: [DONE]")
    done = answer.response(req, 0.0, 0.1)
    assert (done.text, done.tokens, done.prompt_tokens) == ("t0 t1 t2 ", 3, 0)  # no usage: one token per chunk
    with pytest.raises(MalformedResponse, match="invalid event data"):
        SseAnswer("v").feed("data: {not json")
