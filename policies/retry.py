"""When to try again, where, and when to stop sending a server anything.

Pure functions and a tiny state machine, driven by the caller's clock, so the
rules are testable without sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]

# Error kinds (teamorch.errors.ServerError.kind) and what they mean for the task.
RETRY_SAME_SERVER_LATER = frozenset({"busy"})
NEVER_RETRY_SAME_SERVER = frozenset({"model_not_found", "unreachable", "error", "timeout", "malformed"})
# Only real breakage counts toward opening a circuit: a 404 or a 503 says the box works.
CIRCUIT_FAILURES = frozenset({"unreachable", "error", "timeout", "malformed"})


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """'Full jitter' exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    Jitter keeps several specialists that failed together from retrying in lockstep.
    """
    rng = rng or random.Random()
    # Clamp the exponent: a long run of 503s must not overflow float (2**1024 does).
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 1023)))


def exclude_after(kind: str) -> bool:
    """Whether a failure of this kind removes the server from this task's candidates."""
    return kind not in RETRY_SAME_SERVER_LATER


@dataclass
class CircuitBreaker:
    """Closed -> open after `failures` consecutive breakages; half-open after `reset` seconds.

    In half-open one probe request is let through (the balancer's capacity
    rule admits one request to a half-open server): success closes the
    circuit, failure re-opens it for another `reset` seconds.
    """

    failures: int = 3
    reset: float = 30.0
    consecutive: int = 0
    opened_at: float | None = None
    probing: bool = False

    def state(self, now: float) -> CircuitState:
        if self.opened_at is None:
            return "closed"
        if now - self.opened_at >= self.reset:
            return "half_open"
        return "open"

    def on_acquire(self, now: float) -> None:
        if self.state(now) == "half_open":
            self.probing = True

    def record(self, ok: bool, kind: str, now: float) -> None:
        if ok:
            self.consecutive = 0
            self.opened_at = None
            self.probing = False
            return
        if kind not in CIRCUIT_FAILURES:
            self.probing = False
            return
        self.consecutive += 1
        if self.probing or self.consecutive >= self.failures:
            self.opened_at = now
        self.probing = False
