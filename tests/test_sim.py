"""The simulator is the ground truth for balancer tests, so its own semantics are pinned here."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from teamorch.errors import ConfigError
from teamorch.sim import SimConfig, SimServer, load_fleet
from teamorch.sim_model import Residency, SlotCaches, tokenize

MODEL = "gemma3:270m"


@contextmanager
def sim(**knobs: Any) -> Iterator[SimServer]:
    with SimServer(SimConfig(**knobs)) as server:
        yield server


def chat(
    url: str,
    n: int | None = None,
    stream: bool = False,
    model: str = MODEL,
    timeout: float = 10.0,
    messages: list[dict[str, str]] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": messages or [{"role": "user", "content": "hello there world"}],
    }
    if n is not None:
        body["options"] = {"num_predict": n}
    return httpx.post(f"{url}/api/chat", json=body, timeout=timeout)


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/sim/stats").json()


def test_slots_cap_concurrency_and_queue_fifo() -> None:
    with sim(slots=2, ttft=0.0, tokens_per_second=20.0, default_tokens=4) as s, ThreadPoolExecutor(3) as pool:
        started = time.monotonic()
        responses = list(pool.map(lambda _i: chat(s.url), range(3)))
        elapsed = time.monotonic() - started
        assert [r.status_code for r in responses] == [200, 200, 200]
        st = stats(s.url)
        assert st["max_in_flight"] == 2
        assert st["max_in_flight_per_model"] == {MODEL: 2}
        assert (st["requests"], st["completed"], st["tokens"], st["in_flight"]) == (3, 3, 12, 0)
        assert elapsed >= 0.38  # the third request waited for a slot: two 0.2 s rounds
        assert st["busy_seconds"] >= 0.38


def test_full_queue_answers_503() -> None:
    with sim(slots=1, max_queue=0, ttft=0.0, tokens_per_second=10.0, default_tokens=5) as s:
        first = threading.Thread(target=chat, args=(s.url,))
        first.start()
        wait_for(lambda: stats(s.url)["in_flight"] == 1)
        busy = chat(s.url)
        first.join()
        assert busy.status_code == 503
        assert "maximum pending requests exceeded" in busy.json()["error"]
        assert stats(s.url)["rejected_503"] == 1


def test_unknown_model_is_404_in_both_dialects() -> None:
    with sim() as s:
        r = chat(s.url, model="nope:1b")
        assert r.status_code == 404
        assert r.json() == {"error": 'model "nope:1b" not found, try pulling it first'}
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "nope:1b", "messages": []})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        assert stats(s.url)["not_found"] == 2


def test_stream_final_line_counts_tokens_and_reports_nanoseconds() -> None:
    with sim(name="box", ttft=0.05, tokens_per_second=100.0) as s:
        r = chat(s.url, n=50, stream=True)
        lines = [json.loads(line) for line in r.text.splitlines()]
        final, content = lines[-1], lines[:-1]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert 1 <= len(content) <= 20 and not any(line["done"] for line in content)
        assert "".join(line["message"]["content"] for line in content).startswith("[box] ")
        assert final["done"] is True and final["done_reason"] == "stop"
        assert final["eval_count"] == 50 and final["prompt_eval_count"] == 3
        assert 0.4e9 <= final["eval_duration"] <= 2e9  # 50 tokens at 100 tok/s = 0.5 s, in ns
        assert 0.04e9 <= final["prompt_eval_duration"] <= 1e9
        assert final["total_duration"] >= final["eval_duration"] + final["prompt_eval_duration"]


def test_error_line_rate_ends_stream_with_error() -> None:
    with sim(error_line_rate=1.0, ttft=0.0, tokens_per_second=1000.0) as s:
        r = chat(s.url, n=10, stream=True)
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert r.status_code == 200
        assert lines[-1] == {"error": "simulated error mid-stream"}
        assert len(lines) > 1 and not any(line.get("done") for line in lines)
        assert stats(s.url)["failed"] == 1


def test_die_after_drops_in_flight_then_refuses() -> None:
    with sim(die_after=1, ttft=0.5) as s:
        with pytest.raises(httpx.TransportError):
            chat(s.url)  # accepted, then the box "crashes" under it
        with pytest.raises(httpx.ConnectError):
            chat(s.url)
        assert s.stats()["requests"] == 1
    s.stop()  # still safe after dying and after the context manager stopped it


def test_client_disconnect_is_counted_and_frees_slot() -> None:
    with sim(ttft=0.0, tokens_per_second=5.0) as s:
        with pytest.raises(httpx.ReadTimeout):
            chat(s.url, n=20, timeout=0.3)
        wait_for(lambda: stats(s.url)["cancelled"] == 1)
        st = stats(s.url)
        assert (st["in_flight"], st["queued"], st["completed"]) == (0, 0, 0)


def test_openai_endpoint_honours_max_tokens() -> None:
    with sim(ttft=0.0, tokens_per_second=1000.0) as s:
        body = {"model": MODEL, "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=5)
        data = r.json()
        assert data["object"] == "chat.completion"
        assert data["usage"] == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}
        assert data["choices"][0]["message"]["content"].startswith("[sim] ")


def test_load_time_then_loaded() -> None:
    with sim(models=["a:1b", "b:1b"], loaded=["a:1b"], load_time=0.3, ttft=0.0) as s:
        assert [m["name"] for m in httpx.get(f"{s.url}/api/ps").json()["models"]] == ["a:1b"]
        final = chat(s.url, n=1, model="b:1b").json()
        assert final["load_duration"] >= 0.29e9
        assert chat(s.url, n=1, model="b:1b").json()["load_duration"] == 0
        assert len(httpx.get(f"{s.url}/api/ps").json()["models"]) == 2


def test_live_config_and_canned_replies() -> None:
    replies = [{"match": r"hello \w+", "reply": "scripted"}]
    with sim(ttft=0.0, tokens_per_second=1000.0, replies=replies) as s:
        assert chat(s.url, n=3).json()["message"]["content"] == "scripted"
        r = httpx.post(f"{s.url}/sim/config", json={"error_rate": 1.0})
        assert r.json()["error_rate"] == 1.0
        assert chat(s.url).status_code == 500
        assert httpx.post(f"{s.url}/sim/config", json={"slots": 0}).status_code == 400
        httpx.post(f"{s.url}/sim/reset")
        assert stats(s.url)["requests"] == 0


def test_load_fleet_names_file_and_field(tmp_path: Path) -> None:
    good = tmp_path / "fleet.yaml"
    good.write_text("servers:\n  - name: a\n    slots: 2\n  - name: b\n")
    assert [c.slots for c in load_fleet(str(good))] == [2, 1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  - name: a\n  - name: b\n    slots: zero\n")
    with pytest.raises(ConfigError) as info:
        load_fleet(str(bad))
    assert "bad.yaml" in str(info.value) and "servers[1].slots" in str(info.value)


# ------------------------------------------------------------------ prefix caches and residency
ROLE = "You are a careful reviewer of Python code. " * 8  # 64 words shared by every task of one specialist
FAST = {"ttft": 0.0, "tokens_per_second": 1000.0, "prefill_tps": 1000.0}  # 1 ms per uncached prompt word


def task(text: str, role: str = ROLE) -> list[dict[str, str]]:
    return [{"role": "system", "content": role}, {"role": "user", "content": text}]


def final(url: str, messages: list[dict[str, str]], model: str = MODEL) -> dict[str, Any]:
    r = chat(url, n=4, model=model, messages=messages)
    assert r.status_code == 200, r.text
    return r.json()


def test_shared_prefix_is_prefilled_once_and_the_slot_keeps_the_whole_context() -> None:
    with sim(slots=1, **FAST) as s:
        first = final(s.url, task("review parser.py"))
        second = final(s.url, task("review lexer.py"))
        prompt = len(tokenize(ROLE)) + 2
        assert (first["prompt_eval_count"], first["prompt_eval_cached_count"]) == (prompt, 0)
        assert (second["prompt_eval_count"], second["prompt_eval_cached_count"]) == (prompt, prompt - 1)
        assert first["prompt_eval_duration"] == pytest.approx(prompt * 1e6, abs=10)  # computed, not measured
        assert second["prompt_eval_duration"] == pytest.approx(1e6, abs=10)
        # The next turn carries the answer back: prompt and output were both kept in the slot.
        reply = second["message"]["content"]
        turn = [*task("review lexer.py"), {"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
        third = final(s.url, turn)
        assert third["prompt_eval_cached_count"] == prompt + len(tokenize(reply))
        # The same prompt again still evaluates one token: the model needs its logits to sample from.
        assert final(s.url, turn)["prompt_eval_cached_count"] == third["prompt_eval_count"] - 1


def test_a_request_takes_the_free_slot_with_the_longest_prefix() -> None:
    other = "You write release notes for a database engine. " * 8
    with sim(slots=2, ttft=0.0, tokens_per_second=40.0, prefill_tps=1000.0) as s:
        hold = threading.Thread(target=chat, args=(s.url, 30), kwargs={"messages": task("notes for 1.0", other)})
        hold.start()  # occupies slot 0 for 0.75 s, so the reviewer's first task lands in slot 1
        wait_for(lambda: stats(s.url)["in_flight"] == 1)
        final(s.url, task("review parser.py"))
        hold.join()
        # Both slots are free now; each task finds its own role's cache, whichever slot holds it.
        assert final(s.url, task("review lexer.py"))["prompt_eval_cached_count"] == len(tokenize(ROLE)) + 1
        assert final(s.url, task("notes for 2.0", other))["prompt_eval_cached_count"] == len(tokenize(other)) + 2
        # The request log says the same per slot, from the server side: a run's per-slot timeline is read there.
        log = stats(s.url)["requests_log"]
        assert [(e["slot"], e["cached"] > 0) for e in log] == [(0, False), (1, False), (1, True), (0, True)]
        assert all(e["at"] <= e["started"] <= e["ended"] for e in log)


def test_openai_usage_reports_cached_tokens_only_when_there_are_some() -> None:
    with sim(**FAST) as s:
        body = {"model": MODEL, "max_tokens": 3, "messages": task("review parser.py")}
        usages = [httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=5).json()["usage"] for _ in range(2)]
        assert "prompt_tokens_details" not in usages[0]
        assert usages[1]["prompt_tokens_details"] == {"cached_tokens": usages[1]["prompt_tokens"] - 1}


def loaded(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]]


def test_max_loaded_pays_a_load_per_switch_and_evicts_the_least_recently_used() -> None:
    with sim(models=["a:1b", "b:1b", "c:1b"], max_loaded=2, load_time=0.05, **FAST) as s:
        assert loaded(s.url) == ["a:1b", "b:1b"]  # the first max_loaded models start resident
        assert final(s.url, task("x"), model="a:1b")["load_duration"] == 0
        assert final(s.url, task("x"), model="c:1b")["load_duration"] > 0  # evicts b, the least recently used
        assert loaded(s.url) == ["a:1b", "c:1b"]
        assert final(s.url, task("x"), model="a:1b")["load_duration"] == 0  # residency is not occupancy
        assert final(s.url, task("x"), model="b:1b")["load_duration"] > 0  # evicts c now
        assert loaded(s.url) == ["a:1b", "b:1b"]
        st = stats(s.url)
        assert (st["model_loads"], st["evictions"], st["loaded"]) == (2, 2, ["a:1b", "b:1b"])


def test_eviction_drops_the_models_prefix_caches() -> None:
    with sim(models=["a:1b", "b:1b"], max_loaded=1, load_time=0.01, **FAST) as s:
        final(s.url, task("one"), model="a:1b")
        assert final(s.url, task("two"), model="a:1b")["prompt_eval_cached_count"] > 0
        final(s.url, task("two"), model="b:1b")
        back = final(s.url, task("three"), model="a:1b")
        assert back["load_duration"] > 0 and back["prompt_eval_cached_count"] == 0
        assert loaded(s.url) == ["a:1b"]


def test_a_load_waits_for_the_evicted_models_running_requests() -> None:
    with sim(models=["a:1b", "b:1b"], max_loaded=1, slots=2, ttft=0.0, tokens_per_second=20.0) as s:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(chat, s.url, 6, False, "a:1b")  # 0.3 s on a
            wait_for(lambda: stats(s.url)["in_flight"] == 1)
            switched = chat(s.url, n=1, model="b:1b")
            assert running.result().status_code == 200 and switched.status_code == 200
        st = stats(s.url)
        assert st["max_in_flight"] == 1  # b started only after a's request finished and a was unloaded
        assert (st["model_loads"], st["loaded"]) == (1, ["b:1b"])


def test_generate_streams_and_answers_whole_as_the_ollama_client_asks() -> None:
    with sim(name="box", **FAST) as s:
        # The body the official client sends: GenerateRequest(...).model_dump(exclude_none=True).
        body: dict[str, Any] = {"model": MODEL, "prompt": "why is the sky blue", "system": "be brief", "stream": True}
        r = httpx.post(f"{s.url}/api/generate", json=body, timeout=5)
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert all(isinstance(line["response"], str) for line in lines)
        assert not any(line["done"] for line in lines[:-1]) and lines[-1]["done_reason"] == "stop"
        streamed = "".join(line["response"] for line in lines)
        assert streamed.startswith("[box] ") and lines[-1]["eval_count"] == 20
        assert lines[-1]["prompt_eval_count"] == 7  # system + prompt, both rendered
        whole = httpx.post(f"{s.url}/api/generate", json={**body, "stream": False, "options": {"num_predict": 5}})
        data = whole.json()
        assert data["done"] is True and data["eval_count"] == 5 and data["response"].startswith("[box] ")
        assert data["prompt_eval_cached_count"] == 6  # the same prompt: all but the last token cached
        assert stats(s.url)["completed"] == 2


def test_generate_without_prompt_only_loads_the_model() -> None:
    with sim(models=["a:1b", "b:1b"], max_loaded=1, load_time=0.01) as s:
        r = httpx.post(f"{s.url}/api/generate", json={"model": "b:1b"}, timeout=5)
        assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
        assert loaded(s.url) == ["b:1b"]
        assert (stats(s.url)["model_loads"], stats(s.url)["completed"]) == (1, 0)


def test_counters_give_hit_rate_and_slot_gaps_from_the_server_side() -> None:
    with sim(slots=1, ttft=0.0, tokens_per_second=50.0, prefill_tps=1000.0) as s:  # 80 ms of output each
        for text in ("one", "two", "three"):
            final(s.url, task(text))
        st = stats(s.url)
        prompt = len(tokenize(ROLE)) + 1
        assert (st["prompt_tokens"], st["cached_prompt_tokens"], st["prefix_hits"]) == (3 * prompt, 2 * (prompt - 1), 2)
        assert st["slot_gaps"] == 2 == len(st["slot_gap_seconds"])  # between requests 1-2 and 2-3 on the one slot
        assert st["slot_gap_median"] > 0  # each next request was sent only after the previous answer arrived
        httpx.post(f"{s.url}/sim/reset")
        final(s.url, task("four"))  # the idle time before the reset is not a gap
        assert stats(s.url)["slot_gaps"] == 0
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda t: final(s.url, task(t)), ["five", "six", "seven"]))
        gaps = stats(s.url)["slot_gap_seconds"]
        # A queued request gets the slot the moment it frees: no client round trip, only the simulator's event
        # loop waking it (in this process, sharing the GIL with the client threads: ms on a busy machine).
        assert len(gaps) == 3 and min(gaps) < 0.01


def test_slot_caches_and_residency_rules() -> None:
    caches = SlotCaches()
    a, b = tokenize("a b c x"), tokenize("a b d y")
    first = caches.take(a, 2, now=0.0)
    assert first.slot is caches.slots[0] and first.cached == 0 and first.gap is None
    second = caches.take(b, 2, now=0.0)  # slot 0 is busy
    caches.release(first.slot, now=1.0)
    caches.release(second.slot, now=1.5)
    first.slot.tokens, second.slot.tokens = a, b
    again = caches.take(tokenize("a b d z"), 1, now=2.0)  # shrunk to one slot: slot 1 is never chosen again
    assert (again.slot, again.cached, again.gap) == (caches.slots[0], 2, 1.0)
    residency = Residency(["m1", "m2"])
    residency.touch("m1")
    assert residency.victim(lambda m: False) == "m2"  # least recently used
    assert residency.victim(lambda m: m == "m2") == "m1"  # an idle model goes before a busy one
    with pytest.raises(ValidationError, match="max_loaded"):
        SimConfig(models=["a", "b"], loaded=["a", "b"], max_loaded=1)


def test_restart_drops_in_flight_then_serves_again_on_the_same_port() -> None:
    with sim(ttft=0.0, tokens_per_second=20.0) as s:
        url = s.url
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(chat, url, 20)
            wait_for(lambda: s.stats()["in_flight"] == 1)
            s.restart(down=0.2)
            with pytest.raises(httpx.TransportError):
                running.result()
        assert s.url == url and s.restarts and s.restarts[0] <= time.time()
        assert chat(url, n=2).status_code == 200  # back, on the same address, with empty slots
        log = s.stats()["requests_log"]
        assert [e["completed"] for e in log] == [False, True]  # the log survives; only the second got an answer
        assert log[1]["at"] >= s.restarts[0]


def test_reply_bytes_makes_a_runaway_answer() -> None:
    with sim(ttft=0.0, tokens_per_second=1000.0, reply_bytes=200_000) as s:
        r = chat(s.url, n=10, stream=True)
        assert len(r.content) > 200_000 and json.loads(r.text.splitlines()[-1])["done"]
