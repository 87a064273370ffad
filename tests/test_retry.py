"""Backoff, the retry decision, failover exclusion and the circuit breaker, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import random
from typing import get_args

import pytest

from teamorch.config import RetryConfig
from teamorch.messages import ErrorClass
from teamorch.policies.retry import CIRCUIT_FAILURES, CircuitBreaker, Step, backoff, excludes_server, next_step

NOT_BUSY: list[ErrorClass] = [c for c in get_args(ErrorClass) if c != "busy"]
DELAYS = RetryConfig(base_delay=0.5, max_delay=30.0)


class EdgeRng:
    """Answers `uniform(a, b)` with one end of the range and records the range it was asked for."""

    def __init__(self, top: bool) -> None:
        self.top = top
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b if self.top else a


# ---- backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (20, 30.0)],
)
def test_backoff_ceiling_doubles_then_caps(attempt: int, ceiling: float) -> None:
    rng = EdgeRng(top=True)
    assert backoff(attempt, base=0.5, cap=30.0, rng=rng) == pytest.approx(ceiling)  # type: ignore[arg-type]
    assert rng.ranges == [(0.0, pytest.approx(ceiling))]


def test_backoff_is_full_jitter_from_zero() -> None:
    assert backoff(4, base=0.5, cap=30.0, rng=EdgeRng(top=False)) == 0.0  # type: ignore[arg-type]


def test_backoff_samples_stay_in_bounds_and_spread_out() -> None:
    rng = random.Random(1)
    for attempt, bound in [(0, 0.25), (2, 1.0), (10, 3.0)]:
        samples = [backoff(attempt, base=0.25, cap=3.0, rng=rng) for _ in range(300)]
        assert all(0.0 <= x <= bound for x in samples)
        # jitter: uses the whole range, not a fixed delay
        assert min(samples) < 0.1 * bound
        assert max(samples) > 0.9 * bound


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff(i, 0.5, 30.0, random.Random(42)) for i in range(6)]
    b = [backoff(i, 0.5, 30.0, random.Random(42)) for i in range(6)]
    assert a == b


def test_backoff_without_rng_stays_in_bounds() -> None:
    assert all(0.0 <= backoff(3, 0.5, 2.0) <= 2.0 for _ in range(50))


@pytest.mark.parametrize("attempt", [1023, 1024, 1100, 5000])
def test_backoff_huge_attempt_is_capped_not_overflowing(attempt: int) -> None:
    # A specialist's busy (503) loop counts rounds without limit until the task deadline.
    rng = EdgeRng(top=True)
    assert backoff(attempt, base=0.5, cap=30.0, rng=rng) == 30.0  # type: ignore[arg-type]


def test_backoff_zero_base_means_no_delay() -> None:
    assert backoff(5000, base=0.0, cap=30.0, rng=EdgeRng(top=True)) == 0.0  # type: ignore[arg-type]


# ---- excludes_server ---------------------------------------------------------------------


def test_busy_server_is_retried_later_not_excluded() -> None:
    assert excludes_server("busy") is False


@pytest.mark.parametrize("error_class", NOT_BUSY)
def test_other_failures_exclude_the_server_for_this_task(error_class: ErrorClass) -> None:
    assert excludes_server(error_class) is True


# ---- next_step ---------------------------------------------------------------------------


def step(failures: list[ErrorClass], remaining: float = 100.0, max_retries: int = 2, top: bool = True) -> Step:
    """The decision with the backoff at the top (or bottom) of its jitter range, so delays are exact."""
    return next_step(failures, remaining, max_retries, DELAYS, EdgeRng(top=top))  # type: ignore[arg-type]


@pytest.mark.parametrize("error_class", NOT_BUSY)
def test_a_failure_fails_over_after_the_first_backoff(error_class: ErrorClass) -> None:
    result = step([error_class])
    assert (result.action, result.delay) == ("retry_elsewhere", 0.5)


def test_a_busy_server_stays_a_candidate_after_a_backoff() -> None:
    result = step(["busy"])
    assert (result.action, result.delay) == ("retry_here", 1.0)  # busy backoffs start one step up


def test_failure_backoff_doubles_per_failure_and_ignores_busy_answers() -> None:
    assert step(["error", "timeout"], max_retries=5).delay == 1.0
    assert step(["busy", "busy", "busy", "error", "timeout", "malformed"], max_retries=5).delay == 2.0


def test_busy_backoff_doubles_per_busy_answer_and_ignores_failures() -> None:
    assert step(["busy", "busy"]).delay == 2.0
    assert step(["error", "unreachable", "busy", "busy", "busy"]).delay == 4.0


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_gives_up_once_failures_exceed_max_retries(max_retries: int) -> None:
    history: list[ErrorClass] = ["error"] * max_retries
    if max_retries:
        assert step(history, max_retries=max_retries).action == "retry_elsewhere"
    result = step([*history, "unreachable"], max_retries=max_retries)
    assert result.action == "give_up"
    assert result.reason == f"no retries left (max_retries={max_retries})"


def test_busy_answers_never_use_up_the_retries() -> None:
    # Back-pressure is not a failure of the task: a 503 is retried until the deadline.
    assert step(["busy"] * 50, max_retries=0).action == "retry_here"
    assert step(["error", *["busy"] * 50], max_retries=1).action == "retry_here"


@pytest.mark.parametrize(("last", "action"), [("busy", "retry_here"), ("error", "retry_elsewhere")])
def test_gives_up_when_the_backoff_would_end_at_or_after_the_deadline(last: ErrorClass, action: str) -> None:
    ceiling = step([last]).delay
    assert step([last], remaining=ceiling + 0.01).action == action
    result = step([last], remaining=ceiling)
    assert result.action == "give_up"
    assert "before the task deadline" in result.reason


@pytest.mark.parametrize(("remaining", "action"), [(0.001, "retry_elsewhere"), (0.0, "give_up"), (-0.5, "give_up")])
def test_at_the_deadline_even_a_zero_backoff_gives_up(remaining: float, action: str) -> None:
    result = step(["timeout"], remaining=remaining, top=False)
    assert (result.action, result.delay) == (action, 0.0)


def test_the_deadline_reason_never_shows_negative_time() -> None:
    assert step(["timeout"], remaining=-0.5, top=False).reason.startswith("0.0s left")


def test_exhausted_retries_are_reported_before_the_deadline() -> None:
    assert "max_retries=0" in step(["error"], remaining=0.0, max_retries=0).reason


# ---- circuit breaker ---------------------------------------------------------------------


def broken(n: int = 3, reset: float = 30.0, at: float = 0.0) -> CircuitBreaker:
    cb = CircuitBreaker(failures=n, reset=reset)
    for _ in range(n):
        cb.record(False, "unreachable", at)
    return cb


def test_circuit_starts_closed() -> None:
    assert CircuitBreaker().state(0.0) == "closed"


def test_circuit_opens_after_n_consecutive_breakages_not_before() -> None:
    cb = CircuitBreaker(failures=3, reset=30.0)
    cb.record(False, "error", 1.0)
    cb.record(False, "timeout", 2.0)
    assert cb.state(2.0) == "closed"
    cb.record(False, "unreachable", 3.0)
    assert cb.state(3.0) == "open"
    assert cb.state(32.9) == "open"


@pytest.mark.parametrize("outcome", sorted(CIRCUIT_FAILURES))
def test_each_breakage_outcome_counts(outcome: ErrorClass) -> None:
    cb = CircuitBreaker(failures=2, reset=10.0)
    cb.record(False, outcome, 0.0)
    cb.record(False, outcome, 0.0)
    assert cb.state(0.0) == "open"


def test_success_resets_the_consecutive_count() -> None:
    cb = CircuitBreaker(failures=3, reset=30.0)
    for ok in (False, False, True, False, False):
        cb.record(ok, "error", 0.0)
    assert cb.state(0.0) == "closed"
    cb.record(False, "error", 0.0)
    assert cb.state(0.0) == "open"


@pytest.mark.parametrize("outcome", ["model_not_found", "busy"])
def test_404_and_503_never_open_the_circuit(outcome: ErrorClass) -> None:
    cb = CircuitBreaker(failures=2, reset=30.0)
    for t in range(20):
        cb.record(False, outcome, float(t))
    assert cb.state(20.0) == "closed"


def test_open_becomes_half_open_after_reset() -> None:
    cb = broken(reset=30.0, at=100.0)
    assert cb.state(129.99) == "open"
    assert cb.state(130.0) == "half_open"
    assert cb.state(500.0) == "half_open"


def test_half_open_probe_success_closes_and_needs_n_new_breakages_to_reopen() -> None:
    cb = broken(n=3, reset=30.0, at=0.0)
    cb.on_acquire(31.0)
    cb.record(True, "ok", 32.0)
    assert cb.state(32.0) == "closed"
    cb.record(False, "error", 33.0)
    cb.record(False, "error", 34.0)
    assert cb.state(34.0) == "closed"
    cb.record(False, "error", 35.0)
    assert cb.state(35.0) == "open"


def test_half_open_probe_failure_reopens_for_another_full_reset() -> None:
    cb = broken(n=3, reset=30.0, at=0.0)
    assert cb.state(31.0) == "half_open"
    cb.on_acquire(31.0)
    cb.record(False, "timeout", 40.0)
    assert cb.state(40.0) == "open"
    assert cb.state(69.9) == "open"  # measured from the probe's failure, not the first opening
    assert cb.state(70.0) == "half_open"


def test_half_open_probe_failure_reopens_even_with_a_high_threshold() -> None:
    # One failed probe is enough; it does not take another `failures` breakages.
    cb = CircuitBreaker(failures=5, reset=10.0)
    for _ in range(5):
        cb.record(False, "error", 0.0)
    cb.on_acquire(10.0)
    cb.record(False, "error", 11.0)
    assert cb.state(11.0) == "open"


def test_half_open_probe_answered_503_keeps_it_half_open() -> None:
    cb = broken(n=3, reset=30.0, at=0.0)
    cb.on_acquire(31.0)
    cb.record(False, "busy", 32.0)
    assert cb.state(32.0) == "half_open"
    assert cb.probing is False


def test_on_acquire_marks_a_probe_only_when_half_open() -> None:
    cb = CircuitBreaker(failures=1, reset=10.0)
    cb.on_acquire(0.0)
    assert cb.probing is False
    cb.record(False, "error", 0.0)
    cb.on_acquire(5.0)
    assert cb.probing is False
    cb.on_acquire(10.0)
    assert cb.probing is True


def test_a_health_check_answer_turns_an_open_circuit_half_open_at_once() -> None:
    cb = broken(n=1, reset=30.0, at=100.0)
    cb.answered(105.0)
    assert cb.state(105.0) == "half_open"  # the box is back: one request may test it now, not at 130
    cb.on_acquire(105.0)
    cb.record(False, "error", 106.0)
    assert cb.state(106.0) == "open" and cb.state(135.9) == "open"  # chat still broken: a full reset again


def test_a_health_check_answer_leaves_a_closed_circuit_alone() -> None:
    cb = CircuitBreaker(failures=2, reset=30.0)
    cb.record(False, "error", 0.0)
    cb.answered(1.0)
    cb.record(False, "error", 2.0)
    assert cb.state(2.0) == "open"  # the earlier breakage still counts


def test_a_restarting_server_actor_is_busy_then_lost() -> None:
    from teamorch.policies.retry import RESTART_GRACE_SECONDS, restarting_verdict

    assert restarting_verdict(100.0, 100.0 + RESTART_GRACE_SECONDS / 2) == "busy"
    assert restarting_verdict(100.0, 100.0 + RESTART_GRACE_SECONDS) == "unreachable"
