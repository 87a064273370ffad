"""When to try again, where, and when to stop sending a server anything.

Pure functions and a tiny state machine, driven by the caller's clock and
random source, so the rules are testable without sleeping. The specialist
actor does the waiting and the calling; `next_step` decides what comes after
a failed attempt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from teamorch.config import RetryConfig
from teamorch.messages import ErrorClass, Outcome

CircuitState = Literal["closed", "open", "half_open"]
StepAction = Literal["retry_here", "retry_elsewhere", "give_up"]

# A 503 is back-pressure: the server works, it is full for now, so it stays a candidate.
RETRY_SAME_SERVER_LATER: frozenset[ErrorClass] = frozenset({"busy"})
# Only real breakage counts toward opening a circuit: a 404 or a 503 says the box works.
CIRCUIT_FAILURES: frozenset[Outcome] = frozenset({"unreachable", "error", "timeout", "malformed"})


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """'Full jitter' exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    Jitter keeps several specialists that failed together from retrying in lockstep.
    """
    rng = rng or random.Random()
    # Clamp the exponent: a long run of 503s must not overflow float (2**1024 does).
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 1023)))


def excludes_server(error_class: ErrorClass) -> bool:
    """Whether a failure of this class removes the server from this task's candidates."""
    return error_class not in RETRY_SAME_SERVER_LATER


@dataclass(frozen=True)
class Step:
    """What a task does after a failed attempt."""

    action: StepAction  # retry_here: the server stays a candidate; retry_elsewhere: exclude it; give_up
    delay: float = 0.0  # seconds to wait before the next attempt
    reason: str = ""  # why the task gives up, for the user's error text


# A server actor that Ray is restarting says nothing about the box for a while: a worker process restarts in
# a second or two. Past this grace it is not coming back soon (its node is gone and no other node offers
# its `ray_resources`), and waiting on it as if it were busy would hold every task to its deadline.
RESTART_GRACE_SECONDS = 10.0


def restarting_verdict(since: float, now: float) -> ErrorClass:
    """What a server actor restarting since `since` means: back-pressure for a while, then a lost server."""
    return "busy" if now - since < RESTART_GRACE_SECONDS else "unreachable"


def next_step(
    failures: Sequence[ErrorClass],
    remaining: float,
    max_retries: int,
    delays: RetryConfig,
    rng: random.Random | None = None,
) -> Step:
    """Retry (here or elsewhere, after a backoff) or give up, after the last of `failures`.

    `failures` holds the error class of every failed attempt of this task so
    far, the one just seen last; `remaining` is the time left before the task's
    deadline. A busy server (503) is retried until the deadline, with backoffs
    counted over busy answers alone, and never counts toward `max_retries`:
    back-pressure is not a failure of the task. Any other failure excludes the
    server and counts. A task gives up when the failures exceed `max_retries`,
    or when the backoff would end at or after the deadline (the next try could
    never start, so waiting for it helps nobody).
    """
    if excludes_server(failures[-1]):
        failed = sum(1 for f in failures if excludes_server(f))
        if failed > max_retries:
            return Step("give_up", reason=f"no retries left (max_retries={max_retries})")
        action: StepAction = "retry_elsewhere"
        delay = backoff(failed - 1, delays.base_delay, delays.max_delay, rng)
    else:
        action = "retry_here"
        delay = backoff(sum(1 for f in failures if not excludes_server(f)), delays.base_delay, delays.max_delay, rng)
    if delay >= remaining:
        return Step("give_up", reason=f"{max(remaining, 0.0):.1f}s left before the task deadline, too little to retry")
    return Step(action, delay)


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

    def answered(self, now: float) -> None:
        """A health check answered: an open circuit turns half-open now rather than after `reset`.

        The box is back (restarted, network healed), so one real request may
        test it; if chat is what is broken, that request fails and the circuit
        opens again, so a server that answers health checks but not requests
        costs one request per poll, not a stream of them.
        """
        if self.state(now) == "open":
            self.opened_at = now - self.reset

    def on_acquire(self, now: float) -> None:
        if self.state(now) == "half_open":
            self.probing = True

    def record(self, ok: bool, outcome: Outcome, now: float) -> None:
        if ok:
            self.consecutive = 0
            self.opened_at = None
            self.probing = False
            return
        if outcome not in CIRCUIT_FAILURES:
            self.probing = False
            return
        self.consecutive += 1
        if self.probing or self.consecutive >= self.failures:
            self.opened_at = now
        self.probing = False
