"""Driving one plan's DAG to the end, inside the coordinator actor.

`PlanExecutor` holds what a run has in flight (asyncio tasks awaiting
specialist actors) and hands every result to the run's `RunRecorder`, which
journals it (fsynced, when the run is kept on disk) before the result is
stored, counted or given to a dependant: a driver killed at any moment loses
no finished LLM call. Which tasks start, which are skipped and which a
cancellation stops is decided in `teamorch.policies.dag`; this module only
carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import ray
from ray import ObjectRefGenerator
from ray.actor import ActorHandle

from teamorch.actors import TurnBatch
from teamorch.actors.metrics import fleet_metrics
from teamorch.errors import unwrap
from teamorch.journal import (
    JournalEvent,
    PlanResolved,
    RunFinished,
    RunJournal,
    TaskFinished,
    TaskQueued,
    attempt_events,
)
from teamorch.messages import (
    Assignment,
    ConsensusSpec,
    Dispatch,
    OrchestrationPlan,
    PriorityClass,
    RunReport,
    Task,
    TaskResult,
)
from teamorch.policies.dag import (
    Cancel,
    Journal,
    cancel_waiting,
    dispatch_chunks,
    diversity_group,
    hedge_won,
    next_step,
    unrun,
    upstream_for,
)
from teamorch.policies.planning import consensus_judge, consensus_round, critical_path_priority, plan_for
from teamorch.policies.synthesis import Strategy, vote, vote_summary

RUN_CANCELLED = "run cancelled"
# Tasks of one DAG step sent per batch: a 500-task step sent whole kept the specialist, then the balancer, idle
# while the coordinator journaled and built all 500 (a quarter of the run's wall time at near-zero service time).
DISPATCH_CHUNK = 128
# A step's first chunk is smaller: its tasks reach the servers while the specialist still takes in the rest, so
# results start coming back sooner (500 tasks at near-zero service time: first result ~70 ms after the first
# start instead of ~100 ms with a whole 128 first).
FIRST_CHUNK = 16


class RunRecorder:
    """One run's results in memory (`results`, what the DAG rules read), each journaled before it is kept.

    A resumed run starts with the journal's finished results, so those tasks
    are never sent again and their dependants receive the journaled outputs.
    The in-memory copy is the journal's (secrets scrubbed), so what a client
    polls, a dependant reads and the report shows are the same text.
    `priority_class` is the run's, given to every lease of its tasks.
    """

    def __init__(self, journal: RunJournal, priority_class: PriorityClass = "interactive") -> None:
        self.journal = journal
        self.run_id = journal.run_id
        self.priority_class = priority_class
        self.results: Journal = journal.finished_results()

    def resolved(self, plan: OrchestrationPlan) -> None:
        self.journal.append(PlanResolved(plan=plan))

    def queued(self, task: Task) -> None:
        self.journal.append(TaskQueued(task_id=task.task_id, specialist=task.specialist))

    def live(self, event: JournalEvent) -> None:
        """A fact a specialist reported while its task runs (a duplicate of one already journaled is dropped)."""
        self.journal.append(event)

    def record(self, result: TaskResult) -> None:
        for event in attempt_events(result):
            self.journal.append(event)
        stored = self.journal.append(TaskFinished(result=result))
        if isinstance(stored, TaskFinished):
            self.results[result.task_id] = stored.result
            fleet_metrics().task_finished(stored.result)
        else:  # the task's final result is journaled already: keep that one
            self.results.setdefault(result.task_id, result)

    def finish(self, error: str | None, synthesis: Strategy | None) -> RunReport:
        """The run's report, then its run_finished, then the journal closed (a later resume may write it).

        The report is made first because run_finished carries its verdict; it
        ends the session at the same instant, so the journal rebuilds this report.
        """
        at = time.time()
        report = self.journal.report(error, synthesis, until=at)
        self.journal.append(RunFinished(success=report.success, error=error, interrupted=error == RUN_CANCELLED, at=at))
        self.journal.close()
        return report


class PlanExecutor:
    """Runs every task of `plan` not yet recorded in `run` on the `specialists` actors, at most `limit` at once.

    With `use_first_result` the run is hedged: the first successful work task
    wins and every other work task is cancelled, which closes its HTTP request
    on the server side.
    """

    def __init__(
        self,
        plan: OrchestrationPlan,
        run: RunRecorder,
        specialists: Mapping[str, ActorHandle],
        limit: int | None = None,
    ) -> None:
        self.plan = plan
        self.recorder = run
        self.journal = run.results  # what the DAG rules read: tasks recorded so far
        self.specialists = specialists
        self.run_id = run.run_id  # names the run's consensus groups at the balancer
        self.limit = limit or len(plan.tasks)
        self.waves = plan.wave_of()
        self.priority = critical_path_priority(plan)
        self.running: dict[asyncio.Task[TaskResult], Task] = {}
        # Tasks neither recorded nor in flight: while there are none, no result can start or skip anything.
        self.unsent = {t.task_id for t in plan.tasks} - set(self.journal)
        # Each task in flight puts itself here when it ends: waiting on the queue costs the same with 5 or 5,000
        # in flight, where `asyncio.wait` over them all hooked and unhooked every one per result.
        self.ended: asyncio.Queue[asyncio.Task[TaskResult]] = asyncio.Queue()

    async def run(self) -> str | None:
        """Run to the end; returns why the run was cut short, or None."""
        try:
            while self._dispatch_ready():
                done = {await self.ended.get()}
                while not self.ended.empty():  # every result that came in with it: one DAG step for all
                    done.add(self.ended.get_nowait())
                await self._collect(done)
        except asyncio.CancelledError:
            await self._cancel(Cancel.RUN, RUN_CANCELLED)
            return RUN_CANCELLED
        return None

    def _in_flight(self) -> set[str]:
        return {t.task_id for t in self.running.values()}

    def _dispatch_ready(self) -> bool:
        """Record the tasks that will never run, start the ready ones; False when nothing is left in flight."""
        if not self.unsent:
            return bool(self.running)
        step = next_step(self.plan, self.journal, self._in_flight(), self.limit)
        with self.recorder.journal.group():  # one fsync for the settled facts, before anything acts on them
            for result in step.settled:
                self.unsent.discard(result.task_id)
                self.recorder.record(result)
        for chunk in dispatch_chunks(step.start, DISPATCH_CHUNK, FIRST_CHUNK):
            with self.recorder.journal.group():  # one fsync for the chunk's facts, before any of its tasks is sent
                for task in chunk:
                    self.unsent.discard(task.task_id)
                    self.recorder.queued(task)
            self._send(chunk)
        return bool(self.running)

    def _send(self, tasks: list[Task]) -> None:
        """Start `tasks`: those of one specialist as one `run_many` batch, submitted now, mid-turn, so it
        starts work while the next chunk is still being prepared here."""
        by_specialist: dict[str, list[Task]] = {}
        for task in tasks:
            by_specialist.setdefault(task.specialist, []).append(task)
        for name, group in by_specialist.items():
            dispatches = [self._dispatch(task) for task in group]
            handle = self.specialists.get(name)
            batch = _Batch(handle, dispatches) if handle is not None and len(group) > 1 else None
            for task, dispatch in zip(group, dispatches, strict=True):
                fut = asyncio.create_task(self._run_task(task, dispatch, batch))
                fut.add_done_callback(self.ended.put_nowait)
                self.running[fut] = task

    async def _collect(self, done: set[asyncio.Task[TaskResult]]) -> None:
        winners = []
        with self.recorder.journal.group():  # one fsync for every result of this turn, before any is acted on
            for fut in done:
                if fut not in self.running:
                    continue  # cancelled by `_cancel`, which recorded it
                task = self.running.pop(fut)
                result = fut.result()
                self.recorder.record(result)
                if hedge_won(self.plan, result):
                    winners.append(task.task_id)
        if winners:
            await self._cancel(Cancel.HEDGE, f"hedged: {winners[0]!r} finished first")

    async def _cancel(self, scope: Cancel, reason: str) -> None:
        for fut, task in list(self.running.items()):
            if scope.stops(task):
                fut.cancel()
                del self.running[fut]
                self.recorder.record(unrun(task, self.waves, "cancelled", f"{reason}; its request was closed"))
        await asyncio.sleep(0)  # let the cancelled tasks reach ray.cancel before the run returns
        for result in cancel_waiting(self.plan, self.journal, self._in_flight(), scope, reason):
            self.unsent.discard(result.task_id)
            self.recorder.record(result)

    def _dispatch(self, task: Task) -> Dispatch:
        """The task as its specialist receives it, under a key of its own for this hand-out: a specialist Ray
        restarts mid-task re-runs it under the same key (no second generation), while a later session of a
        resumed run asks afresh."""
        assignment = Assignment(
            task=task,
            problem=self.plan.problem,
            context=self.plan.context,
            upstream=upstream_for(task, self.journal),
            wave=self.waves[task.task_id],
            priority=self.priority[task.task_id],
            group=diversity_group(self.plan, task, self.run_id),
            run_id=self.run_id,
            priority_class=self.recorder.priority_class,
        )
        return Dispatch(assignment=assignment, key=f"{self.run_id}/{task.task_id}/{uuid.uuid4().hex[:8]}")

    async def _run_task(self, task: Task, dispatch: Dispatch, batch: _Batch | None = None) -> TaskResult:
        handle = self.specialists.get(task.specialist)
        if handle is None:
            return unrun(task, self.waves, "failed", f"unknown specialist {task.specialist!r}")
        try:
            if batch is not None:
                with contextlib.suppress(_BatchLost):  # its specialist died mid-batch: sent again alone, below
                    return await batch.result(dispatch)
            ref = handle.run.remote(dispatch.assignment, dispatch=dispatch.key)
            try:
                return await ref
            except asyncio.CancelledError:
                ray.cancel(ref)
                raise
        except Exception as exc:  # the specialist actor died or raised unexpectedly
            return unrun(task, self.waves, "failed", f"specialist {task.specialist!r} crashed: {unwrap(exc)}")


class _BatchLost(Exception):
    """The specialist running a batch died before answering for this task (Ray restarts it)."""


class _Batch:
    """The tasks one DAG step gives one specialist, sent in one `Specialist.run_many` call.

    Its results come back as a Ray streaming generator, several per item
    when they end together, and `result` hands each to the task waiting for
    it. The call goes without Ray's retries: a retried generator would run
    the whole batch again, finished tasks too. When the specialist dies
    instead, every task still waiting gets `_BatchLost` and is sent again
    alone, under its dispatch key, as Ray would have retried it. A task
    cancelled while it waits (a hedge's loser, a cancelled run) is stopped
    by key (`Specialist.cancel_runs`, one call per loop turn).
    """

    def __init__(self, handle: ActorHandle, dispatches: list[Dispatch]) -> None:
        self.handle = handle
        loop = asyncio.get_running_loop()
        self.waiting: dict[str, asyncio.Future[TaskResult]] = {
            d.assignment.task.task_id: loop.create_future() for d in dispatches
        }
        self._cancels: TurnBatch[str] = TurnBatch(self._cancel)
        # Submitted here, not when the reader first runs: the specialist starts on it during this loop turn.
        results = handle.run_many.options(num_returns="streaming", max_task_retries=0).remote(dispatches)
        self._reader = asyncio.ensure_future(self._read(results))

    async def result(self, dispatch: Dispatch) -> TaskResult:
        try:
            return await self.waiting[dispatch.assignment.task.task_id]
        except asyncio.CancelledError:
            self._cancels.add(dispatch.key)
            raise

    def _cancel(self, keys: list[str]) -> None:
        self.handle.cancel_runs.remote(keys)

    async def _read(self, results: ObjectRefGenerator) -> None:
        failure: Exception = _BatchLost("the batch ended without this task's result")
        try:
            async for ref in results:
                for result in await ref:
                    future = self.waiting.get(result.task_id)
                    if future is not None and not future.done():
                        future.set_result(result)
        except ray.exceptions.RayActorError as exc:
            failure = _BatchLost(str(exc))
        except Exception as exc:  # run_many raised: the tasks without a result fail with its error
            failure = exc
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(failure)


Execute = Callable[[OrchestrationPlan], Awaitable[str | None]]


async def run_consensus(spec: ConsensusSpec, journal: Journal, execute: Execute) -> str | None:
    """Debate rounds until agreement (or the last round), then the judge; returns why the run was cut short.

    Each round's plan includes the earlier rounds, whose results are already
    in `journal`, so `execute` only runs the new round's tasks; a resumed run
    replays the rounds whose results it journaled without running them again
    (the vote over the same answers agrees the same way).
    """
    tasks: list[Task] = []
    error: str | None = None
    for round_no in range(1, spec.rounds + 1):
        tasks += consensus_round(spec, round_no)
        error = await execute(plan_for(spec, "consensus", tasks))
        result = vote([journal[t.task_id] for t in tasks if t.round == round_no])
        if error or result["agreement"] >= spec.agreement_threshold:
            break
    if spec.synthesizer and not error:
        tasks.append(consensus_judge(spec, round_no, vote_summary(result)))
        error = await execute(plan_for(spec, "consensus", tasks))
    return error
