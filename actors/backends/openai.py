"""OpenAI-compatible `/v1/chat/completions` (vLLM, llama.cpp server, LM Studio, Ollama's /v1).

Non-streaming: these servers report token usage reliably only on the final
object, and cancellation still works because closing the request closes the
connection. So a call here reports no progress (`tokens_generated`) while it runs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from teamorch.actors.backends import TRANSPORT_ERRORS, HttpBackend, TokenSink
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


class OpenAIBackend(HttpBackend):
    async def chat(self, req: ChatRequest, on_tokens: TokenSink | None = None) -> ChatResponse:
        payload: dict[str, Any] = {"model": req.model, "messages": req.messages, "stream": False}
        for key, value in req.options.items():
            if key in _OPTION_MAP:
                payload[_OPTION_MAP[key]] = value
        if isinstance(req.format, dict):
            payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": req.format}}
        elif req.format == "json":
            payload["response_format"] = {"type": "json_object"}
        started = time.monotonic()
        try:
            async with self.client.post(self.url("/v1/chat/completions"), json=payload) as response:
                body = await self.read_capped(response)
        except TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from exc
        if response.status != 200:
            raise self.error_for(response.status, body, req.model)
        try:
            data = json.loads(body)
            text = data["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
            raise MalformedResponse(self.name, "not an OpenAI chat.completion object") from exc
        usage = data.get("usage") or {}
        elapsed = time.monotonic() - started
        return ChatResponse(
            text=text,
            model=req.model,
            server=self.name,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # vLLM, llama.cpp and Ollama's /v1 report cached prompt tokens here (Ollama only when some were cached).
            prompt_cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            tokens=int(usage.get("completion_tokens") or 0),
            total_seconds=elapsed,
        )

    async def models(self) -> tuple[list[str] | None, list[str] | None]:
        try:
            data = await self.get_json("/v1/models")
        except ServerError as exc:
            if exc.status == 404:
                return None, None
            raise
        return [m["id"] for m in data.get("data", []) if "id" in m], None
