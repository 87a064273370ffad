"""A specialist: a role prompt and a model, and the retry loop around one task.

For each attempt it leases a server from the balancer, calls that server's
actor, and releases the lease with the outcome (which feeds the live load
table). Failures fail over to another server per `policies.retry`; every
attempt is recorded in the result, including the ones that failed.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import ray
import yaml

from actors import await_ref
from policies.retry import backoff, exclude_after
from teamorch.config import RetryConfig, SpecialistConfig
from teamorch.errors import NoServerAvailable, ServerError, ServerTimeout, ServerUnreachable, unwrap
from teamorch.messages import Attempt, ChatRequest, ChatResponse, LeaseRequest, Task, TaskResult

MAX_UPSTREAM_CHARS = 4000


def build_messages(
    spec: SpecialistConfig, task: Task, problem: str, context: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> list[dict[str, str]]:
    """Role as the system message; problem, context, the task and upstream findings as the user message."""
    parts = [f"Problem: {problem}"]
    if context:
        parts.append("Context:\n" + _render(context))
    data = dict(task.input_data)
    instruction = data.pop("instruction", None) or data.pop("prompt", None)
    if data:
        parts.append("Input:\n" + _render(data))
    if upstream:
        findings = [
            f"### {u.get('specialist', task_id)} ({task_id})\n{(u.get('output') or '')[:MAX_UPSTREAM_CHARS]}"
            for task_id, u in upstream.items()
        ]
        parts.append("Findings from other specialists:\n" + "\n\n".join(findings))
    parts.append(f"Your task: {instruction or f'{task.task_id} (as {spec.name})'}")
    system = spec.system_prompt or f"You are {spec.name}."
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _render(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, str) and "\n" in value:
            lines.append(f"{key}:\n{value}")
        elif isinstance(value, str):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {yaml.safe_dump(value, default_flow_style=True).strip()}")
    return "\n".join(lines)


class Specialist:
    def __init__(
        self, config: SpecialistConfig, balancer: Any, servers: dict[str, Any], retry: RetryConfig | None = None
    ) -> None:
        self.config = config
        self.balancer = balancer
        self.servers = servers
        self.retry = retry or RetryConfig()
        self._rng = random.Random(hash(config.name) & 0xFFFF)

    async def run(
        self,
        task: Task,
        problem: str,
        context: dict[str, Any] | None = None,
        upstream: dict[str, dict[str, Any]] | None = None,
        wave: int = 0,
        priority: int = 0,
        group: str | None = None,
        response_format: dict[str, Any] | str | None = None,
    ) -> TaskResult:
        """Run one task to a final status; never raises for server trouble."""
        started = time.time()
        deadline = time.monotonic() + task.timeout
        opts = {**self.config.options, **task.options}
        req = ChatRequest(
            model=self.config.model or "",
            messages=build_messages(self.config, task, problem, context or {}, upstream or {}),
            options=opts,
            format=response_format,
            role=self.config.name,
        )
        lease_req = LeaseRequest(
            model=req.model,
            requires=self.config.requires,
            server=task.server,
            priority=priority,
            group=group,
            expected_tokens=int(opts["num_predict"]) if opts.get("num_predict") else None,
        )
        attempts: list[Attempt] = []
        failures = 0
        busy_round = 0
        error: str | None = None
        response: ChatResponse | None = None
        while response is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = error or f"timed out after {task.timeout:g}s"
                break
            try:
                response = await self._attempt(req, lease_req, remaining, attempts)
            except NoServerAvailable as exc:
                error = exc.message if not error else f"{error}; then {exc.message}"
                break
            except ServerError as exc:
                error = str(exc)
                if exc.kind == "busy":
                    busy_round += 1
                    await asyncio.sleep(backoff(busy_round, self.retry.base_delay, self.retry.max_delay, self._rng))
                    continue
                if exclude_after(exc.kind):
                    lease_req.exclude.append(exc.server)
                failures += 1
                if failures > task.max_retries:
                    break
                await asyncio.sleep(backoff(failures - 1, self.retry.base_delay, self.retry.max_delay, self._rng))
        ended = time.time()
        ok = response is not None
        on_server = sum(a.ended_at - a.started_at for a in attempts)
        return TaskResult(
            task_id=task.task_id,
            specialist=self.config.name,
            server=response.server if response else (attempts[-1].server if attempts else None),
            wave=wave,
            status="succeeded" if ok else "failed",
            attempts=attempts,
            started_at=started,
            ended_at=ended,
            duration=on_server,
            waited=max(0.0, ended - started - on_server),
            output=response.text if response else None,
            error=None if ok else error,
            tokens=response.tokens if response else 0,
            kind=task.kind,
            round=task.round,
        )

    async def _attempt(
        self, req: ChatRequest, lease_req: LeaseRequest, remaining: float, attempts: list[Attempt]
    ) -> ChatResponse:
        try:
            lease = await asyncio.wait_for(
                await_ref(self.balancer.acquire.remote(lease_req, self.config.capabilities)), remaining
            )
        except asyncio.TimeoutError as exc:
            raise NoServerAvailable(f"no server slot became free within {remaining:.1f}s") from exc
        except Exception as exc:
            raise unwrap(exc) from None
        server = lease["server"]
        started_wall, started = time.time(), time.monotonic()
        ref = self.servers[server].chat.remote(req)
        outcome, error_text = "ok", None
        response: ChatResponse | None = None
        try:
            response = await asyncio.wait_for(await_ref(ref), max(0.001, remaining - (time.monotonic() - started)))
            return response
        except asyncio.TimeoutError as exc:
            ray.cancel(ref)
            outcome, error_text = "timeout", "no answer before the task deadline"
            raise ServerTimeout(server, error_text) from exc
        except asyncio.CancelledError:
            ray.cancel(ref)
            outcome, error_text = "cancelled", "cancelled"
            raise
        except ray.exceptions.RayActorError as exc:
            outcome, error_text = "unreachable", f"server actor died: {exc}"
            raise ServerUnreachable(server, error_text) from exc
        except Exception as exc:
            cause = unwrap(exc)
            if not isinstance(cause, ServerError):
                cause = ServerError(server, f"{type(cause).__name__}: {cause}")
            outcome, error_text = cause.kind, str(cause)
            raise cause from None
        finally:
            attempts.append(
                Attempt(server=server, started_at=started_wall, ended_at=time.time(), outcome=outcome, error=error_text)
            )
            self.balancer.release.remote(
                lease["lease_id"],
                response is not None,
                outcome,
                time.monotonic() - started,
                response.ttft if response else None,
                response.tokens if response else 0,
                response.eval_seconds if response else None,
                req.model,
                error_text,
            )
