"""An Ollama-API simulator: a real loopback HTTP server with Ollama's concurrency rules.

Why a simulator rather than mocks: the balancer's bugs live in timing and in
the wire protocol (slots, FIFO queueing, 503 under overload, NDJSON streams that
end in an error line, sockets that vanish mid-request). Only a real socket with
known service times exercises those paths, makes fault tests deterministic and
gives benchmarks a ground truth (`/sim/stats` reports the peak concurrency the
server actually saw). Several `SimServer`s can run in one process, each with its
own thread and event loop, so one test can stand up a whole fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from teamorch.config import config_error_from, read_yaml
from teamorch.errors import ConfigError

if TYPE_CHECKING:
    from typing import Self

MAX_LINES = 20  # streamed content lines per request: pace per chunk, never per token
BUSY = "server busy, please try again.  maximum pending requests exceeded"  # Ollama's wording
_COUNTERS = ("requests", "completed", "failed", "rejected_503", "not_found", "cancelled", "tokens")
_GARBAGE = b'{"model": "sim", "message": {"content": "trunc\n<html>502 Bad Gateway</html>\n'


class SimReply(BaseModel):
    """A canned answer, so scenario tests can script what a "model" says (e.g. a plan JSON)."""

    model_config = ConfigDict(extra="forbid")
    match: str
    reply: str

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return value


class SimConfig(BaseModel):
    """Knobs of one simulated server; names mirror Ollama's env vars where one exists."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="sim", min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    models: list[str] = ["gemma3:270m"]
    loaded: list[str] | None = None
    slots: int = Field(default=1, ge=1)
    max_queue: int = Field(default=512, ge=0)
    tokens_per_second: float = Field(default=50.0, gt=0)
    ttft: float = Field(default=0.05, ge=0)
    load_time: float = Field(default=0.0, ge=0)
    default_tokens: int = Field(default=20, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_line_rate: float = Field(default=0.0, ge=0, le=1)
    die_after: int | None = Field(default=None, ge=1)
    stall: bool = False
    malformed: bool = False
    echo: bool = False
    replies: list[SimReply] = []
    seed: int = 0


class _Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    servers: list[SimConfig]


@dataclass
class _Slots:
    """Per-model admission state. A hand-rolled FIFO (not a Semaphore) so `slots` can change live."""

    active: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _prompt(messages: Any) -> str:
    """Join message contents; tolerates OpenAI's list-of-parts content so odd clients still work."""
    parts: list[str] = []
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if isinstance(content, str):
            parts.append(content)
    return "\n".join(parts)


def _split(text: str, k: int) -> list[str]:
    """Cut `text` into `k` word-aligned pieces whose concatenation is exactly `text`."""
    words = re.findall(r"\S+\s*|\s+", text) or [""]
    cuts = [-(-len(words) * j // k) for j in range(k + 1)]  # ceil: the first piece is never empty
    return ["".join(words[cuts[j] : cuts[j + 1]]) for j in range(k)]


class SimServer:
    """One simulated Ollama box. Runs in the caller's loop (`start`) or its own thread."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._loaded = set(config.models if config.loaded is None else config.loaded)
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._slots: dict[str, _Slots] = {}
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._in_flight = 0
        self._peak = 0
        self._peak_model: dict[str, int] = {}
        self._busy_total = 0.0
        self._busy_since: float | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._dead = False
        self._die_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError(f"sim {self.config.name!r} is not started")
        return f"http://{self.config.host}:{self._port}"

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Listen on the configured port (0 = any free one) inside the running loop."""
        app = web.Application()
        app.add_routes(
            [
                web.get("/", self._root),
                web.get("/api/version", self._version),
                web.get("/api/tags", self._tags),
                web.get("/api/ps", self._ps),
                web.post("/api/chat", self._ollama_chat),
                web.post("/v1/chat/completions", self._openai_chat),
                web.get("/sim/stats", self._stats),
                web.post("/sim/reset", self._reset),
                web.post("/sim/config", self._reconfigure),
            ]
        )
        # handler_cancellation: aiohttp >= 3.9 no longer cancels a handler whose client
        # went away; we need it so queued/generating requests notice disconnects.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        self._runner, self._port = runner, runner.addresses[0][1]

    async def close(self) -> None:
        """Stop listening, drop every connection and free the port. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._dead = True
        await self._drop(runner)
        for task in self._loading.values():
            task.cancel()
        await runner.cleanup()

    def start_in_thread(self) -> Self:
        """Serve from a private loop in a daemon thread; returns once the port is bound."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name=f"sim-{self.config.name}", daemon=True)
        thread.start()
        try:  # bind errors surface here, in the caller's thread
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            raise
        self._thread, self._loop = thread, loop
        return self

    def stop(self) -> None:
        """Close the server and join its thread; a no-op if not running in a thread."""
        thread, loop, self._thread, self._loop = self._thread, self._loop, None, None
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    async def _drop(self, runner: web.AppRunner) -> None:
        """Crash semantics: closing the listener refuses new connections; force-closing
        open ones (idle keep-alive too) makes in-flight clients see a dropped socket."""
        for site in runner.sites:
            await site.stop()
        if runner.server is not None:
            for conn in runner.server.connections:
                conn.force_close()

    async def _die(self) -> None:
        if self._runner is not None:
            await self._drop(self._runner)

    # --------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Counters since the last reset plus live gauges (`in_flight`, `queued`)."""
        busy = self._busy_total
        if self._busy_since is not None:
            busy += time.monotonic() - self._busy_since
        return {
            "name": self.config.name,
            **{k: self._counts[k] for k in _COUNTERS if k != "tokens"},
            "in_flight": self._in_flight,
            "queued": sum(len(s.waiters) for s in list(self._slots.values())),
            "max_in_flight": self._peak,
            "max_in_flight_per_model": dict(self._peak_model),
            "tokens": self._counts["tokens"],
            "busy_seconds": round(busy, 6),
        }

    async def _reset(self, _request: web.Request) -> web.Response:
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._peak = self._in_flight  # peaks restart from what is running now
        self._peak_model = {m: s.active for m, s in self._slots.items() if s.active}
        self._busy_total = 0.0
        self._busy_since = time.monotonic() if self._in_flight else None
        return web.json_response(self.stats())

    async def _reconfigure(self, request: web.Request) -> web.Response:
        """Turn fault knobs mid-test (host/port changes apply only at the next start)."""
        try:
            patch = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(patch, dict):
            return web.json_response({"error": "expected a JSON object"}, status=400)
        try:
            new = SimConfig.model_validate({**self.config.model_dump(), **patch})
        except ValidationError as exc:
            return web.json_response({"error": str(config_error_from(exc))}, status=400)
        self.config = new
        if "seed" in patch:
            self._rng = random.Random(new.seed)
        if "models" in patch or "loaded" in patch:
            self._loaded = set(new.models if new.loaded is None else new.loaded)
        for model in list(self._slots):
            self._wake(model)  # more slots may admit waiters now
        return web.json_response(new.model_dump())

    # ---------------------------------------------------------------- inventory
    async def _root(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")  # what probes of a real Ollama expect

    async def _version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-sim"})

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def _entry(self, model: str) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "size": 1,
            "digest": hashlib.sha1(model.encode()).hexdigest(),
            "details": {},
        }

    async def _tags(self, _request: web.Request) -> web.Response:
        return web.json_response({"models": [self._entry(m) for m in self.config.models]})

    async def _ps(self, _request: web.Request) -> web.Response:
        models = [m for m in self.config.models if m in self._loaded]
        return web.json_response(
            {"models": [{**self._entry(m), "size_vram": 1, "expires_at": "2999-01-01T00:00:00Z"} for m in models]}
        )

    def _resolve(self, model: Any) -> str | None:
        """Like Ollama, a bare name means its `:latest` tag."""
        if not isinstance(model, str):
            return None
        for name in (model, f"{model}:latest"):
            if name in self.config.models:
                return name
        return None

    # ---------------------------------------------------------------- admission
    def _started(self, model: str, slots: _Slots) -> None:
        slots.active += 1
        self._in_flight += 1
        if self._in_flight == 1:
            self._busy_since = time.monotonic()
        self._peak = max(self._peak, self._in_flight)
        self._peak_model[model] = max(self._peak_model.get(model, 0), slots.active)

    async def _acquire(self, model: str) -> bool:
        """Take a generation slot, waiting FIFO; False means the queue is full (503)."""
        slots = self._slots.setdefault(model, _Slots())
        if slots.active < self.config.slots and not slots.waiters:
            self._started(model, slots)
            return True
        if len(slots.waiters) >= self.config.max_queue:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slots.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(model)  # the slot was handed over just before we were cancelled
            elif fut in slots.waiters:
                slots.waiters.remove(fut)
            raise
        return True

    def _release(self, model: str) -> None:
        slots = self._slots[model]
        slots.active -= 1
        self._in_flight -= 1
        if self._in_flight == 0 and self._busy_since is not None:
            self._busy_total += time.monotonic() - self._busy_since
            self._busy_since = None
        self._wake(model)

    def _wake(self, model: str) -> None:
        slots = self._slots[model]
        while slots.waiters and slots.active < self.config.slots:
            fut = slots.waiters.popleft()
            if not fut.done():
                self._started(model, slots)
                fut.set_result(None)

    async def _ensure_loaded(self, model: str) -> float:
        """Wait for the model to load (once, shared by all requests); returns seconds waited."""
        if model in self._loaded:
            return 0.0
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.ensure_future(self._load(model))
        began = time.monotonic()
        await asyncio.shield(task)  # one impatient client must not abort the load for the rest
        return time.monotonic() - began

    async def _load(self, model: str) -> None:
        try:
            await asyncio.sleep(self.config.load_time)
            self._loaded.add(model)
        finally:
            self._loading.pop(model, None)

    # --------------------------------------------------------------- generation
    def _reply_text(self, name: str, model: str, prompt: str, n: int) -> str:
        cfg = self.config
        for canned in cfg.replies:
            if re.search(canned.match, prompt):
                return canned.reply
        if cfg.echo:
            return f"[{name}] {prompt}"
        head = [f"[{name}]", model, "answer:", hashlib.sha1(prompt.encode()).hexdigest()[:8]]
        return " ".join(head + ["tok"] * max(0, n - len(head)))

    async def _paced(self, text: str, n: int) -> AsyncIterator[tuple[str, int]]:
        """Yield (piece, tokens) chunks at `tokens_per_second`, read live so it can change."""
        k = max(1, min(n, MAX_LINES))
        for j, piece in enumerate(_split(text, k)):
            tokens = n * (j + 1) // k - n * j // k
            await asyncio.sleep(tokens / self.config.tokens_per_second)
            self._counts["tokens"] += tokens
            yield piece, tokens

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, openai=False)

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, openai=True)

    @staticmethod
    def _error(status: int, message: str, openai: bool, kind: str) -> web.Response:
        body = {"error": {"message": message, "type": kind}} if openai else {"error": message}
        return web.json_response(body, status=status)

    async def _chat(self, request: web.Request, openai: bool) -> web.StreamResponse:
        """Count, apply faults, admit, generate; disconnects anywhere count as `cancelled`."""
        began = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "invalid JSON body", openai, "invalid_request_error")
        if not isinstance(body, dict):
            return self._error(400, "expected a JSON object", openai, "invalid_request_error")
        self._counts["requests"] += 1
        die_after = self.config.die_after
        if die_after is not None and self._counts["requests"] >= die_after and not self._dead:
            self._dead = True  # this request was accepted; now the box "crashes" under it
            self._die_task = asyncio.ensure_future(self._die())
        try:
            return await self._serve(request, body, openai, began)
        except (asyncio.CancelledError, ConnectionResetError):
            self._counts["cancelled"] += 1
            raise

    async def _serve(
        self, request: web.Request, body: dict[str, Any], openai: bool, began: float
    ) -> web.StreamResponse:
        cfg = self.config
        if cfg.stall:
            await asyncio.Event().wait()  # a hung server: no headers, no bytes, ever
        model = self._resolve(body.get("model"))
        if model is None:
            self._counts["not_found"] += 1
            msg = f'model "{body.get("model")}" not found, try pulling it first'
            return self._error(404, msg, openai, "not_found")
        if cfg.malformed:
            return web.Response(body=_GARBAGE, content_type="application/x-ndjson")
        fail, fail_line = self._rng.random() < cfg.error_rate, self._rng.random() < cfg.error_line_rate
        if fail:
            self._counts["failed"] += 1
            return self._error(500, "simulated failure", openai, "server_error")
        load_wait = await self._ensure_loaded(model)
        if not await self._acquire(model):
            self._counts["rejected_503"] += 1
            return self._error(503, BUSY, openai, "server_busy")
        try:
            options = body.get("options") if isinstance(body.get("options"), dict) else {}
            asked = body.get("max_tokens", body.get("max_completion_tokens")) if openai else options.get("num_predict")
            n = asked if isinstance(asked, int) and asked > 0 else cfg.default_tokens
            prompt = _prompt(body.get("messages"))
            text = self._reply_text(cfg.name, model, prompt, n)
            stream = bool(body.get("stream", not openai))
            gen = _Gen(self, request, openai, model, n, len(prompt.split()), began, load_wait)
            return await gen.run(text, stream, fail_line and stream)
        finally:
            self._release(model)


class _Gen:
    """One admitted generation: pacing plus the two wire formats (Ollama NDJSON, OpenAI SSE)."""

    def __init__(
        self,
        sim: SimServer,
        request: web.Request,
        openai: bool,
        model: str,
        n: int,
        prompt_tokens: int,
        began: float,
        load_wait: float,
    ) -> None:
        self.sim, self.request, self.openai, self.model, self.n = sim, request, openai, model, n
        self.prompt_tokens, self.began, self.load_wait = prompt_tokens, began, load_wait
        self.id = f"chatcmpl-{next(sim._ids)}"
        self.resp: web.StreamResponse | None = None

    async def _send(self, obj: Any) -> None:
        if self.resp is None:  # headers go out with the first token, as with Ollama
            ctype = "text/event-stream" if self.openai else "application/x-ndjson"
            self.resp = web.StreamResponse(headers={"Content-Type": ctype})
            await self.resp.prepare(self.request)
        data = json.dumps(obj) if not isinstance(obj, str) else obj
        await self.resp.write((f"data: {data}\n\n" if self.openai else data + "\n").encode())

    def _chunk(self, content: str | None, finish: str | None = None) -> dict[str, Any]:
        if not self.openai:
            return {
                "model": self.model,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": content or ""},
                "done": False,
            }
        delta = {} if content is None else {"role": "assistant", "content": content}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _final(self, text: str, eval_start: float, gen_start: float) -> dict[str, Any]:
        now = time.monotonic()
        if self.openai:
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.n,
                "total_tokens": self.prompt_tokens + self.n,
            }
            return {
                "id": self.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }
        return {
            "model": self.model,
            "created_at": _now_iso(),
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "total_duration": _ns(now - self.began),
            "load_duration": _ns(self.load_wait),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": _ns(eval_start - gen_start),
            "eval_count": self.n,
            "eval_duration": _ns(now - eval_start),
        }

    async def run(self, text: str, stream: bool, fail_line: bool) -> web.StreamResponse:
        sim = self.sim
        gen_start = time.monotonic()
        await asyncio.sleep(sim.config.ttft)
        eval_start = time.monotonic()
        cut = max(1, min(self.n, MAX_LINES)) // 2  # content lines before a simulated error
        sent = 0
        async for piece, _tokens in sim._paced(text, self.n):
            if fail_line and sent >= cut:
                sim._counts["failed"] += 1
                err = "simulated error mid-stream"
                await self._send({"error": {"message": err, "type": "server_error"}} if self.openai else {"error": err})
                assert self.resp is not None
                await self.resp.write_eof()
                return self.resp
            if stream:
                await self._send(self._chunk(piece))
            sent += 1
        final = self._final(text if not stream or self.openai else "", eval_start, gen_start)
        sim._counts["completed"] += 1
        if not stream:
            return web.json_response(final)
        if self.openai:
            await self._send({**self._chunk(None, "stop"), "usage": final["usage"]})
            await self._send("[DONE]")
        else:
            await self._send(final)
        assert self.resp is not None
        await self.resp.write_eof()
        return self.resp


def run_fleet(configs: list[SimConfig]) -> None:
    """Serve every config until Ctrl-C; prints each URL since port 0 picks one at random."""

    async def main() -> None:
        servers = [SimServer(c) for c in configs]
        try:
            for server in servers:
                await server.start()
                print(f"sim {server.config.name}: {server.url} models={','.join(server.config.models)}", flush=True)
            await asyncio.Event().wait()
        finally:
            for server in servers:
                await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def load_fleet(path: str) -> list[SimConfig]:
    """Read `{servers: [...]}`; errors are ConfigErrors naming the file and e.g. `servers[1].slots`."""
    data = read_yaml(path)
    try:
        fleet = _Fleet.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc).located(str(path)) from None
    names = [c.name for c in fleet.servers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"duplicate server name {name!r}", field=f"servers[{i}].name", file=str(path))
    return fleet.servers
