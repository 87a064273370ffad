"""Early grants (no idle slot between two requests): the rules in teamorch.policies, on plain data (no Ray).

The balancer may grant a slot whose request is about to end; the request then waits at the server actor's gate.
These tests pin down when that is allowed, and that a server can never hold more than `slots` + 1 leases.
The live behaviour (the box never sees more than `slots`) is in tests/test_slot_gap_live.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from teamorch.config import RetryConfig, ServerConfig
from teamorch.messages import LeaseRequest, ServerLoad
from teamorch.policies.balancing import (
    EARLY_GRANT_OVERDUE,
    EARLY_GRANT_SECONDS,
    due_in,
    due_soon,
    early_slot,
)
from teamorch.policies.fleet import ServerStats, record_grant
from teamorch.policies.prefix import signature


def measured(slots: int = 2, **kw: Any) -> ServerLoad:
    kw.setdefault("effective_slots", slots)
    kw.setdefault("ewma_token_seconds", 0.01)
    return ServerLoad(name="s", slots=slots, **kw)


@pytest.mark.parametrize(
    ("remaining", "expected", "due"),
    [
        (1.0, 2.0, False),  # a second to go: nothing queues behind it yet
        (EARLY_GRANT_SECONDS * 2, 2.0, False),
        (EARLY_GRANT_SECONDS, 2.0, True),  # within the horizon
        (0.0, 2.0, True),
        (-0.5, 2.0, True),  # overdue by a quarter of its estimate: estimates err, it is still due
        (-(EARLY_GRANT_OVERDUE * 2.0) - 0.01, 2.0, False),  # overdue by more: it may be stalled
        (-EARLY_GRANT_SECONDS, 0.01, True),  # a short request is always given the horizon
        (-EARLY_GRANT_SECONDS - 0.01, 0.01, False),
    ],
)
def test_due_soon(remaining: float, expected: float, due: bool) -> None:
    assert due_soon(remaining, expected) is due


def test_due_in_is_when_due_soon_turns_true() -> None:
    assert due_in(1.0) == pytest.approx(1.0 - EARLY_GRANT_SECONDS)
    assert not due_soon(1.0, 5.0) and due_soon(1.0 - due_in(1.0) - 1e-9, 5.0)


def test_an_early_slot_opens_on_a_full_measured_server_with_a_due_request() -> None:
    assert early_slot(measured(in_flight=2), due=True, queued_behind=0)
    assert early_slot(measured(in_flight=1), due=True, queued_behind=0)  # a free slot too: one early beside it


@pytest.mark.parametrize(
    ("row", "due", "behind", "why"),
    [
        (measured(in_flight=2), False, 0, "nothing is about to end"),
        (measured(in_flight=3), True, 1, "one request already waits at the gate"),
        (measured(in_flight=3), True, 0, "more leases than slots already (e.g. left over from a restart)"),
        (measured(in_flight=2, effective_slots=1), True, 0, "503 back-off: fewer usable slots than leases"),
        (measured(in_flight=2, ewma_token_seconds=None), True, 0, "never measured: its estimates mean nothing"),
        (measured(in_flight=1, circuit="half_open"), True, 0, "a half-open circuit admits one probe only"),
        (measured(in_flight=2, healthy=False), True, 0, "unhealthy"),
    ],
)
def test_no_early_slot(row: ServerLoad, due: bool, behind: int, why: str) -> None:
    assert not early_slot(row, due, behind), why


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_a_server_never_holds_more_than_slots_plus_one_leases(slots: int) -> None:
    """Grant while the policy allows, every running request always due: the lease count stops at slots + 1."""
    in_flight, behind = 0, 0
    for _ in range(5 * slots):
        row = measured(slots=slots, in_flight=in_flight)
        if in_flight < slots:
            in_flight += 1  # a free slot: an ordinary grant
        elif early_slot(row, due=True, queued_behind=behind):
            in_flight, behind = in_flight + 1, behind + 1
    assert in_flight == slots + 1 and behind == 1


def test_an_early_grant_takes_the_busy_slot_and_finds_what_its_request_leaves_cached() -> None:
    config = ServerConfig(name="s", url="http://127.0.0.1:1", slots=1, models=["m"])
    stats = ServerStats.new(config, RetryConfig())
    role = "You review code. " * 20

    def lease(task: str) -> LeaseRequest:
        sig = signature([role, task])
        return LeaseRequest(model="m", prefix=list(sig.chain), prefix_tokens=list(sig.tokens), prompt_tokens=sig.total)

    first = record_grant(stats, 0.0, lease("first task"))
    second = record_grant(stats, 0.01, lease("second task"), after=first.slot)
    assert second.slot == first.slot == 0
    assert second.cached == len(role.split())  # the role prompt the first request leaves in the slot
    assert stats.in_flight == 2 and stats.prefix.slots[0].busy
