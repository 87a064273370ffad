"""An Ollama-API simulator: a real loopback HTTP server with Ollama's concurrency rules.

Why a simulator rather than mocks: the balancer's bugs live in timing and in
the wire protocol (slots, FIFO queueing, 503 under overload, NDJSON streams that
end in an error line, sockets that vanish mid-request). Only a real socket with
known service times exercises those paths, makes fault tests deterministic and
gives benchmarks a ground truth (`/sim/stats` reports the peak concurrency the
server actually saw). Several `SimServer`s can run in one process, each with its
own thread and event loop, so one test can stand up a whole fleet.

Beyond admission it models what a cache- and residency-aware router is judged on
(rules in `teamorch.sim_model`): per-slot prefix caches with a prefill cost per
uncached prompt token (`prefill_tps`), and at most `max_loaded` resident models
with `load_time` per load, evicting the least recently used. Responses carry
Ollama's `prompt_eval_count` / `prompt_eval_cached_count` / `prompt_eval_duration`
/ `load_duration`, and `/sim/stats` the server-side truth: prompt and cached
tokens, loads, evictions and the idle gap of each slot between two requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import re
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from teamorch.config import config_error_from, read_yaml
from teamorch.errors import ConfigError
from teamorch.sim_model import Residency, SlotCaches, Taken, tokenize

if TYPE_CHECKING:
    from typing import Self

MAX_LINES = 20  # streamed content lines per request: pace per chunk, never per token
BUSY = "server busy, please try again.  maximum pending requests exceeded"  # Ollama's wording
GAP_SAMPLES = 1024  # the most recent slot gaps kept for /sim/stats (a bounded window, not the whole run)
# The most recent requests kept for /sim/stats: who asked for what, and (once admitted) on which slot, when, and how
# much of the prompt that slot held, so a run's per-slot timeline can be read from the server side.
REQUEST_LOG = 256
_COUNTERS = (
    "requests",
    "completed",
    "failed",
    "rejected_503",
    "not_found",
    "cancelled",
    "prompt_tokens",  # prompt tokens of admitted requests, cached or not (Ollama's prompt_eval_count)
    "cached_prompt_tokens",  # of which already in the slot's KV cache: hit rate = cached / prompt tokens
    "prefix_hits",  # admitted requests that found any of their prefix cached
    "model_loads",
    "evictions",
    "slowed",  # requests generated at `slow_factor` of the configured speed (the slow-tail fault)
    "tokens",
    "connections",  # TCP connections that sent a request: a client reusing keep-alive connections opens few
)
Dialect = Literal["chat", "generate", "openai"]  # /api/chat, /api/generate, /v1/chat/completions
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
    loaded: list[str] | None = None  # resident at start; None: every model (the first `max_loaded` if set)
    max_loaded: int | None = Field(default=None, ge=1)  # OLLAMA_MAX_LOADED_MODELS; None: no limit
    slots: int = Field(default=1, ge=1)
    max_queue: int = Field(default=512, ge=0)
    tokens_per_second: float = Field(default=50.0, gt=0)
    ttft: float = Field(default=0.05, ge=0)
    prefill_tps: float | None = Field(default=None, gt=0)  # uncached prompt tokens/s after ttft; None: free
    load_time: float = Field(default=0.0, ge=0)
    default_tokens: int = Field(default=20, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_line_rate: float = Field(default=0.0, ge=0, le=1)
    die_after: int | None = Field(default=None, ge=1)
    stall: bool = False
    # The slow tail: a request drawn slow (probability `slow_rate`) generates at `slow_factor` x tokens/s, as on a
    # box with a noisy neighbour or a throttling GPU. It answers correctly, only late: what hedging is for.
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_factor: float = Field(default=0.1, gt=0, le=1)
    malformed: bool = False
    reply_bytes: int | None = Field(default=None, ge=1)  # pad every answer to this size: a runaway response
    echo: bool = False
    replies: list[SimReply] = []
    seed: int = 0

    @model_validator(mode="after")
    def _loaded_fits(self) -> SimConfig:
        if self.max_loaded is not None and self.loaded is not None and len(self.loaded) > self.max_loaded:
            raise ValueError(f"loaded lists {len(self.loaded)} models but max_loaded is {self.max_loaded}")
        return self

    def initially_loaded(self) -> list[str]:
        models = self.models if self.loaded is None else self.loaded
        return models if self.max_loaded is None else models[: self.max_loaded]


class _Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    servers: list[SimConfig]


@dataclass
class _Slots:
    """Per-model admission state. A hand-rolled FIFO (not a Semaphore) so `slots` can change live;
    each waiter carries its prompt because which slot it gets depends on what the free slots hold."""

    active: int = 0
    waiters: deque[tuple[asyncio.Future[Taken], tuple[str, ...]]] = field(default_factory=deque)
    caches: SlotCaches = field(default_factory=SlotCaches)


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


def _generate_prompt(body: dict[str, Any]) -> str:
    """`/api/generate` renders the system prompt ahead of the prompt (no template in a simulator)."""
    return "\n".join(p for p in (body.get("system"), body.get("prompt")) if isinstance(p, str) and p)


def _parse(body: dict[str, Any], dialect: Dialect) -> tuple[str, Any, bool]:
    """(prompt text, requested output tokens, stream) as each dialect spells them."""
    if dialect == "openai":
        asked = body.get("max_tokens", body.get("max_completion_tokens"))
        return _prompt(body.get("messages")), asked, bool(body.get("stream", False))
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    prompt = _prompt(body.get("messages")) if dialect == "chat" else _generate_prompt(body)
    return prompt, options.get("num_predict"), bool(body.get("stream", True))


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
        self._fresh_box()
        self._gaps: deque[float] = deque(maxlen=GAP_SAMPLES)
        self._log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG)
        self._gap_count = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._peers: set[object] = set()  # client addresses seen since the last reset (the `connections` count)
        self._peak = 0
        self._peak_model: dict[str, int] = {}
        self._busy_total = 0.0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.restarts: list[float] = []  # wall-clock times `restart` listened again
        self._die_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)

    def _fresh_box(self) -> None:
        """What a process starts with and a restart loses: resident models, slots and their caches, queues,
        and the asyncio primitives, which belong to the loop that made them."""
        self._residency = Residency(self.config.initially_loaded())
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._scheduler = asyncio.Lock()  # one placement decision at a time, FIFO, as Ollama's scheduler
        self._changed = asyncio.Event()  # a slot freed, a pin dropped or a load ended: the scheduler looks again
        self._pins: Counter[str] = Counter()  # requests between their model's load and their slot
        self._slots: dict[str, _Slots] = {}
        self._in_flight = 0
        self._busy_since: float | None = None
        self._dead = False

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
                web.post("/api/generate", self._ollama_generate),
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
        port = self._port if self._port is not None else self.config.port  # a restart keeps its address
        await web.TCPSite(runner, self.config.host, port).start()
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

    def restart(self, down: float = 0.0) -> Self:
        """The box's process dies (in-flight streams drop) and comes back after `down` seconds on the SAME
        port, empty, as `systemctl restart ollama` would. Counters and the request log are kept: they are
        the test's record of the box, not the box's memory."""
        self.stop()
        time.sleep(down)
        self._fresh_box()
        self.start_in_thread()
        self.restarts.append(time.time())
        return self

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
            "loaded": list(self._residency.order),  # least recently used first
            "slot_gaps": self._gap_count,
            "slot_gap_median": statistics.median(gaps) if (gaps := list(self._gaps)) else None,
            "slot_gap_seconds": [round(g, 6) for g in gaps],  # the last GAP_SAMPLES, to pool across servers
            "requests_log": [dict(e) for e in self._log],  # REQUEST_LOG: {at, model, prompt, completed, slot, ...}
        }

    async def _reset(self, _request: web.Request) -> web.Response:
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._peers = set()
        self._peak = self._in_flight  # peaks restart from what is running now
        self._peak_model = {m: s.active for m, s in self._slots.items() if s.active}
        self._busy_total = 0.0
        self._busy_since = time.monotonic() if self._in_flight else None
        self._gaps.clear()
        self._gap_count = 0
        self._log.clear()
        for slots in self._slots.values():
            slots.caches.forget_idle_times()
        return web.json_response(self.stats())

    async def _reconfigure(self, request: web.Request) -> web.Response:
        """Turn fault knobs mid-test (host/port changes apply only at the next start). Patching
        `models` or `loaded` restarts the box's models: residency as configured, every prefix cache
        dropped, which is how benchmarks give each router the same cold start."""
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
        if "models" in patch or "loaded" in patch:  # a fresh start of the box's models: caches go too
            self._residency = Residency(new.initially_loaded())
            for slots in self._slots.values():
                slots.caches = SlotCaches()
        self._changed.set()  # max_loaded may have grown
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
        models = [m for m in self.config.models if self._residency.resident(m)]
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
    def _started(self, model: str, slots: _Slots, prompt: tuple[str, ...]) -> Taken:
        slots.active += 1
        self._in_flight += 1
        if self._in_flight == 1:
            self._busy_since = time.monotonic()
        self._peak = max(self._peak, self._in_flight)
        self._peak_model[model] = max(self._peak_model.get(model, 0), slots.active)
        self._residency.touch(model)
        taken = slots.caches.take(prompt, self.config.slots, time.monotonic())
        self._counts["prompt_tokens"] += len(prompt)
        self._counts["cached_prompt_tokens"] += taken.cached
        self._counts["prefix_hits"] += taken.cached > 0
        if taken.gap is not None:
            self._gaps.append(taken.gap)
            self._gap_count += 1
        return taken

    async def _acquire(self, model: str, prompt: tuple[str, ...]) -> Taken | None:
        """Take a generation slot, waiting FIFO; None means the queue is full (503)."""
        slots = self._slots.setdefault(model, _Slots())
        if slots.active < self.config.slots and not slots.waiters:
            return self._started(model, slots, prompt)
        if len(slots.waiters) >= self.config.max_queue:
            return None
        fut: asyncio.Future[Taken] = asyncio.get_running_loop().create_future()
        waiter = (fut, prompt)
        slots.waiters.append(waiter)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(model, fut.result())  # the slot was handed over just before we were cancelled
            elif waiter in slots.waiters:
                slots.waiters.remove(waiter)
            raise

    def _release(self, model: str, taken: Taken) -> None:
        slots = self._slots[model]
        SlotCaches.release(taken.slot, time.monotonic())
        slots.active -= 1
        self._in_flight -= 1
        if self._in_flight == 0 and self._busy_since is not None:
            self._busy_total += time.monotonic() - self._busy_since
            self._busy_since = None
        self._residency.touch(model)
        self._changed.set()
        self._wake(model)

    def _wake(self, model: str) -> None:
        slots = self._slots[model]
        while slots.waiters and slots.active < self.config.slots:
            fut, prompt = slots.waiters.popleft()
            if not fut.done():
                fut.set_result(self._started(model, slots, prompt))

    async def _admit(self, model: str, prompt: tuple[str, ...]) -> tuple[Taken, float] | None:
        """Residency, then a slot (None: the queue is full, 503). Also returns the seconds spent
        waiting for the model, which Ollama reports as load_duration."""
        load_wait, pinned = await self._resident(model)
        try:
            taken = await self._acquire(model, prompt)
        finally:
            if pinned:
                self._unpin(model)
        return None if taken is None else (taken, load_wait)

    async def _resident(self, model: str) -> tuple[float, bool]:
        """Wait until `model` is resident; returns (seconds waited, pinned).

        A request that waits for a load pins the model until it holds a slot (the caller
        unpins), or the next load could evict the model before the request resumes. A
        request for a model being drained for another load does not pin it: it queues
        behind that load, as Ollama's pending queue does, then loads the model again."""
        if self._residency.usable(model):
            return 0.0, False
        began, pinned = time.monotonic(), False
        try:
            while not (self._residency.usable(model) or (pinned and self._residency.resident(model))):
                if self._residency.resident(model):
                    async with self._scheduler:
                        pass
                elif not pinned:
                    self._pins[model] += 1
                    pinned = True
                else:
                    await asyncio.shield(self._load_task(model))  # one impatient client must not abort it
        except BaseException:
            if pinned:
                self._unpin(model)
            raise
        return time.monotonic() - began, pinned

    def _unpin(self, model: str) -> None:
        self._pins[model] -= 1
        self._changed.set()

    def _busy(self, model: str) -> bool:
        slots = self._slots.get(model)
        return self._pins[model] > 0 or (slots is not None and slots.active > 0)

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Sleep until a release, unpin or load makes `ready` true (only the scheduler waits here)."""
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    def _load_task(self, model: str) -> asyncio.Task[None]:
        """The load of `model`, shared by every request waiting for it."""
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.ensure_future(self._load(model))
        return task

    async def _load(self, model: str) -> None:
        """Make room, then load. Room is made under the scheduler lock, one decision at a time:
        with `max_loaded` models resident (or loading), the least recently used is unloaded,
        after its running requests finish, which is what Ollama does."""
        try:
            async with self._scheduler:
                while self._residency.full(self.config.max_loaded):
                    victim = self._residency.victim(self._busy)
                    if victim is None:  # every place is held by a model still loading
                        await self._until(lambda: self._residency.victim(self._busy) is not None)
                    else:
                        await self._unload(victim)
                self._residency.loading.add(model)
            await asyncio.sleep(self.config.load_time)
            self._residency.loaded(model)
            self._counts["model_loads"] += 1
        finally:
            self._residency.loading.discard(model)
            self._loading.pop(model, None)
            self._changed.set()

    async def _unload(self, model: str) -> None:
        """Drain, then evict: its slots and their prefix caches go with it."""
        self._residency.draining.add(model)
        try:
            await self._until(lambda: not self._busy(model))
        except BaseException:
            self._residency.draining.discard(model)
            raise
        self._residency.evict(model)
        self._slots.pop(model, None)
        self._counts["evictions"] += 1

    # --------------------------------------------------------------- generation
    def _reply_text(self, name: str, model: str, prompt: str, n: int) -> str:
        cfg = self.config
        for canned in cfg.replies:
            if re.search(canned.match, prompt):
                return canned.reply
        if cfg.reply_bytes:
            return "pad " * (cfg.reply_bytes // 4)
        if cfg.echo:
            return f"[{name}] {prompt}"
        head = [f"[{name}]", model, "answer:", hashlib.sha1(prompt.encode()).hexdigest()[:8]]
        return " ".join(head + ["tok"] * max(0, n - len(head)))

    async def _paced(self, text: str, n: int, factor: float = 1.0) -> AsyncIterator[tuple[str, int]]:
        """Yield (piece, tokens) chunks at `factor` x `tokens_per_second`, read live so it can change."""
        k = max(1, min(n, MAX_LINES))
        for j, piece in enumerate(_split(text, k)):
            tokens = n * (j + 1) // k - n * j // k
            await asyncio.sleep(tokens / (self.config.tokens_per_second * factor))
            self._counts["tokens"] += tokens
            yield piece, tokens

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    def _count_connection(self, request: web.Request) -> None:
        """A request from a client address (host, port) not seen since the last reset came on a new connection."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer not in self._peers:
            self._peers.add(peer)
            self._counts["connections"] += 1

    async def _ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "generate")

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    @staticmethod
    def _error(status: int, message: str, dialect: Dialect, kind: str) -> web.Response:
        body = {"error": {"message": message, "type": kind}} if dialect == "openai" else {"error": message}
        return web.json_response(body, status=status)

    async def _handle(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        """Count, apply faults, admit, generate; disconnects anywhere count as `cancelled`."""
        began = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "invalid JSON body", dialect, "invalid_request_error")
        if not isinstance(body, dict):
            return self._error(400, "expected a JSON object", dialect, "invalid_request_error")
        self._counts["requests"] += 1
        self._count_connection(request)
        entry = {"at": time.time(), "model": body.get("model"), "prompt": _parse(body, dialect)[0], "completed": False}
        self._log.append(entry)  # marked completed when its answer is sent: who got an output, and how often
        die_after = self.config.die_after
        if die_after is not None and self._counts["requests"] >= die_after and not self._dead:
            self._dead = True  # this request was accepted; now the box "crashes" under it
            self._die_task = asyncio.ensure_future(self._die())
        try:
            return await self._serve(request, body, dialect, began, entry)
        except (asyncio.CancelledError, ConnectionResetError):
            self._counts["cancelled"] += 1
            raise

    async def _serve(
        self, request: web.Request, body: dict[str, Any], dialect: Dialect, began: float, entry: dict[str, Any]
    ) -> web.StreamResponse:
        cfg = self.config
        if cfg.stall:
            await asyncio.Event().wait()  # a hung server: no headers, no bytes, ever
        model = self._resolve(body.get("model"))
        if model is None:
            self._counts["not_found"] += 1
            msg = f'model "{body.get("model")}" not found, try pulling it first'
            return self._error(404, msg, dialect, "not_found")
        if cfg.malformed:
            return web.Response(body=_GARBAGE, content_type="application/x-ndjson")
        fail, fail_line = self._rng.random() < cfg.error_rate, self._rng.random() < cfg.error_line_rate
        # Drawn only when the fault is on, so every seeded run without it sees the same errors as before.
        slow = cfg.slow_rate > 0 and self._rng.random() < cfg.slow_rate
        if fail:
            self._counts["failed"] += 1
            return self._error(500, "simulated failure", dialect, "server_error")
        text, asked, stream = _parse(body, dialect)
        if dialect == "generate" and not text:
            return await self._load_only(model)
        prompt = tokenize(text)
        admitted = await self._admit(model, prompt)
        if admitted is None:
            self._counts["rejected_503"] += 1
            return self._error(503, BUSY, dialect, "server_busy")
        taken, load_wait = admitted
        slots = self._slots[model].caches.slots
        entry.update(started=time.time(), slot=slots.index(taken.slot), cached=taken.cached, prompt_tokens=len(prompt))
        try:
            n = asked if isinstance(asked, int) and asked > 0 else cfg.default_tokens
            self._counts["slowed"] += slow
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            speed = cfg.slow_factor if slow else 1.0
            gen = _Gen(self, request, dialect, model, n, prompt, taken, began, load_wait, speed, usage)
            response = await gen.run(self._reply_text(cfg.name, model, text, n), stream, fail_line and stream)
            entry["completed"] = gen.completed
            return response
        finally:
            entry["ended"] = time.time()
            self._release(model, taken)

    async def _load_only(self, model: str) -> web.Response:
        """`/api/generate` without a prompt only loads the model: Ollama clients preload this way."""
        _wait, pinned = await self._resident(model)
        if pinned:
            self._unpin(model)
        done = {"model": model, "created_at": _now_iso(), "response": "", "done": True, "done_reason": "load"}
        return web.json_response(done)


class _Gen:
    """One admitted generation: prefill and pacing, the prefix cache it leaves in its slot,
    and the wire formats (Ollama's /api/chat and /api/generate NDJSON, OpenAI's SSE)."""

    def __init__(
        self,
        sim: SimServer,
        request: web.Request,
        dialect: Dialect,
        model: str,
        n: int,
        prompt: tuple[str, ...],
        taken: Taken,
        began: float,
        load_wait: float,
        speed: float = 1.0,
        include_usage: bool = False,
    ) -> None:
        self.sim, self.request, self.dialect, self.model, self.n = sim, request, dialect, model, n
        self.include_usage = include_usage  # OpenAI's `stream_options.include_usage`: a last chunk with usage only
        self.prompt, self.taken, self.began, self.load_wait = prompt, taken, began, load_wait
        self.speed = speed  # fraction of the configured tokens/s this generation runs at (the slow-tail fault)
        self.openai = dialect == "openai"
        self.id = f"chatcmpl-{next(sim._ids)}"
        self.resp: web.StreamResponse | None = None
        self.completed = False  # the whole answer was generated (an output the client may have received)

    async def _send(self, obj: Any) -> None:
        if self.resp is None:  # headers go out with the first token, as with Ollama
            ctype = "text/event-stream" if self.openai else "application/x-ndjson"
            self.resp = web.StreamResponse(headers={"Content-Type": ctype})
            await self.resp.prepare(self.request)
        data = json.dumps(obj) if not isinstance(obj, str) else obj
        await self.resp.write((f"data: {data}\n\n" if self.openai else data + "\n").encode())

    def _content(self, text: str) -> dict[str, Any]:
        if self.dialect == "generate":
            return {"response": text}
        return {"message": {"role": "assistant", "content": text}}

    def _chunk(self, content: str | None, finish: str | None = None) -> dict[str, Any]:
        if not self.openai:
            return {"model": self.model, "created_at": _now_iso(), **self._content(content or ""), "done": False}
        delta = {} if content is None else {"role": "assistant", "content": content}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _final(self, text: str, prefill: float, eval_start: float) -> dict[str, Any]:
        now, prompt_tokens, cached = time.monotonic(), len(self.prompt), self.taken.cached
        if self.openai:
            usage: dict[str, Any] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": self.n,
                "total_tokens": prompt_tokens + self.n,
            }
            if cached:  # as Ollama's OpenAI layer: the details appear only when something was cached
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
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
            **self._content(text),
            "done": True,
            "done_reason": "stop",
            "total_duration": _ns(now - self.began),
            "load_duration": _ns(self.load_wait),
            "prompt_eval_count": prompt_tokens,  # cached tokens included, as Ollama counts them
            "prompt_eval_cached_count": cached,
            "prompt_eval_duration": _ns(prefill),  # computed, not measured: tests compare it exactly
            "eval_count": self.n,
            "eval_duration": _ns(now - eval_start),
        }

    async def run(self, text: str, stream: bool, fail_line: bool) -> web.StreamResponse:
        sim, cfg = self.sim, self.sim.config
        uncached = len(self.prompt) - self.taken.cached
        prefill = cfg.ttft + (uncached / cfg.prefill_tps if cfg.prefill_tps else 0.0)
        await asyncio.sleep(prefill)
        self.taken.slot.tokens = self.prompt  # the whole prompt is in this slot's KV cache now
        eval_start = time.monotonic()
        cut = max(1, min(self.n, MAX_LINES)) // 2  # content lines before a simulated error
        sent = 0
        async for piece, _tokens in sim._paced(text, self.n, self.speed):
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
        self.taken.slot.tokens = self.prompt + tokenize(text)  # Ollama keeps the whole context in the slot
        final = self._final(text if not stream or self.openai else "", prefill, eval_start)
        sim._counts["completed"] += 1
        self.completed = True
        if not stream:
            return web.json_response(final)
        if self.openai:
            await self._send(self._chunk(None, "stop"))
            if self.include_usage:
                await self._send({**self._chunk(None), "choices": [], "usage": final["usage"]})
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
