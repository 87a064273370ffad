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

from teamorch.errors import ConfigError
from teamorch.sim import SimConfig, SimServer, load_fleet

MODEL = "gemma3:270m"


@contextmanager
def sim(**knobs: Any) -> Iterator[SimServer]:
    with SimServer(SimConfig(**knobs)) as server:
        yield server


def chat(
    url: str, n: int | None = None, stream: bool = False, model: str = MODEL, timeout: float = 10.0
) -> httpx.Response:
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello there world"}],
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
