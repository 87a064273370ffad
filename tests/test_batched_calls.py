"""Batched actor calls: a specialist's chat calls of one loop turn go to their server as one `chat_many`.

Through a real server actor on the local Ray cluster and the simulator (a real
HTTP server on loopback with Ollama's rules), driven from the test's own event
loop by the specialist's `_Chats`. Each batched call must end as it would have
alone: its answer, its own error, Ray's error when the server actor dies, and
a cancelled one closes its HTTP request (the simulator's counters say so).
The executor's batches (`Specialist.run_many`) are covered where their
semantics are: a specialist killed mid-batch (`test_faults.py`) and a hedged
run cancelling its losers (`test_patterns.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from teamorch.actors.server import ChatCall, ModelServer
from teamorch.actors.specialist import _Chats
from teamorch.config import ServerConfig
from teamorch.errors import ModelNotFound
from teamorch.messages import ChatRequest
from teamorch.sim import SimServer

MODEL = "gemma3:270m"


def _server(sim: SimServer, slots: int) -> Any:
    config = ServerConfig(name=sim.config.name, url=sim.url, slots=slots)
    return ray.remote(ModelServer).options(max_concurrency=100, max_restarts=1, max_task_retries=0).remote(config)


def _call(i: int, tokens: int, model: str = MODEL) -> ChatCall:
    req = ChatRequest(
        model=model, messages=[{"role": "user", "content": f"MARK-{i}."}], options={"num_predict": tokens}
    )
    return ChatCall(req=req, key=f"run/t{i}/k")


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_calls_of_one_turn_go_as_one_batch_and_each_ends_with_its_own_answer_or_error(sims, ray_cluster) -> None:
    sim = sims(name="a", slots=3, tokens_per_second=500)
    server = _server(sim, slots=3)

    async def go() -> tuple[list[bool], list[Any]]:
        chats = _Chats({"a": server})
        sent = [chats.send("a", _call(0, 5)), chats.send("a", _call(1, 5)), chats.send("a", _call(2, 5, "nope"))]
        answers = await asyncio.gather(*(chat.answer for chat in sent), return_exceptions=True)
        return [chat.batched and chat.ref is None for chat in sent], answers

    batched, answers = asyncio.run(go())
    assert batched == [True, True, True]
    assert [answer.tokens for answer in answers[:2]] == [5, 5]
    assert isinstance(answers[2], ModelNotFound) and answers[2].server == "a" and answers[2].status == 404
    stats = sim.stats()
    assert (stats["completed"], stats["not_found"]) == (2, 1)


def test_a_lone_call_goes_as_a_plain_chat(sims, ray_cluster) -> None:
    sim = sims(name="a", slots=1, tokens_per_second=500)
    server = _server(sim, slots=1)

    async def go() -> tuple[bool, int]:
        chat = _Chats({"a": server}).send("a", _call(0, 3))
        answer = await chat.answer
        return chat.ref is not None and not chat.batched, answer.tokens

    assert asyncio.run(go()) == (True, 3)


def test_cancelling_a_batched_call_closes_its_request_and_leaves_the_others(sims, ray_cluster) -> None:
    sim = sims(name="a", slots=2, tokens_per_second=20)
    server = _server(sim, slots=2)

    async def go() -> int:
        chats = _Chats({"a": server})
        doomed, kept = chats.send("a", _call(0, 60)), chats.send("a", _call(1, 10))
        await _until(lambda: sim.stats()["in_flight"] == 2)
        doomed.answer.cancel()  # as the specialist's wait_for does on a timeout or a cancelled task
        chats.cancel(doomed)
        return (await kept.answer).tokens

    assert asyncio.run(go()) == 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sim.stats()["cancelled"] != 1:
        time.sleep(0.02)
    stats = sim.stats()
    assert (stats["cancelled"], stats["completed"]) == (1, 1)


def test_a_server_actor_killed_mid_batch_fails_each_call_as_ray_fails_a_call_alone(sims, ray_cluster) -> None:
    sim = sims(name="a", slots=3, tokens_per_second=20)
    server = _server(sim, slots=3)

    async def go() -> tuple[list[bool], list[Any]]:
        chats = _Chats({"a": server})
        alone = chats.send("a", _call(0, 60))
        await asyncio.sleep(0.05)  # a turn later: the next two leave together
        sent = [alone, chats.send("a", _call(1, 60)), chats.send("a", _call(2, 60))]
        await _until(lambda: sim.stats()["in_flight"] == 3)
        ray.kill(server, no_restart=False)
        answers = await asyncio.gather(*(chat.answer for chat in sent), return_exceptions=True)
        return [chat.batched for chat in sent], answers

    batched, answers = asyncio.run(go())
    assert batched == [False, True, True]
    # The same error as the call alone gets (Ray's: the actor is restarting), which the specialist maps to
    # back-pressure or failover exactly as before.
    assert isinstance(answers[0], ray.exceptions.RayActorError), answers
    assert [type(answer) for answer in answers] == [type(answers[0])] * 3


def _heap(_actor: object) -> tuple[int, int]:
    import gc

    return gc.get_freeze_count(), gc.get_threshold()[0]


def test_an_actor_process_settles_its_heap_once_set_up(sims, ray_cluster) -> None:
    """A Ray worker's startup heap is frozen and its young threshold raised (`settle_heap`), so the per-task
    garbage collections stop walking Ray's and pydantic's objects; measured in the actor's own process."""
    from teamorch.actors import GC_YOUNG_THRESHOLD

    server = _server(sims(name="a", slots=1), slots=1)
    frozen, young = ray.get(server.__ray_call__.remote(_heap))
    assert frozen > 10_000
    assert young >= GC_YOUNG_THRESHOLD
