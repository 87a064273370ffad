"""OpenAI-compatible `/v1/chat/completions` (vLLM, llama.cpp server, LM Studio, Ollama's /v1).

Streaming (server-sent events), as the native Ollama backend: it gives the time
to first token and live `tokens_generated` progress, and a 200 stream that ends
in an `error` event or without `[DONE]` fails the request instead of returning
half an answer. Token usage is asked for with `stream_options.include_usage`
(OpenAI, vLLM, llama.cpp server and Ollama send it in a last chunk); a server
that sends none is counted by content chunks, one token each, as these servers
stream them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from teamorch.actors.backends import HttpBackend, TokenSink, stream_object
from teamorch.errors import MalformedResponse, ServerError
from teamorch.messages import ChatRequest, ChatResponse

# Ollama option names -> OpenAI request fields.
_OPTION_MAP = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
}


@dataclass
class SseAnswer:
    """What one streamed chat completion said so far, fed its event-stream lines in order."""

    server: str
    pieces: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    done: bool = False  # `[DONE]` seen

    def feed(self, line: str) -> bool:
        """Take one line; True when it added content (a token, for progress). An `error` event raises."""
        if not line.startswith("data:"):
            return False  # blank separators, `: keep-alive` comments, `event:` names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return False
        chunk = stream_object(self.server, data, "event data")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        content = ((choices[0].get("delta") or {}).get("content") or "") if choices else ""
        if content:
            self.pieces.append(content)
        return bool(content)

    def response(self, req: ChatRequest, started: float, ttft: float | None) -> ChatResponse:
        if not self.done:
            raise MalformedResponse(self.server, "stream ended without [DONE]")
        usage = self.usage or {}
        return ChatResponse(
            text="".join(self.pieces),
            model=req.model,
            server=self.server,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # vLLM, llama.cpp and Ollama's /v1 report cached prompt tokens here (Ollama only when some were cached).
            prompt_cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            tokens=int(usage["completion_tokens"]) if "completion_tokens" in usage else len(self.pieces),
            ttft=ttft,
            total_seconds=time.monotonic() - started,
        )


class OpenAIBackend(HttpBackend):
    async def chat(self, req: ChatRequest, on_tokens: TokenSink | None = None) -> ChatResponse:
        payload: dict[str, Any] = {
            "model": req.model,
            "messages": req.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key, value in req.options.items():
            if key in _OPTION_MAP:
                payload[_OPTION_MAP[key]] = value
        if isinstance(req.format, dict):
            payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": req.format}}
        elif req.format == "json":
            payload["response_format"] = {"type": "json_object"}
        started = time.monotonic()
        ttft: float | None = None
        answer = SseAnswer(self.name)
        # Read to the end, past `[DONE]`, so the keep-alive connection goes back to the pool.
        async with self.post_lines("/v1/chat/completions", payload, req.model) as lines:
            async for line in lines:
                if answer.feed(line):
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    if on_tokens is not None:
                        on_tokens(len(answer.pieces))
        return answer.response(req, started, ttft)

    async def models(self) -> tuple[list[str] | None, list[str] | None]:
        try:
            data = await self.get_json("/v1/models")
        except ServerError as exc:
            if exc.status == 404:
                return None, None
            raise
        return [m["id"] for m in data.get("data", []) if "id" in m], None
