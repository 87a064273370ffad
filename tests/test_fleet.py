"""What the balancer learns from grants, outcomes and health checks (teamorch.policies.fleet; no Ray, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from teamorch.config import RetryConfig, ServerConfig
from teamorch.messages import LeaseOutcome, LeaseRequest, Outcome, ProbeResult, ServerLoad
from teamorch.policies.fleet import (
    ERROR_WINDOW,
    EWMA_ALPHA,
    GroupServers,
    Placement,
    ServerStats,
    free_slot,
    is_cold,
    learn_outcome,
    outcome_kind,
    record_grant,
    record_orphan_release,
    record_outcome,
    record_probe,
    record_restart,
    slot_penalty,
    to_load,
)

BACKOFF = 5.0


def stats(slots: int = 4, failures: int = 3, **kw: Any) -> ServerStats:
    config = ServerConfig(name="s", url="http://127.0.0.1:1", slots=slots, tags=["gpu"], models=["m"])
    out = ServerStats.new(config, RetryConfig(circuit_failures=failures, circuit_reset=30.0))
    for name, value in kw.items():
        setattr(out, name, value)
    return out


def done(outcome: Outcome = "ok", **kw: Any) -> LeaseOutcome:
    return LeaseOutcome(lease_id="s-1", outcome=outcome, model=kw.pop("model", "m"), **kw)


def end(s: ServerStats, outcome: LeaseOutcome, cold: bool = False, now: float = 100.0) -> None:
    """A granted lease coming back, as the balancer sees it."""
    record_grant(s, now)
    record_outcome(s, outcome, cold, now, BACKOFF)


# ---- the load row -------------------------------------------------------------------------


def test_a_new_server_knows_only_its_configured_models() -> None:
    s = stats()
    assert s.models_present == ["m"] and s.models_present is not s.config.models
    assert s.models_loaded is None


def test_to_load_copies_every_measured_field_and_derives_the_rest() -> None:
    s = stats(
        in_flight=2,
        healthy=False,
        models_present=["m", "x"],
        models_loaded=["m"],
        ewma_token_seconds=0.01,
        ewma_ttft=0.3,
        ewma_latency=2.5,
        completed=7,
        failed=1,
        last_check=1234.5,
        last_error="boom",
        slot_penalty=2,
        busy_until=110.0,
    )
    s.outcomes.extend([True, True, True, False])
    expected = ServerLoad(
        name="s",
        slots=4,
        effective_slots=2,
        in_flight=2,
        waiting=9,
        healthy=False,
        circuit="closed",
        models_present=["m", "x"],
        models_loaded=["m"],
        tags=["gpu"],
        ewma_token_seconds=0.01,
        ewma_ttft=0.3,
        ewma_latency=2.5,
        error_rate=0.25,
        completed=7,
        failed=1,
        last_check=1234.5,
        last_error="boom",
    )
    assert to_load(s, now=100.0, waiting=9) == expected
    row = to_load(s, now=100.0, waiting=9)
    assert row.models_loaded is not s.models_loaded, "a row is a copy: planning cannot change the table"


def test_reading_the_slot_penalty_does_not_change_it() -> None:
    s = stats(slots=4, slot_penalty=3, busy_until=110.0)
    assert to_load(s, now=109.9, waiting=0).effective_slots == 1
    assert to_load(s, now=110.0, waiting=0).effective_slots == 4  # the back-off has run out
    assert (s.slot_penalty, s.busy_until) == (3, 110.0)
    assert slot_penalty(s, 109.9) == 3 and slot_penalty(s, 110.0) == 0


def test_circuit_state_in_the_row_follows_the_clock() -> None:
    s = stats(failures=1)
    end(s, done("error"), now=100.0)
    assert to_load(s, now=100.0, waiting=0).circuit == "open"
    assert to_load(s, now=130.0, waiting=0).circuit == "half_open"


def test_error_rate_counts_only_the_recent_window() -> None:
    s = stats()
    for _ in range(ERROR_WINDOW):
        end(s, done("error"))
    for _ in range(ERROR_WINDOW // 2):
        end(s, done())
    assert to_load(s, now=100.0, waiting=0).error_rate == pytest.approx(0.5)


# ---- outcomes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        ("ok", "ok"),
        ("busy", "busy"),
        ("cancelled", "cancelled"),
        ("unreachable", "failure"),
        ("model_not_found", "failure"),
        ("error", "failure"),
        ("timeout", "failure"),
        ("malformed", "failure"),
    ],
)
def test_outcome_kind(outcome: Outcome, kind: str) -> None:
    assert outcome_kind(done(outcome)) == kind


def test_success_updates_the_ewmas_from_server_side_times() -> None:
    s = stats()
    # 100 tokens in 2 s of server eval, 2.5 s in all: 0.02 s/token, 0.5 s fixed cost
    end(s, done(tokens=100, eval_seconds=2.0, latency=2.5, ttft=0.9))
    assert (s.ewma_token_seconds, s.ewma_ttft, s.ewma_latency) == pytest.approx((0.02, 0.5, 2.5))
    end(s, done(tokens=100, eval_seconds=1.0, latency=1.1))
    assert s.ewma_token_seconds == pytest.approx((1 - EWMA_ALPHA) * 0.02 + EWMA_ALPHA * 0.01)
    assert s.ewma_ttft == pytest.approx((1 - EWMA_ALPHA) * 0.5 + EWMA_ALPHA * 0.1)
    assert s.ewma_latency == pytest.approx((1 - EWMA_ALPHA) * 2.5 + EWMA_ALPHA * 1.1)
    assert (s.completed, s.failed, s.in_flight) == (2, 0, 0)


def test_without_server_eval_time_the_client_side_times_are_used() -> None:
    s = stats()
    end(s, done(tokens=10, latency=1.5, ttft=0.5))
    assert (s.ewma_token_seconds, s.ewma_ttft) == pytest.approx((0.1, 0.5))


def test_a_request_that_paid_a_model_load_does_not_move_the_fixed_cost() -> None:
    s = stats(ewma_ttft=0.2, models_loaded=[])
    end(s, done(tokens=100, eval_seconds=2.0, latency=7.0), cold=True)
    assert s.ewma_ttft == 0.2
    assert s.ewma_token_seconds == pytest.approx(0.02), "its generation speed is still a fair sample"
    assert s.models_loaded == ["m"], "the model it ran is resident now"


def test_a_request_that_waited_at_the_gate_takes_its_fixed_cost_from_its_time_to_first_token() -> None:
    # Its latency less the gate wait as the balancer estimated it (the lease's trip to the caller included)
    # would say 0.05 s here; the time to first token, measured past the gate, says 0.3 s.
    s = stats()
    record_grant(s, 100.0)
    free_slot(s, done(), Placement())
    learn_outcome(
        s, done(tokens=100, eval_seconds=2.0, latency=2.05, ttft=0.3), False, 100.0, BACKOFF, Placement(), gated=True
    )
    assert (s.ewma_token_seconds, s.ewma_ttft) == pytest.approx((0.02, 0.3))
    assert s.in_flight == 0


def test_a_success_without_tokens_leaves_the_speed_unmeasured() -> None:
    s = stats()
    end(s, done(tokens=0, latency=0.3, ttft=0.1))
    assert s.ewma_token_seconds is None
    assert (s.ewma_ttft, s.ewma_latency) == pytest.approx((0.1, 0.3))


def test_busy_backs_off_slots_without_blaming_the_server() -> None:
    s = stats(slots=3, failures=1)
    end(s, done("busy"), now=100.0)
    assert (s.slot_penalty, s.busy_until) == (1, 100.0 + BACKOFF)
    end(s, done("busy"), now=101.0)
    end(s, done("busy"), now=102.0)
    assert s.slot_penalty == 2, "never below one usable slot"
    assert (s.failed, list(s.outcomes), s.breaker.state(102.0), s.healthy) == (0, [], "closed", True)
    # once the back-off has run out a new 503 starts the penalty again from one slot
    end(s, done("busy"), now=200.0)
    assert (s.slot_penalty, s.busy_until) == (1, 200.0 + BACKOFF)


def test_cancelled_only_frees_the_slot() -> None:
    s = stats(failures=1)
    record_grant(s, 100.0)
    before = (s.completed, s.failed, list(s.outcomes), s.breaker.consecutive, s.last_error)
    record_outcome(s, done("cancelled", error="cancelled by caller"), False, 100.0, BACKOFF)
    assert s.in_flight == 0
    assert (s.completed, s.failed, list(s.outcomes), s.breaker.consecutive, s.last_error) == before


@pytest.mark.parametrize(
    ("outcome", "opens", "healthy"),
    [("unreachable", True, False), ("error", True, True), ("model_not_found", False, True)],
)
def test_failures_are_counted_and_only_breakage_opens_the_circuit(outcome: Outcome, opens: bool, healthy: bool) -> None:
    s = stats(failures=2)
    for _ in range(2):
        end(s, done(outcome, error=f"{outcome}!"))
    assert (s.failed, list(s.outcomes), s.last_error, s.healthy) == (2, [False, False], f"{outcome}!", healthy)
    assert (s.breaker.state(100.0) == "open") is opens


def test_a_grant_on_a_half_open_circuit_is_its_probe() -> None:
    s = stats(failures=1)
    end(s, done("error"), now=100.0)
    record_grant(s, 130.0)  # half-open by now: this request is the probe
    record_outcome(s, done("timeout"), False, 130.0, BACKOFF)
    assert s.breaker.state(130.0) == "open", "a failed probe re-opens at once"


def test_is_cold_only_when_the_model_is_known_not_loaded() -> None:
    assert is_cold(stats(models_loaded=["x"]), "m")
    assert not is_cold(stats(models_loaded=["m"]), "m")
    assert not is_cold(stats(models_loaded=None), "m")


# ---- health checks ------------------------------------------------------------------------


def test_a_healthy_probe_updates_models_it_can_see() -> None:
    s = stats(healthy=False, models_loaded=["old"])
    record_probe(s, ProbeResult(healthy=True, checked_at=5.0, models_present=["m", "x"], models_loaded=None))
    assert (s.healthy, s.last_check, s.models_present, s.models_loaded) == (True, 5.0, ["m", "x"], ["old"])


def test_a_failed_probe_marks_the_server_down_and_keeps_its_models() -> None:
    s = stats(models_loaded=["m"])
    record_probe(s, ProbeResult(healthy=False, checked_at=6.0, error="connection refused", models_loaded=[]))
    assert (s.healthy, s.last_check, s.last_error, s.models_loaded) == (False, 6.0, "connection refused", ["m"])


def test_a_healthy_probe_puts_a_server_with_an_open_circuit_back_in_rotation() -> None:
    s = stats(failures=1)
    end(s, done("unreachable", error="refused"), now=100.0)
    assert (s.healthy, s.breaker.state(101.0)) == (False, "open")
    record_probe(s, ProbeResult(healthy=True, checked_at=1.0), now=101.0)
    row = to_load(s, 101.0, 0)
    assert (row.healthy, row.circuit) == (True, "half_open")  # one request may go there now, not after the reset


def test_a_probe_without_a_clock_leaves_the_circuit_to_its_reset() -> None:
    s = stats(failures=1)
    end(s, done("error"), now=100.0)
    record_probe(s, ProbeResult(healthy=True, checked_at=1.0))
    assert s.breaker.state(101.0) == "open"


# ---- a restarted balancer -----------------------------------------------------------------


def test_after_a_restart_every_slot_counts_as_busy_until_its_lease_comes_back() -> None:
    s = stats(slots=2)
    record_restart(s, 10.0)
    assert to_load(s, 10.0, 0).in_flight == 2  # nothing may be granted: the old leases may all be running
    record_orphan_release(s, 11.0)
    assert to_load(s, 11.0, 0).in_flight == 1
    record_grant(s, 11.0)
    assert to_load(s, 11.0, 0).in_flight == 2  # the freed slot was granted; the other old lease still counts
    record_orphan_release(s, 12.0)
    record_orphan_release(s, 12.0)  # a release beyond what was unaccounted frees nothing of the new leases
    assert to_load(s, 12.0, 0).in_flight == 1


def test_unaccounted_slots_are_freed_after_read_timeout_if_their_leases_never_come_back() -> None:
    s = stats(slots=3)
    record_restart(s, 10.0)
    timeout = s.config.read_timeout
    assert to_load(s, 10.0 + timeout - 0.1, 0).in_flight == 3
    assert to_load(s, 10.0 + timeout, 0).in_flight == 0


# ---- diversity groups ---------------------------------------------------------------------


def test_group_servers_adds_a_groups_servers_to_avoid() -> None:
    groups = GroupServers()
    plain, grouped = LeaseRequest(model="m", avoid=["z"]), LeaseRequest(model="m", group="g", avoid=["z"])
    assert groups.with_avoid(grouped) is grouped
    groups.add("g", "b")
    groups.add("g", "a")
    assert groups.with_avoid(grouped).avoid == ["z", "a", "b"]
    assert groups.with_avoid(plain) is plain


def test_group_servers_forgets_the_least_recently_used_group() -> None:
    groups = GroupServers(limit=2)
    for group in ("g1", "g2"):
        groups.add(group, "a")
    groups.add("g1", "b")  # g1 is now the newest
    groups.add("g3", "a")
    assert groups.with_avoid(LeaseRequest(model="m", group="g2")).avoid == []
    assert groups.with_avoid(LeaseRequest(model="m", group="g1")).avoid == ["a", "b"]
