"""Fleet memory: what one run learned about each server, as the next run's prior (teamorch.policies.fleet; no Ray).

The file I/O and the two consecutive runs against the simulator are in tests/test_fleet_memory_live.py.
"""

from __future__ import annotations

import json

import pytest

from teamorch.config import RetryConfig, ServerConfig
from teamorch.messages import LeaseOutcome
from teamorch.policies.fleet import (
    EWMA_ALPHA,
    MEMORY_MAX_AGE,
    REMEMBERED_ALPHA,
    FleetMemory,
    ServerStats,
    memory_key,
    newest,
    parse_memory,
    recall,
    record_grant,
    record_outcome,
    remember,
)

NOW = 1_800_000_000.0  # epoch seconds


def stats(name: str = "s", url: str = "http://127.0.0.1:1") -> ServerStats:
    return ServerStats.new(ServerConfig(name=name, url=url, models=["m"]), RetryConfig())


def answer(s: ServerStats, tokens: int = 100, eval_seconds: float = 1.0, latency: float = 1.2) -> None:
    record_grant(s, 0.0)
    done = LeaseOutcome(
        lease_id="x", outcome="ok", model="m", tokens=tokens, eval_seconds=eval_seconds, latency=latency
    )
    record_outcome(s, done, False, 0.0, 5.0)


def test_what_a_run_learned_starts_the_next_run() -> None:
    learned = stats()
    answer(learned, eval_seconds=1.0, latency=1.2)
    memory = remember([learned], None, NOW)
    fresh = stats()
    assert recall(fresh, parse_memory(memory.model_dump_json()), NOW + 60)
    assert fresh.ewma_token_seconds == pytest.approx(0.01)
    assert fresh.ewma_ttft == pytest.approx(0.2)
    assert fresh.remembered
    # Health is not carried: no failures, circuit closed, no answers counted in this run.
    assert (fresh.completed, fresh.failed, fresh.breaker.state(0.0)) == (0, 0, "closed")


def test_fresh_measurements_win_quickly() -> None:
    s = stats()
    s.ewma_token_seconds, s.remembered = 0.01, True
    answer(s, tokens=100, eval_seconds=3.0)  # the box got 3x slower since
    assert s.ewma_token_seconds == pytest.approx((1 - REMEMBERED_ALPHA) * 0.01 + REMEMBERED_ALPHA * 0.03)
    assert not s.remembered
    answer(s, tokens=100, eval_seconds=3.0)  # from then on an ordinary EWMA step
    before = (1 - REMEMBERED_ALPHA) * 0.01 + REMEMBERED_ALPHA * 0.03
    assert s.ewma_token_seconds == pytest.approx((1 - EWMA_ALPHA) * before + EWMA_ALPHA * 0.03)


@pytest.mark.parametrize(
    ("other", "why"),
    [
        (stats(url="http://127.0.0.1:2"), "same name, another address: another box"),
        (stats(name="t"), "another name"),
    ],
)
def test_a_changed_server_is_not_trusted(other: ServerStats, why: str) -> None:
    learned = stats()
    answer(learned)
    assert not recall(other, remember([learned], None, NOW), NOW), why
    assert other.ewma_token_seconds is None


def test_old_figures_are_forgotten() -> None:
    learned = stats()
    answer(learned)
    memory = remember([learned], None, NOW)
    assert not recall(stats(), memory, NOW + MEMORY_MAX_AGE + 1)
    assert remember([stats()], memory, NOW + MEMORY_MAX_AGE + 1).servers == {}


def test_saving_keeps_other_servers_and_does_not_refresh_an_idle_one() -> None:
    a, b = stats("a"), stats("b")
    answer(a)
    answer(b)
    first = remember([a, b], None, NOW)
    a2 = stats("a")  # the next run: only a is in the team, and it answered
    answer(a2, eval_seconds=2.0)
    second = remember([a2, stats("c")], first, NOW + 100)
    assert set(second.servers) == {memory_key(a.config), memory_key(b.config)}  # c never answered: not saved
    assert second.servers[memory_key(b.config)] == first.servers[memory_key(b.config)]
    assert second.servers[memory_key(a.config)].measured_at == NOW + 100


def test_two_teams_sharing_one_file_keep_each_others_servers_and_the_latest_figures() -> None:
    a, b, shared_then, shared_now = stats("a"), stats("b"), stats("s"), stats("s")
    for s in (a, b, shared_then, shared_now):
        answer(s)
    answer(shared_now, eval_seconds=3.0)
    one = remember([a, shared_now], None, NOW + 10)  # team one read an empty file, measured `s` last
    two = remember([b, shared_then], None, NOW)  # team two read the same empty file, writes after team one
    merged = newest(two, one)
    assert set(merged.servers) == {memory_key(a.config), memory_key(b.config), memory_key(shared_now.config)}
    assert merged.servers[memory_key(shared_now.config)] == one.servers[memory_key(shared_now.config)]
    assert newest(one, two) == merged


def test_a_primed_server_is_not_overwritten_by_a_restarted_balancer() -> None:
    learned = stats()
    answer(learned)
    memory = remember([learned], None, NOW)
    s = stats()
    s.ewma_token_seconds = 0.5  # measured in this run already
    assert not recall(s, memory, NOW)
    assert s.ewma_token_seconds == 0.5


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not JSON"),
        ("[]", "version 'list'"),
        (json.dumps({"version": 99, "servers": {}}), "version 99"),
        (json.dumps({"servers": {}}), "version None"),
        (json.dumps({"version": 1, "servers": {"s": {"token_seconds": -1, "measured_at": 0}}}), "servers.s"),
    ],
)
def test_a_corrupt_or_foreign_file_is_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        parse_memory(text)


def test_the_file_round_trips() -> None:
    learned = stats()
    answer(learned)
    memory = remember([learned], None, NOW)
    assert parse_memory(memory.model_dump_json(indent=1)) == memory
    assert FleetMemory().servers == {}
