"""When a streaming call reports how far it got: a throttle over token counts, pure arithmetic.

A server actor sees every chunk of a stream (one per token with Ollama, one
per token in llama.cpp's loop); sending an event per chunk would make a
100-task run send thousands of messages a second to one coordinator and grow
its journal by a line per token. So a call reports at most once every
`REPORT_EVERY` seconds, and never in its first `REPORT_EVERY` seconds: most
calls that finish faster report nothing, their `task_finished` already says
it all.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds between two reports of one call: twice the live view's redraw rate, slow enough that a run of
# hundreds of concurrent calls stays at a few hundred events per second.
REPORT_EVERY = 0.5


@dataclass(frozen=True)
class Progress:
    """One report: tokens so far, seconds from the call's start to its first token, and the rate since."""

    tokens: int
    ttft: float
    tokens_per_second: float


@dataclass
class ProgressThrottle:
    """One call's throttle: feed it each token count as it arrives (`seen`), report when it says so.

    `started` is when the call was sent (monotonic seconds), so the first
    report waits `every` seconds from there; a later one waits `every` from
    the previous report and needs new tokens since it (a stalled stream sends
    nothing new to report).
    """

    started: float
    every: float = REPORT_EVERY
    first_token_at: float | None = None
    reported_at: float | None = None
    reported_tokens: int = 0

    def seen(self, tokens: int, now: float) -> Progress | None:
        """`tokens` generated so far at `now`: a `Progress` to send, or None (too soon, or nothing new)."""
        if tokens <= 0:
            return None
        if self.first_token_at is None:
            self.first_token_at = now
        since = self.started if self.reported_at is None else self.reported_at
        if now - since < self.every or tokens <= self.reported_tokens:
            return None
        self.reported_at, self.reported_tokens = now, tokens
        return Progress(
            tokens=tokens,
            ttft=self.first_token_at - self.started,
            tokens_per_second=generation_rate(tokens, self.first_token_at, now),
        )


def generation_rate(tokens: int, first_token_at: float, now: float) -> float:
    """Decode speed: the tokens after the first over the time since the first arrived (the first token's
    wait is prefill, which `ttft` reports)."""
    elapsed = now - first_token_at
    return (tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else 0.0
