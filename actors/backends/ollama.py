"""Native Ollama: streaming `/api/chat`, `/api/tags`, `/api/ps`.

Streaming is used even though we return the whole text: it gives the time to
first token, and a 200 stream can still end in an `{"error": ...}` line, which
must fail the request rather than return half an answer.
"""

from __future__ import annotations

import time
from typing import Any

from teamorch.actors.backends import HttpBackend, TokenSink, stream_object
from teamorch.errors import MalformedResponse, ServerError
from teamorch.messages import ChatRequest, ChatResponse

NS = 1e-9


class OllamaBackend(HttpBackend):
    async def chat(self, req: ChatRequest, on_tokens: TokenSink | None = None) -> ChatResponse:
        payload: dict[str, Any] = {"model": req.model, "messages": req.messages, "stream": True}
        if req.options:
            payload["options"] = req.options
        if req.format is not None:
            payload["format"] = req.format
        started = time.monotonic()
        ttft: float | None = None
        pieces: list[str] = []
        final: dict[str, Any] | None = None
        # Read to the end (Ollama sends nothing after `done`), so the keep-alive connection goes back to the pool:
        # one whose body was left unread is closed, and the next request would pay a connect.
        async with self.post_lines("/api/chat", payload, req.model) as lines:
            async for line in lines:
                chunk = None if final is not None else self._chunk(line)
                if chunk is None:
                    continue
                content = (chunk.get("message") or {}).get("content") or ""
                if content:
                    if ttft is None:
                        ttft = time.monotonic() - started
                    pieces.append(content)
                    if on_tokens is not None:
                        on_tokens(len(pieces))  # Ollama streams one token per line
                if chunk.get("done"):
                    final = chunk
        if final is None:
            raise MalformedResponse(self.name, "stream ended without a final 'done' line")
        return ChatResponse(
            text="".join(pieces),
            model=req.model,
            server=self.name,
            prompt_tokens=int(final.get("prompt_eval_count") or 0),
            tokens=int(final.get("eval_count") or 0),
            ttft=ttft,
            eval_seconds=final["eval_duration"] * NS if final.get("eval_duration") else None,
            total_seconds=time.monotonic() - started,
            load_seconds=final["load_duration"] * NS if final.get("load_duration") else None,
            prompt_cached_tokens=_int_or_none(final.get("prompt_eval_cached_count")),
            prompt_eval_seconds=final["prompt_eval_duration"] * NS if final.get("prompt_eval_duration") else None,
        )

    def _chunk(self, line: str) -> dict[str, Any] | None:
        """One NDJSON line of the stream (None for a blank one); an `error` line fails the request."""
        if not line.strip():
            return None
        return stream_object(self.name, line, "NDJSON line")

    async def models(self) -> tuple[list[str] | None, list[str] | None]:
        tags = await self.get_json("/api/tags")
        present = [m.get("name") or m.get("model") for m in tags.get("models", [])]
        try:
            ps = await self.get_json("/api/ps")
            loaded: list[str] | None = [m.get("name") or m.get("model") for m in ps.get("models", [])]
        except ServerError:
            loaded = None
        return _with_latest(present), _with_latest(loaded) if loaded is not None else None


def _int_or_none(value: Any) -> int | None:
    """Ollama omits a count it does not report (older servers have no prompt_eval_cached_count)."""
    return int(value) if isinstance(value, int | float) else None


def _with_latest(names: list[str]) -> list[str]:
    """Ollama lists `llama3:latest`; users write `llama3`. Accept both spellings."""
    out = list(names)
    for name in names:
        if name.endswith(":latest"):
            out.append(name.removesuffix(":latest"))
    return out
