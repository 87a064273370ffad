"""Combining what specialists found, judging success, and measuring the run.

Strategies take the finished `TaskResult`s (in plan order) and return a
JSON-serialisable result; they never call a model themselves — a strategy
that needs one (a judge) is a task in the plan, so it is balanced, retried
and reported like every other call.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from teamorch.errors import ConfigError
from teamorch.messages import Statistics, TaskResult

# A strategy returns anything JSON-serialisable; `object`, not `Any`, so a caller must not assume a shape.
Strategy = Callable[[Sequence[TaskResult]], object]


def merge_all(results: Sequence[TaskResult]) -> dict[str, Any]:
    """Every successful output keyed by task id, with who produced it and where."""
    return {
        r.task_id: {"specialist": r.specialist, "server": r.server, "output": r.output}
        for r in results
        if r.status == "succeeded"
    }


def use_first_result(results: Sequence[TaskResult]) -> dict[str, Any] | None:
    """The success that finished first (wall clock), with its provenance."""
    done = [r for r in results if r.status == "succeeded" and r.ended_at is not None]
    if not done:
        return None
    first = min(done, key=lambda r: r.ended_at or 0.0)
    return {"task_id": first.task_id, "specialist": first.specialist, "server": first.server, "output": first.output}


BUILTIN: dict[str, Strategy] = {"merge_all": merge_all, "use_first_result": use_first_result}


def resolve_strategy(name: str) -> Strategy:
    """A built-in name, or a dotted path `package.module:function` to a user's own."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"unknown synthesis_strategy {name!r}; use {', '.join(BUILTIN)} or 'package.module:function'",
            field="synthesis_strategy",
        )
    module_name, _, attr = name.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:  # ':f' / '.mod:f' raise Value/TypeError
        raise ConfigError(f"cannot load custom synthesis {name!r}: {exc}", field="synthesis_strategy") from exc
    if not callable(func):
        raise ConfigError(f"custom synthesis {name!r} is not callable", field="synthesis_strategy")
    return func


def meets_criteria(criteria: str, results: Sequence[TaskResult]) -> bool:
    """`all_tasks_complete`, `majority`, `any` or `at_least: N` over task statuses."""
    ok = sum(1 for r in results if r.status == "succeeded")
    total = len(results)
    if criteria == "all_tasks_complete":
        return total > 0 and ok == total
    if criteria == "any":
        return ok > 0
    if criteria == "majority":
        return ok * 2 > total
    if criteria.startswith("at_least:"):
        return ok >= int(criteria.split(":", 1)[1])
    raise ConfigError(f"unknown success_criteria {criteria!r}", field="success_criteria")


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _peak_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def compute_statistics(results: Sequence[TaskResult], wall: float) -> Statistics:
    """The seed's metrics, from measured task intervals.

    parallel_efficiency = sum of task durations / wall time (the seed's
    "speedup"); parallelism_factor = peak number of requests running on
    servers at once / total tasks;
    server_utilization = fraction of the wall time a server had a request.
    """
    ran = [r for r in results if r.started_at is not None and r.ended_at is not None]
    sequential = sum(r.duration for r in ran)
    # Concurrency is counted on servers (attempt intervals), not from dispatch: a task queued at the
    # balancer for a free slot is not running in parallel with anything.
    intervals = [(a.started_at, a.ended_at) for r in ran for a in r.attempts if a.server is not None]
    per_server: dict[str, list[tuple[float, float]]] = {}
    for r in ran:
        for a in r.attempts:
            if a.server is not None:
                per_server.setdefault(a.server, []).append((a.started_at, a.ended_at))
    ok = sum(1 for r in results if r.status == "succeeded")
    total = len(results)
    return Statistics(
        total_tasks=total,
        successful_tasks=ok,
        failed_tasks=sum(1 for r in results if r.status == "failed"),
        success_rate=ok / total if total else 0.0,
        total_duration=wall,
        sequential_duration=sequential,
        parallel_efficiency=sequential / wall if wall > 0 else 0.0,
        parallelism_factor=_peak_overlap(intervals) / total if total else 0.0,
        server_utilization={
            name: min(1.0, _union_length(iv) / wall) if wall > 0 else 0.0 for name, iv in sorted(per_server.items())
        },
        tokens=sum(r.tokens for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        cached_tokens=sum(r.cached_tokens or 0 for r in results),
    )


def merge_statistics(a: Statistics, b: Statistics) -> Statistics:
    """Totals of two sets of runs, run after run (so a coordinator keeps totals, not every task).

    Counts, durations and tokens add up; rates are recomputed from the sums;
    utilization is busy seconds over total seconds; the parallelism factor is
    the task-weighted mean of the runs' factors.
    """
    wall = a.total_duration + b.total_duration
    total = a.total_tasks + b.total_tasks
    ok = a.successful_tasks + b.successful_tasks
    sequential = a.sequential_duration + b.sequential_duration
    busy: dict[str, float] = {}
    for stats in (a, b):
        for name, share in stats.server_utilization.items():
            busy[name] = busy.get(name, 0.0) + share * stats.total_duration
    return Statistics(
        total_tasks=total,
        successful_tasks=ok,
        failed_tasks=a.failed_tasks + b.failed_tasks,
        success_rate=ok / total if total else 0.0,
        total_duration=wall,
        sequential_duration=sequential,
        parallel_efficiency=sequential / wall if wall > 0 else 0.0,
        parallelism_factor=(a.parallelism_factor * a.total_tasks + b.parallelism_factor * b.total_tasks) / total
        if total
        else 0.0,
        server_utilization={name: seconds / wall if wall > 0 else 0.0 for name, seconds in sorted(busy.items())},
        tokens=a.tokens + b.tokens,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        hedges=a.hedges + b.hedges,
        hedge_wins=a.hedge_wins + b.hedge_wins,
        wasted_tokens=a.wasted_tokens + b.wasted_tokens,
    )


# ---- consensus -------------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"(?im)^\W*(?:final\s+)?answer\s*[:\-]\s*(.+?)\s*$")
_FILLER = {"the", "a", "an", "to", "we", "should", "i", "recommend", "use", "go", "with", "approach", "option", "is"}
SIMILAR = 0.6


def extract_answer(text: str | None) -> str:
    """The expert's choice: its last 'ANSWER:' line, else its first non-empty line."""
    if not text:
        return ""
    found = _ANSWER_LINE.findall(text)
    if found:
        return found[-1][:200]
    for line in text.splitlines():
        line = re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip()
        if line:
            return line[:200]
    return ""


def normalize_answer(answer: str) -> str:
    words = re.findall(r"[a-z0-9]+", answer.lower())
    return " ".join(w for w in words if w not in _FILLER)


def _similar(a: str, b: str) -> bool:
    if a == b:
        return True
    sa, sb = set(a.split()), set(b.split())
    return bool(sa and sb) and len(sa & sb) / len(sa | sb) >= SIMILAR


def vote(results: Sequence[TaskResult]) -> dict[str, Any]:
    """Cluster normalized answers (exact, then word overlap), majority, agreement score, ties."""
    clusters: list[dict[str, Any]] = []
    for r in results:
        if r.status != "succeeded":
            continue
        raw = extract_answer(r.output)
        norm = normalize_answer(raw)
        for cluster in clusters:
            if _similar(cluster["key"], norm):
                cluster["voters"].append(r.specialist)
                break
        else:
            clusters.append({"key": norm, "answer": raw, "voters": [r.specialist]})
    voters = sum(len(c["voters"]) for c in clusters)
    clusters.sort(key=lambda c: -len(c["voters"]))
    top = len(clusters[0]["voters"]) if clusters else 0
    tied = [c["answer"] for c in clusters if len(c["voters"]) == top] if clusters else []
    return {
        "answer": clusters[0]["answer"] if clusters and len(tied) == 1 else None,
        "agreement": top / voters if voters else 0.0,
        "tie": len(tied) > 1,
        "tied": tied if len(tied) > 1 else [],
        "votes": {c["answer"]: c["voters"] for c in clusters},
        "voters": voters,
    }


def vote_summary(result: dict[str, Any]) -> str:
    """A `vote` in one line, for the judge's instruction: each answer with its voters, agreement, tie."""
    votes = "; ".join(f"{answer!r}: {', '.join(voters)}" for answer, voters in result["votes"].items())
    return f"{votes} (agreement {result['agreement']:.0%}{', tie' if result['tie'] else ''})"


def consensus(results: Sequence[TaskResult]) -> dict[str, Any]:
    """Vote of the last round's experts, each round's agreement, and the judge's synthesis if any."""
    work = [r for r in results if r.kind == "work"]
    rounds = sorted({r.round for r in work})
    history = []
    for n in rounds:
        v = vote([r for r in work if r.round == n])
        history.append({"round": n, "agreement": v["agreement"], "answer": v["answer"], "tie": v["tie"]})
    final = vote([r for r in work if r.round == rounds[-1]]) if rounds else vote([])
    judges = [r for r in results if r.kind == "synthesis" and r.status == "succeeded"]
    final["rounds"] = history
    final["judgement"] = judges[-1].output if judges else None
    return final


BUILTIN["consensus"] = consensus
