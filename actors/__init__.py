"""Ray actors: thin state + messaging; decisions live in `teamorch.policies`."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from ray import ObjectRef

T = TypeVar("T")

# Allocations (net of frees) between two young-generation collections in an actor process; Python's default is 700.
GC_YOUNG_THRESHOLD = 7000


class TurnBatch(Generic[T]):
    """Messages added during one turn of the event loop, handed to `send` together when the turn ends.

    A Ray actor call costs about half a millisecond of CPU between its two
    ends whatever it carries (measured on 2 cores), so one-way messages that
    many concurrent tasks send (lease releases, live events) go as one call per
    turn: one per message when tasks run one at a time, far fewer in a burst.
    Nothing waits for them, and they leave a turn later than alone would.
    """

    def __init__(self, send: Callable[[list[T]], None], spacing: float = 0.0) -> None:
        """`spacing`: under a burst, seconds kept between two sends at least (0: one send per turn).

        Turns are short under load (a few messages each), so spacing the sends
        is what makes batches large when messages come thousands a second. A
        burst is when the last send carried several messages: after a send of
        one, the next leaves at the end of its turn, so a task run alone (a
        chain of tasks, one request at a time) waits for no timer.
        """
        self._send = send
        self._items: list[T] = []
        self._spacing = spacing
        self._sent = 0.0  # loop time of the last send
        self._burst = False  # the last send carried several messages
        self._due: asyncio.Handle | None = None

    def add(self, item: T) -> None:
        if not self._items:
            loop = asyncio.get_running_loop()
            wait = self._sent + self._spacing - loop.time() if self._burst else 0.0
            self._due = loop.call_later(wait, self._flush) if wait > 0 else loop.call_soon(self._flush)
        self._items.append(item)

    def flush(self) -> None:
        """Send what is pending now (a caller about to wait for everything sent)."""
        if self._due is not None:
            self._due.cancel()
        if self._items:
            self._flush()

    def _flush(self) -> None:
        items, self._items, self._due = self._items, [], None
        self._sent, self._burst = asyncio.get_running_loop().time(), len(items) > 1
        self._send(items)


def settle_heap() -> None:
    """Freeze what an actor process holds once it is set up and collect its young objects less often.

    An actor's startup leaves ~80,000 long-lived objects (Ray, pydantic,
    httpx, their modules) that every full collection walks again, and a task
    allocates a few hundred containers (messages, futures, dicts), so the
    default thresholds ran a young collection every couple of tasks and a
    full one every few hundred. Measured over 2,000 tasks on the simulator
    (`benchmarks.overhead`'s plans), in the coordinator, server actor and
    specialist together: about 0.34 s of collection by default, 0.14 s with
    the startup heap frozen, 0.09 s with the young threshold raised as well.
    Cycles are still collected, only less often; nothing frozen is garbage
    (collected first). Only in a Ray worker: a test that builds an actor
    class in its own process keeps its interpreter's settings.
    """
    if not os.environ.get("RAY_RAYLET_PID"):
        return
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), *older)


async def await_ref(ref: ObjectRef[T]) -> T:
    """Wrap an ObjectRef in a coroutine so asyncio.wait_for / create_task accept it."""
    return await ref


async def as_they_end(jobs: Sequence[asyncio.Future[T]]) -> AsyncIterator[list[asyncio.Future[T]]]:
    """`jobs` as they end, those that end in one loop turn together (cancelled ones included).

    What a batched actor call (`Specialist.run_many`, `ModelServer.chat_many`)
    streams back: one generator item per turn rather than per job, because
    each item costs its two ends a message of their own.
    """
    ended: asyncio.Queue[asyncio.Future[T]] = asyncio.Queue()
    for job in jobs:
        job.add_done_callback(ended.put_nowait)
    left = len(jobs)
    while left:
        done = [await ended.get()]
        while not ended.empty():
            done.append(ended.get_nowait())
        left -= len(done)
        yield done


class KeyedJobs(Generic[T]):
    """The jobs of batched actor calls (`Specialist.run_many`, `ModelServer.chat_many`) by dispatch key.

    A batch is one Ray call, so `ray.cancel` can stop only all of it; a
    single call of it is stopped by its key (`cancel`), as `ray.cancel`
    would stop a call of its own.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, asyncio.Future[T]] = {}

    async def run(
        self, calls: Sequence[tuple[str | None, Coroutine[object, object, T]]]
    ) -> AsyncIterator[list[tuple[int, asyncio.Future[T]]]]:
        """Start every call, then yield (its place in `calls`, its job) for those that end in one loop turn,
        cancelled ones left out; a batch that ends early (its caller gone) cancels the calls still running."""
        jobs = [asyncio.ensure_future(call) for _, call in calls]
        for (key, _), job in zip(calls, jobs, strict=True):
            if key is not None:
                self._jobs[key] = job
        index = {job: i for i, job in enumerate(jobs)}
        try:
            async for done in as_they_end(jobs):
                ended = [(index[job], job) for job in done if not job.cancelled()]
                if ended:
                    yield ended
        finally:
            for (key, _), job in zip(calls, jobs, strict=True):
                if key is not None and self._jobs.get(key) is job:  # not a later batch's (a restarted caller's)
                    del self._jobs[key]
                job.cancel()

    def cancel(self, keys: list[str]) -> None:
        for key in keys:
            job = self._jobs.get(key)
            if job is not None:
                job.cancel()
