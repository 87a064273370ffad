"""The simulator's pure bookkeeping: per-slot prefix caches and model residency.

Kept apart from `teamorch.sim` (sockets, asyncio, wire formats) because these are the
rules a cache-aware router is judged against, so they should read like the Ollama code
they copy and be testable without a server:

- `SlotCaches` is one loaded model's parallel slots, each holding the tokens in its KV
  cache. A request takes the *free* slot with the longest common prefix with its prompt
  (ties: the lowest slot), as Ollama's runner does (`findLongestCacheSlot` in
  `runner/ollamarunner/cache.go`: slots scanned in order, a later one taken only for a
  strictly longer prefix; not the least recently used one), and evaluates only the rest,
  always at least one token, since the model needs the last prompt token's logits to
  sample from. That is Ollama's default; with OLLAMA_MULTIUSER_CACHE set the runner uses
  `findBestCacheSlot` instead (the least recently used free slot, into which the longest
  matching prefix is copied), which this simulator does not model.
- `Residency` is which models are in memory, least recently used first, with the
  loading and draining sets the simulator's scheduler needs to cap `max_loaded`.

Tokens are the whitespace-separated words of the rendered prompt (`tokenize`; rendered =
the message contents in order, or `/api/generate`'s system prompt then prompt; no chat
template). A real tokenizer splits finer, but a shared prefix of words is a shared prefix
of tokens, which is all prefix caching depends on, and word counts are what
`prompt_eval_count` has always reported here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


def tokenize(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class Slot:
    """One parallel sequence of a loaded model: its KV cache and when it last went idle."""

    tokens: tuple[str, ...] = ()
    busy: bool = False
    freed_at: float | None = None  # None: never used since load or since the last counter reset


@dataclass(frozen=True)
class Taken:
    """What `SlotCaches.take` decided: the slot, how many prompt tokens it already holds,
    and how long the slot sat idle before this request (None if that is not known)."""

    slot: Slot
    cached: int
    gap: float | None


class SlotCaches:
    """A model's slots. The list grows to the configured count on demand and is only read up
    to it, so `slots` can change live: after a shrink, slots past the new count stay busy
    until released and are never chosen again (the caller admits only while fewer than
    `n` requests run, so a free slot always exists among the first `n`)."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []

    def take(self, prompt: Sequence[str], n: int, now: float) -> Taken:
        while len(self.slots) < n:
            self.slots.append(Slot())
        best: Slot | None = None
        longest = -1
        for slot in self.slots[:n]:
            if not slot.busy and (k := common_prefix(slot.tokens, prompt)) > longest:
                best, longest = slot, k
        if best is None:
            raise RuntimeError("no free slot: the caller admits only below the slot count")
        cached = min(longest, max(len(prompt) - 1, 0))
        best.busy, best.tokens = True, tuple(prompt[:cached])
        gap = None if best.freed_at is None else now - best.freed_at
        return Taken(best, cached, gap)

    @staticmethod
    def release(slot: Slot, now: float) -> None:
        slot.busy, slot.freed_at = False, now

    def forget_idle_times(self) -> None:
        """After a counter reset, idle time from before it must not count as a gap."""
        for slot in self.slots:
            slot.freed_at = None


class Residency:
    """Models in memory, least recently used first. `loading` models hold a place already;
    `draining` ones are chosen for eviction and take no new requests until unloaded."""

    def __init__(self, initial: Iterable[str]) -> None:
        self.order: OrderedDict[str, None] = OrderedDict.fromkeys(initial)
        self.loading: set[str] = set()
        self.draining: set[str] = set()

    def resident(self, model: str) -> bool:
        return model in self.order

    def usable(self, model: str) -> bool:
        return model in self.order and model not in self.draining

    def touch(self, model: str) -> None:
        if model in self.order:
            self.order.move_to_end(model)

    def full(self, max_loaded: int | None) -> bool:
        return max_loaded is not None and len(self.order) + len(self.loading) >= max_loaded

    def victim(self, busy: Callable[[str], bool]) -> str | None:
        """The model to unload: the least recently used idle one, else the least recently used
        (whose running requests must then finish first); None if every place is still loading.
        Idle first because Ollama, too, unloads an idle runner before a busy one."""
        idle = [m for m in self.order if not busy(m)]
        return idle[0] if idle else next(iter(self.order), None)

    def loaded(self, model: str) -> None:
        self.loading.discard(model)
        self.order[model] = None
        self.order.move_to_end(model)

    def evict(self, model: str) -> None:
        self.order.pop(model, None)
        self.draining.discard(model)
