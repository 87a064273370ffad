"""Where a prompt's prefix is probably cached: prompt signatures and a per-slot index kept from routing history.

Ollama keeps one KV cache per parallel slot of a loaded model and hands a
request the free slot with the longest common token prefix; only the tokens
after it are evaluated again. A router that knows which prefixes it sent
where can send the next request with the same prefix to the same slots. It
does not need to ask the servers: like SGLang's cache-aware router (an
"approximate tree" per worker built from the requests it routed, no cache
queries) and llm-d's prefix scorer (a prompt cut into blocks whose hashes are
chained, each covering everything before it, looked up in a per-server LRU),
the balancer remembers what it routed. What is taken from them and what is
not:

* Blocks and chained hashes (llm-d): a prompt is cut where its content
  changes hands, in the stable-first order of `teamorch.policies.prompting`
  (role prompt; problem and shared context; upstream findings; the task's own
  part), and block k's hash covers blocks 1..k, so equal hashes mean an equal
  prefix and the longest match is the count of leading equal hashes. Blocks
  follow meaning, not a fixed token count: a whole block either matches or
  not, so the index under-estimates a match that ends inside a block (the
  server may reuse a few more tokens; it never reuses fewer).
* Capacity (both bound the index with an LRU): here the bound is exact,
  because Ollama holds one prompt per slot: `SlotIndex` has one entry per
  slot, and a request takes the free slot with the longest match (ties: the
  lowest slot), the same rule the server applies, so the index is the
  server's state whenever the balancer is its only client.
* No match-rate threshold and no balance thresholds (SGLang's
  `cache_threshold`, `balance_abs_threshold`/`balance_rel_threshold`; llm-d
  adds weighted prefix and queue scores): a match is worth its uncached
  tokens x the server's measured prefill seconds, which the scheduler adds to
  the queue wait and generation time (`teamorch.policies.balancing`), so
  "queue behind the hot prefix" and "spill to a cold server" are compared in
  seconds. That comparison is the bounded-load rule.

Corrections come from the servers: a model load clears the slots of that
model (`forget`), a failed request's slot is cleared (its contents are
unknown), and every health check drops the entries of models no longer
loaded (see `teamorch.policies.fleet`).

Token counts are whitespace-separated words of each block, the unit the
simulator (`teamorch.sim_model.tokenize`) counts in. A real tokenizer counts
more tokens per word, but the balancer measures each server's prefill in
seconds per *its own* token (from the uncached fraction the server reports),
so the unit cancels out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HASH_HEX = 16  # 64 bits per block hash: collisions are irrelevant at the number of prefixes a team routes


@dataclass(frozen=True)
class Signature:
    """A prompt's prefix signature: `chain[k]` hashes blocks 0..k, `tokens[k]` counts their tokens."""

    chain: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    total: int = 0  # every token of the prompt (the chain may cover less)


def count_tokens(text: str) -> int:
    return len(text.split())


def signature(blocks: Iterable[str]) -> Signature:
    """Chained hashes of the non-empty `blocks`, in order, with their cumulative token counts.

    Empty blocks are skipped, so a prompt without upstream findings still
    shares its first blocks with one that has them.
    """
    chain: list[str] = []
    tokens: list[int] = []
    digest, total = "", 0
    for block in blocks:
        if not block:
            continue
        digest = hashlib.sha256(f"{digest}\x00{block}".encode()).hexdigest()[:HASH_HEX]
        total += count_tokens(block)
        chain.append(digest)
        tokens.append(total)
    return Signature(tuple(chain), tuple(tokens), total)


def matched_tokens(chain: Sequence[str], tokens: Sequence[int], cached: Sequence[str]) -> int:
    """Tokens of a prompt (`chain`, `tokens`) that a cache holding the prompt `cached` already has.

    Capped one below the prompt's end: the server always evaluates the last
    prompt token, whose logits it samples from.
    """
    k = 0
    for mine, theirs in zip(chain, cached, strict=False):
        if mine != theirs:
            break
        k += 1
    if not k:
        return 0
    return max(0, min(tokens[k - 1], tokens[-1] - 1))


def server_preference(
    held_model: str | None, held: Sequence[str], model: str, chain: Sequence[str], tokens: Sequence[int]
) -> tuple[int, bool]:
    """How the server ranks a free slot for a prompt (higher first; ties: the lowest slot).

    First the matched tokens. Then a slot holding any prompt of the model beats
    an empty one: real prompts share at least their chat template's first
    tokens, so the server's longest-common-prefix rule hands a new prompt a
    slot whose cache another prefix still needs rather than an empty slot.
    The planner counts that loss (`teamorch.policies.balancing`).
    """
    same = held_model == model
    return (matched_tokens(chain, tokens, held) if same else 0, same and bool(held))


@dataclass
class CachedSlot:
    """One server slot as the balancer believes it is: whose prompt its KV cache holds, and whether it is in use."""

    model: str | None = None
    chain: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    busy: bool = False


@dataclass(frozen=True)
class SlotState:
    """A slot as a planner sees it: what it holds and, when busy, the expected seconds until it frees."""

    model: str | None = None
    chain: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    free_in: float | None = None  # None: free now


class SlotIndex:
    """One server's slots (`slots` of them), mirrored from the requests the balancer sent there."""

    def __init__(self, slots: int) -> None:
        self.slots = [CachedSlot() for _ in range(max(1, slots))]

    def best(self, model: str, chain: Sequence[str], tokens: Sequence[int]) -> tuple[int | None, int]:
        """(the free slot the server would give this prompt, its cached tokens); (None, 0) when all are busy."""
        pick: int | None = None
        best = (-1, False)
        for i, slot in enumerate(self.slots):
            if slot.busy:
                continue
            key = server_preference(slot.model, slot.chain, model, chain, tokens)
            if key > best:
                pick, best = i, key
        return pick, max(0, best[0])

    def take(self, model: str, chain: Sequence[str], tokens: Sequence[int]) -> tuple[int | None, int]:
        """Occupy the slot the server will choose; the slot then holds this prompt. (slot, cached tokens)."""
        pick, cached = self.best(model, chain, tokens)
        if pick is not None:
            self.slots[pick] = CachedSlot(model, tuple(chain), tuple(tokens), busy=True)
        return pick, cached

    def follow(self, slot: int, model: str, chain: Sequence[str], tokens: Sequence[int]) -> int:
        """Queue a prompt behind the request on busy `slot` (it starts when that one ends); its cached tokens.

        It finds what that request leaves in the cache, and the slot then holds it.
        """
        held = self.slots[slot]
        cached = matched_tokens(chain, tokens, held.chain) if held.model == model else 0
        self.slots[slot] = CachedSlot(model, tuple(chain), tuple(tokens), busy=True)
        return cached

    def release(self, slot: int | None, known: bool = True) -> None:
        """Free `slot`; `known=False` (the request failed) also forgets what it holds."""
        if slot is None or slot >= len(self.slots):
            return
        held = self.slots[slot]
        self.slots[slot] = CachedSlot(held.model, held.chain, held.tokens) if known else CachedSlot()

    def forget(self, models: Iterable[str], keep: int | None = None) -> None:
        """Drop what the slots of `models` hold (evicted or reloaded), except slot `keep`; busy slots stay busy."""
        gone = set(models)
        for i, slot in enumerate(self.slots):
            if i != keep and slot.model in gone:
                self.slots[i] = CachedSlot(busy=slot.busy)

    def models(self) -> set[str]:
        return {s.model for s in self.slots if s.model is not None}

    def states(self, free_in: Mapping[int, float]) -> list[SlotState]:
        """What a planner reads; `free_in` gives each busy slot's expected seconds until it frees."""
        return [
            SlotState(s.model, s.chain, s.tokens, free_in.get(i, 0.0) if s.busy else None)
            for i, s in enumerate(self.slots)
        ]
