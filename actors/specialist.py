"""A specialist: a role prompt and a model, and the attempts that run one task.

For each attempt it leases a server from the balancer, calls that server's
actor, and releases the lease with the outcome (which feeds the live load
table). What follows a failure (wait, fail over, give up) is decided by
`teamorch.policies.retry.next_step`; the prompt is laid out by
`teamorch.policies.prompting`, and its prefix signature
(`teamorch.policies.prefix`) goes with the lease request so the balancer can
send it where that prefix is cached. Every attempt is recorded in the result,
including the ones that failed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray
from ray import ObjectRef
from ray.actor import ActorHandle

from teamorch.actors import KeyedJobs, TurnBatch, await_ref, settle_heap
from teamorch.actors.leases import LeaseClient, lease_outcome
from teamorch.actors.server import ChatCall, ChatOutcome, ProgressTo
from teamorch.config import RetryConfig, SpecialistConfig
from teamorch.errors import (
    NoServerAvailable,
    ServerBusy,
    ServerError,
    ServerTimeout,
    ServerUnreachable,
    server_error,
    unwrap,
)
from teamorch.journal import AttemptFailed, LiveEvent, TaskStarted
from teamorch.messages import (
    Assignment,
    Attempt,
    ChatRequest,
    ChatResponse,
    Dispatch,
    ErrorClass,
    HedgeAsk,
    Lease,
    LeaseRequest,
    Outcome,
    TaskResult,
)
from teamorch.policies.hedging import wasted_tokens
from teamorch.policies.prefix import signature
from teamorch.policies.prompting import messages_from_blocks, prompt_blocks
from teamorch.policies.retry import next_step, restarting_verdict

# While a request runs, its server actor is asked for a sign of life this often (`Specialist._answer`).
LIVENESS_SECONDS = 5.0


class Specialist:
    """One role of the team as a Ray actor: `config` holds its prompt, model, options and capabilities.

    It holds no state between tasks beyond its handles (`balancer`, and
    `servers`: server name -> server actor), so one actor runs many tasks at
    once. `retry` sets the backoff delays; the number of retries is per task
    (`Task.max_retries`).
    """

    def __init__(
        self,
        config: SpecialistConfig,
        balancer: ActorHandle,
        servers: dict[str, ActorHandle],
        retry: RetryConfig | None = None,
        coordinator: ActorHandle | None = None,
    ) -> None:
        self.config = config
        self.balancer = balancer
        self.servers = servers
        self.retry = retry or RetryConfig()
        self.coordinator = coordinator  # told of each attempt as it starts and fails (live events)
        self._rng = random.Random(hash(config.name) & 0xFFFF)
        self._restarting: dict[str, float] = {}  # server -> when its actor was first seen restarting
        self._leases = LeaseClient(balancer)  # asks and releases batched per loop turn, grants by long poll
        self._events: TurnBatch[tuple[str, LiveEvent]] = TurnBatch(self._report)
        self._batched: KeyedJobs[TaskResult] = KeyedJobs()  # the tasks of `run_many` batches, by dispatch key
        self._chats = _Chats(servers)
        settle_heap()

    async def run(self, assignment: Assignment, dispatch: str | None = None) -> TaskResult:
        """Run one task to a final status; never raises for server trouble.

        `dispatch` names this hand-out of the task (the executor makes one per
        dispatch). If this actor dies mid-task, Ray restarts it and calls `run`
        again with the same arguments: the attempt then asks the balancer and
        the server with the same `dispatch` key, and gets the lease its dead
        predecessor held and the request already running (or its answer)
        instead of a second generation. Attempts of one dispatch never overlap,
        so the key needs no attempt number: a failed attempt frees it for the next.
        """
        task, wave = assignment.task, assignment.wave
        started = time.time()
        opts = {**self.config.options, **task.options}
        blocks = prompt_blocks(self.config, task, assignment.problem, assignment.context, assignment.upstream)
        prefix = signature(blocks)
        req = ChatRequest(
            model=self.config.model or "",
            messages=messages_from_blocks(blocks),
            options=opts,
            format=assignment.response_format,
            role=self.config.name,
        )
        lease_req = LeaseRequest(
            model=req.model,
            requires=self.config.requires,
            server=task.server,
            priority=assignment.priority,
            group=assignment.group,
            expected_tokens=int(opts["num_predict"]) if opts.get("num_predict") else None,
            prefix=list(prefix.chain),
            prefix_tokens=list(prefix.tokens),
            prompt_tokens=prefix.total,
            priority_class=assignment.priority_class,
        )
        attempts: list[Attempt] = []
        response, error = await self._until_done(assignment, req, lease_req, attempts, dispatch)
        ended = time.time()
        on_server = sum(a.ended_at - a.started_at for a in attempts)
        return TaskResult(
            task_id=task.task_id,
            specialist=self.config.name,
            server=response.server if response else (attempts[-1].server if attempts else None),
            wave=wave,
            status="failed" if response is None else "succeeded",
            attempts=attempts,
            started_at=started,
            ended_at=ended,
            duration=on_server,
            waited=max(0.0, ended - started - on_server),
            output=response.text if response else None,
            error=error,
            tokens=response.tokens if response else 0,
            kind=task.kind,
            round=task.round,
            prompt_tokens=response.prompt_tokens if response else 0,
            cached_tokens=response.prompt_cached_tokens if response else None,
            prompt_eval_seconds=response.prompt_eval_seconds if response else None,
            hedged=any(a.hedge for a in attempts),
        )

    async def run_many(self, batch: list[Dispatch]) -> AsyncIterator[list[TaskResult]]:
        """`run` for every task of `batch` at once; yields together the results that end in one loop turn.

        The executor calls it as a Ray streaming generator for the tasks one
        DAG step gives this specialist: one actor call for them all, where a
        call each costs about 0.7 ms of CPU between its two ends (measured:
        0.05 ms per task batched). Each task runs as `run` runs it, under its
        own dispatch key. The executor calls this without Ray's retries: if
        this actor dies, it sends the tasks it has no result for again, one
        `run` each (which Ray retries) under the same keys, so a restarted
        specialist resumes them without a second generation and a finished
        task is not asked again. `cancel_runs` stops single tasks of a batch.
        """
        async for done in self._batched.run([(d.key, self.run(d.assignment, d.key)) for d in batch]):
            yield [job.result() for _, job in done]

    async def cancel_runs(self, keys: list[str]) -> None:
        """Stop tasks of `run_many` batches by dispatch key, as cancelling their `run` would: each closes its
        server request and releases its lease, and its batch yields no result for it."""
        self._batched.cancel(keys)

    async def _until_done(
        self,
        assignment: Assignment,
        req: ChatRequest,
        lease_req: LeaseRequest,
        attempts: list[Attempt],
        key: str | None = None,
    ) -> tuple[ChatResponse | None, str | None]:
        """Attempts until one answers or the retry policy gives up: (response, None) or (None, why it failed)."""
        task = assignment.task
        deadline = time.monotonic() + task.timeout
        failures: list[ErrorClass] = []
        error: str | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                return await self._attempt(assignment, req, lease_req, remaining, attempts, key), None
            except NoServerAvailable as exc:
                return None, f"{_tried(attempts) or error}; then {exc.message}" if error else exc.message
            except ServerError as exc:
                error = str(exc)
                failures.append(exc.error_class)
                step = next_step(failures, deadline - time.monotonic(), task.max_retries, self.retry, self._rng)
                if step.action == "give_up":
                    return None, f"{error}; giving up: {step.reason}"
                if step.action == "retry_elsewhere":
                    lease_req.exclude.append(exc.server)
                await asyncio.sleep(step.delay)
        return None, error or f"timed out after {task.timeout:g}s"

    def _restarting_error(self, server: str) -> ServerError:
        """Ray is restarting the server actor: like a 503 (try again shortly) until it has been gone too long."""
        since = self._restarting.setdefault(server, time.monotonic())
        if restarting_verdict(since, time.monotonic()) == "busy":
            return ServerBusy(server, "server actor restarting")
        return ServerUnreachable(server, f"server actor not back after {time.monotonic() - since:.0f}s (node lost?)")

    def _tell(self, assignment: Assignment, event: LiveEvent) -> None:
        """Fire-and-forget: the coordinator journals the same facts from the result, so a lost report costs
        liveness only (the journal keys attempts by task and number, so the two are written once)."""
        if self.coordinator is not None and assignment.run_id:
            self._events.add((assignment.run_id, event))

    def _report(self, events: list[tuple[str, LiveEvent]]) -> None:
        """One call per run for the live events of one loop turn (`TurnBatch`)."""
        by_run: dict[str, list[LiveEvent]] = {}
        for run_id, event in events:
            by_run.setdefault(run_id, []).append(event)
        if self.coordinator is not None:
            for run_id, batch in by_run.items():
                self.coordinator.task_events.remote(run_id, batch)

    async def drain(self) -> None:
        """Return once every release this specialist sent has reached the balancer, its lease poll ended.

        The team stops right after a run (`teamorch run`, `plan`): a release
        batched to the end of a loop turn can still be on its way, and the long
        poll is always waiting, when the balancer is killed; Ray then logs the
        failed call and retries it, on the driver's terminal.
        """
        await self._leases.drain()
        self._leases.stop()

    def _progress_to(self, assignment: Assignment, attempt: int) -> ProgressTo | None:
        """Where the server tells this attempt's tokens as they stream: the coordinator running the task."""
        if self.coordinator is None or not assignment.run_id:
            return None
        return ProgressTo(run_id=assignment.run_id, task_id=assignment.task.task_id, attempt=attempt)

    async def _attempt(
        self,
        assignment: Assignment,
        req: ChatRequest,
        lease_req: LeaseRequest,
        remaining: float,
        attempts: list[Attempt],
        key: str | None = None,
    ) -> ChatResponse:
        try:
            lease = await self._leases.acquire(lease_req, self.config.capabilities, key, remaining)
        except Exception as exc:
            raise unwrap(exc) from None
        deadline = time.monotonic() + remaining
        call = _Call(lease, key)
        if lease.hedge_after is None:
            return await self._call(assignment, req, call, deadline, attempts)
        return await self._race(assignment, req, lease_req, call, deadline, attempts)

    async def _call(
        self, assignment: Assignment, req: ChatRequest, call: _Call, deadline: float, attempts: list[Attempt]
    ) -> ChatResponse:
        """One request on `call`'s lease, recorded as an attempt (in the order calls started) and released."""
        server, index = call.lease.server, len(attempts)
        task_id, number = assignment.task.task_id, index + 1
        started_wall, call.started = time.time(), time.monotonic()
        attempts.append(Attempt(server=server, started_at=started_wall, ended_at=started_wall, outcome="running"))
        chat = self._chats.send(server, ChatCall(req=req, key=call.key, progress=self._progress_to(assignment, number)))
        # told after the request is queued: both leave at the end of this turn, the request (on the task's path) first
        self._tell(assignment, TaskStarted(task_id=task_id, server=server, attempt=number))
        outcome: Outcome = "ok"
        error_text: str | None = None
        response: ChatResponse | None = None
        try:
            response = await self._answer(server, chat, deadline)
            self._restarting.pop(server, None)
            return response
        except asyncio.TimeoutError as exc:  # `_answer` closed the request
            outcome, error_text = "timeout", "no answer before the task deadline"
            raise ServerTimeout(server, error_text) from exc
        except asyncio.CancelledError:
            outcome, error_text = "cancelled", call.lost or "cancelled"
            raise
        except ray.exceptions.ActorUnavailableError as exc:
            lost = self._restarting_error(server)
            outcome, error_text = lost.error_class, lost.message
            raise lost from exc
        except ray.exceptions.RayActorError as exc:
            outcome, error_text = "unreachable", f"server actor died: {exc}"
            raise ServerUnreachable(server, error_text) from exc
        except Exception as exc:
            cause = unwrap(exc)
            if not isinstance(cause, ServerError):
                cause = ServerError(server, f"{type(cause).__name__}: {cause}")
            self._restarting.pop(server, None)  # the server actor answered (with the box's error): it is up
            outcome, error_text = cause.error_class, str(cause)
            raise cause from None
        finally:
            wasted = call.wasted if outcome == "cancelled" else 0
            attempts[index] = Attempt(
                server=server,
                started_at=started_wall,
                ended_at=time.time(),
                outcome=outcome,
                error=error_text,
                hedge=call.hedge,
                wasted_tokens=wasted,
            )
            if outcome not in ("ok", "cancelled"):
                seconds, why = time.monotonic() - call.started, error_text or outcome
                self._tell(
                    assignment,
                    AttemptFailed(
                        task_id=task_id, server=server, attempt=number, error_class=outcome, error=why, seconds=seconds
                    ),
                )
            self._leases.release(
                lease_outcome(call.lease.lease_id, outcome, req.model, call.started, response, error_text, wasted)
            )

    async def _answer(self, server: str, chat: _Chat, deadline: float) -> ChatResponse:
        """The request's answer; the server actor's loss if it stops showing signs of life first.

        Ray fails a call to an actor whose node is lost within seconds
        (ActorUnavailableError), but not always: a call already on its way
        when the node went could wait forever (seen about one run in five of
        the lost-node test, `tests/test_cluster.py`), holding the task to its
        deadline. So while a request runs, its server actor is asked for a
        sign of life every LIVENESS_SECONDS; one silent for as long again is
        lost, and the request is sent elsewhere.
        """
        try:
            while (left := deadline - time.monotonic()) > LIVENESS_SECONDS:
                # `wait` leaves the answer running at its timeout as `wait_for(shield(...))` did, with half the
                # futures and callbacks per task
                if (await asyncio.wait({chat.answer}, timeout=LIVENESS_SECONDS))[0]:
                    return chat.answer.result()
                try:
                    await asyncio.wait_for(await_ref(self.servers[server].__ray_ready__.remote()), LIVENESS_SECONDS)
                except asyncio.TimeoutError:
                    raise ServerUnreachable(
                        server, f"server actor silent for {LIVENESS_SECONDS:g}s (node lost?)"
                    ) from None
            return await asyncio.wait_for(asyncio.shield(chat.answer), max(0.001, left))
        except (Exception, asyncio.CancelledError):
            if not chat.answer.done():
                self._chats.cancel(chat)
            raise

    async def _race(
        self,
        assignment: Assignment,
        req: ChatRequest,
        lease_req: LeaseRequest,
        primary: _Call,
        deadline: float,
        attempts: list[Attempt],
    ) -> ChatResponse:
        """The call on `primary`, and a hedge of it once it is a straggler: the first answer is the task's.

        The specialist drives the race, not the balancer: it already holds the
        call, its deadline and its cancellation, so a call that ends before
        `hedge_after` costs no extra Ray hop, and a straggler costs one per
        check (`HedgeAsk`). The hedge has its own dispatch key, so server
        actors (which dedup by key) run a second request and the balancer
        grants a second lease. The loser is cancelled, which closes its HTTP
        request, and is released as "cancelled" with the tokens it wasted.
        A failed copy does not fail the task while the other still runs.
        """
        calls = {asyncio.ensure_future(self._call(assignment, req, primary, deadline, attempts)): primary}
        response: ChatResponse | None = None
        try:
            hedge = await self._hedge_when_due(next(iter(calls)), lease_req, primary, deadline)
            if hedge is not None:
                calls[asyncio.ensure_future(self._call(assignment, req, hedge, deadline, attempts))] = hedge
            response = await _first_answer(list(calls))
            return response
        finally:
            losers = [task for task in calls if not task.done()]
            for task in losers:
                if response is not None:  # lost the race (not cancelled with the task): what it cost
                    call = calls[task]
                    elapsed = time.monotonic() - call.started
                    call.wasted = wasted_tokens(elapsed, call.lease.expected_seconds, response.tokens)
                    call.lost = f"hedge race: {response.server} answered first; this request was closed"
                task.cancel()
            await asyncio.gather(*losers, return_exceptions=True)  # their attempts are recorded, leases released

    async def _hedge_when_due(
        self, running: asyncio.Future[ChatResponse], lease_req: LeaseRequest, primary: _Call, deadline: float
    ) -> _Call | None:
        """Wait until `running` ends (None) or the balancer grants a hedge for it (the hedge's call)."""
        delay = primary.lease.hedge_after or 0.0
        while True:
            await asyncio.wait({running}, timeout=max(0.0, min(delay, deadline - time.monotonic())))
            if running.done() or time.monotonic() >= deadline:
                return None
            key = f"{primary.key}#hedge" if primary.key else None
            ask = HedgeAsk(
                lease_id=primary.lease.lease_id, req=lease_req, elapsed=time.monotonic() - primary.started, key=key
            )
            try:
                grant = await await_ref(self.balancer.hedge.remote(ask))
            except Exception:  # the balancer is restarting: no hedge, the primary runs on regardless
                return None
            if grant.lease is not None:
                return _Call(grant.lease, key, hedge=True)
            if grant.check_after is None:
                return None
            delay = grant.check_after


@dataclass
class _Call:
    """One server call of an attempt: its lease and dispatch key, and what a hedge race decided about it."""

    lease: Lease
    key: str | None
    hedge: bool = False  # the duplicate, not the call it hedges
    started: float = field(default_factory=time.monotonic)  # monotonic seconds the request was sent
    wasted: int = 0  # set when it lost a hedge race: output tokens its slot was worth (estimated)
    lost: str | None = None  # why it was cancelled, when it lost a hedge race


@dataclass(eq=False)
class _Chat:
    """One call to a server actor as `_Chats` sends it: where `answer` comes from once it has left."""

    server: str
    call: ChatCall
    answer: asyncio.Future[ChatResponse]
    ref: ObjectRef[ChatResponse] | None = None  # sent alone: its own `ModelServer.chat` call
    batched: bool = False  # sent in a `ModelServer.chat_many` batch


class _Chats:
    """A specialist's calls to its server actors, sent at the end of each loop turn, one Ray call per server.

    A call alone goes as `ModelServer.chat` (tasks run one at a time pay
    nothing for batching); several to one server in one turn go as one
    `ModelServer.chat_many`, a Ray streaming generator, because a Ray call
    each costs its two ends about 0.7 ms of CPU (see `Specialist.run_many`).
    Either way the caller awaits `_Chat.answer`, which ends as the call's own
    `await` would have (the answer, the server's error, Ray's error when the
    server actor died or is restarting), and `cancel` closes the request:
    `ray.cancel` for a call alone, `ModelServer.cancel_chats` by key for one
    in a batch, and nothing at all for one cancelled before it left.
    """

    def __init__(self, servers: dict[str, ActorHandle]) -> None:
        self.servers = servers
        self._outbox: TurnBatch[_Chat] = TurnBatch(self._send)
        self._cancels: TurnBatch[_Chat] = TurnBatch(self._cancel)
        self._readers: set[asyncio.Future[None]] = set()  # each batch's stream reader, held while it runs

    def send(self, server: str, call: ChatCall) -> _Chat:
        chat = _Chat(server, call, asyncio.get_running_loop().create_future())
        self._outbox.add(chat)
        return chat

    def cancel(self, chat: _Chat) -> None:
        if chat.ref is not None:
            ray.cancel(chat.ref)
        elif chat.batched:
            self._cancels.add(chat)

    def _send(self, chats: list[_Chat]) -> None:
        by_server: dict[str, list[_Chat]] = {}
        for chat in chats:
            if not chat.answer.done():  # not cancelled before it left
                by_server.setdefault(chat.server, []).append(chat)
        for server, group in by_server.items():
            keyed = [chat for chat in group if chat.call.key is not None]  # a batched call is cancelled by key
            batch = keyed if len(keyed) > 1 else []
            for chat in [chat for chat in group if chat.call.key is None] if batch else group:
                chat.ref = self.servers[server].chat.remote(chat.call.req, chat.call.key, chat.call.progress)
                answered = asyncio.wrap_future(chat.ref.future())
                answered.add_done_callback(lambda done, to=chat.answer: _settle(to, done))
            for chat in batch:
                chat.batched = True
            if batch:
                reader = asyncio.ensure_future(self._batch(server, batch))
                self._readers.add(reader)
                reader.add_done_callback(self._readers.discard)

    async def _batch(self, server: str, chats: list[_Chat]) -> None:
        failure: Exception = ServerError(server, "its batch ended without an answer for this call")
        try:
            calls = [chat.call for chat in chats]
            async for ref in self.servers[server].chat_many.options(num_returns="streaming").remote(calls):
                outcomes: list[ChatOutcome] = await ref
                for out in outcomes:
                    answer = chats[out.index].answer
                    if answer.done():
                        continue
                    if out.response is not None:
                        answer.set_result(out.response)
                    else:
                        answer.set_exception(server_error(out.error_class, server, out.error, out.status))
        except Exception as exc:  # the server actor died or is restarting: what each call alone would raise
            failure = exc
        for chat in chats:
            if not chat.answer.done():
                chat.answer.set_exception(failure)

    def _cancel(self, chats: list[_Chat]) -> None:
        by_server: dict[str, list[str]] = {}
        for chat in chats:
            if chat.call.key is not None:
                by_server.setdefault(chat.server, []).append(chat.call.key)
        for server, keys in by_server.items():
            self.servers[server].cancel_chats.remote(keys)


def _settle(to: asyncio.Future[ChatResponse], done: asyncio.Future[ChatResponse]) -> None:
    """Copy the end of a call alone (`done`) to the future its caller awaits, unless that was cancelled."""
    if to.done():
        if not done.cancelled():
            done.exception()  # retrieved: a cancelled caller's call may still fail, unseen
        return
    if done.cancelled():
        to.cancel()
    elif (exc := done.exception()) is not None:
        to.set_exception(exc)
    else:
        to.set_result(done.result())


async def _first_answer(tasks: list[asyncio.Future[ChatResponse]]) -> ChatResponse:
    """The first of `tasks` to answer; if every one fails, the first task's (the primary's) error."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is None:
                return task.result()
    return tasks[0].result()  # raises the primary's error


def _tried(attempts: list[Attempt]) -> str:
    """Every server this task failed on, with its last error: a task that ran out of servers says why for each."""
    last = {a.server: a.error or a.outcome for a in attempts if a.outcome not in ("ok", "cancelled")}
    return "; ".join(f"server {server!r}: {why}" for server, why in last.items())
