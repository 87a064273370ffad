"""The four coordination patterns, synthesis strategies and hedging, through real Ray actors.

Servers are the Ollama-API simulator (teamorch.sim, real HTTP on loopback): its
`replies` give each expert a deterministic answer and `echo` returns the prompt,
so the tests can see exactly what each specialist was given.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray

from teamorch import api
from teamorch.errors import ConfigError
from teamorch.messages import (
    ConsensusSpec,
    DivideAndConquerSpec,
    OrchestrationPlan,
    ParallelAnalysisSpec,
    PipelineSpec,
    TaskResult,
)
from tests.helpers import NO_PROBES, sim_team


def my_synthesis(results: list[TaskResult]) -> dict[str, Any]:
    return {"count": len(results), "servers": sorted({r.server or "" for r in results})}


def test_parallel_analysis_with_synthesizer(sims, coordinator) -> None:
    echo = sims(name="echo", echo=True, slots=4)
    team = sim_team([(echo, 4)], [{"name": n} for n in ("Syntax", "Logic", "Architect")])
    handle = coordinator(team)
    spec = ParallelAnalysisSpec(problem="bug X", specialists=["Syntax", "Logic"], synthesizer="Architect")
    report: Any = ray.get(handle.run_pattern.remote(spec))
    assert report.success and report.pattern == "parallel_analysis"
    by_id = {t.task_id: t for t in report.tasks}
    assert set(by_id) == {"syntax", "logic", "synthesis"}
    assert by_id["syntax"].wave == by_id["logic"].wave == 1 and by_id["synthesis"].wave == 2
    assert "### Syntax (syntax)" in by_id["synthesis"].output and "### Logic (logic)" in by_id["synthesis"].output
    merged = report.synthesis.result
    assert merged["syntax"]["specialist"] == "Syntax" and merged["syntax"]["server"] == "echo"


def test_divide_and_conquer_chunks_and_reduces(sims, coordinator) -> None:
    echo = sims(name="echo", echo=True, slots=3)
    team = sim_team([(echo, 3)], [{"name": "A"}, {"name": "B"}, {"name": "Reducer"}])
    text = "\n".join(f"line-{i}" for i in range(1, 8))
    spec = DivideAndConquerSpec(
        problem="count", text=text, chunk={"by": "lines", "size": 3}, specialists=["A", "B"], reducer="Reducer"
    )
    report = api.execute(coordinator(team), spec)
    assert report.success
    parts = [t for t in report.tasks if t.task_id.startswith("part_")]
    assert [p.specialist for p in parts] == ["A", "B", "A"]  # dealt round-robin
    assert "line-1" in parts[0].output and "line-4" in parts[1].output and "line-7" in parts[2].output
    reduce = next(t for t in report.tasks if t.task_id == "reduce")
    assert all(f"({p.task_id})" in reduce.output for p in parts)


def test_pipeline_stage_gets_previous_stage_outputs(sims, coordinator) -> None:
    echo = sims(name="echo", echo=True, slots=2)
    team = sim_team([(echo, 2)], [{"name": n} for n in ("Analyst", "Security", "Perf", "Writer")])
    spec = PipelineSpec(
        problem="review",
        stages=[
            {"name": "analyse", "specialists": ["Analyst"]},
            {"name": "review", "specialists": ["Security", "Perf"]},
            {"name": "write", "specialists": ["Writer"]},
        ],
    )
    report = api.execute(coordinator(team), spec)
    assert report.success
    by_id = {t.task_id: t for t in report.tasks}
    assert by_id["review_security"].wave == by_id["review_perf"].wave == 2
    assert "(analyse)" in by_id["review_perf"].output
    assert "(review_security)" in by_id["write"].output and "(review_perf)" in by_id["write"].output
    assert "(analyse)" not in by_id["write"].output.split("Findings from other specialists")[1]


def _expert_replies(round2: str | None = None) -> list[dict[str, str]]:
    replies = (
        [] if round2 is None else [{"match": "Other experts answered", "reply": f"On reflection. ANSWER: {round2}"}]
    )
    return [
        *replies,
        {"match": "expert alpha", "reply": "Split the module first.\nANSWER: approach B"},
        {"match": "expert beta", "reply": "Keep it simple.\nANSWER: Approach B."},
        {"match": "expert gamma", "reply": "Rewrite.\nANSWER: approach A"},
        {"match": "judge", "reply": "Consensus: approach B with tests from A."},
    ]


def _experts_team(sims, replies):
    servers = [sims(name=f"s{i}", slots=2, replies=replies) for i in range(3)]
    specialists = [{"name": f"Expert {n}", "system_prompt": f"You are expert {n}."} for n in ("alpha", "beta", "gamma")]
    specialists.append({"name": "Judge", "system_prompt": "You are the judge."})
    return servers, sim_team([(s, 2) for s in servers], specialists)


def test_consensus_votes_and_spreads_experts_over_servers(sims, coordinator) -> None:
    _servers, team = _experts_team(sims, _expert_replies())
    spec = ConsensusSpec(
        problem="How to refactor?", experts=["Expert alpha", "Expert beta", "Expert gamma"], synthesizer="Judge"
    )
    report = api.execute(coordinator(team), spec)
    assert report.success and report.synthesis.strategy == "consensus"
    result = report.synthesis.result
    assert result["answer"] == "approach B"
    assert abs(result["agreement"] - 2 / 3) < 1e-9
    assert sorted(result["votes"]["approach B"]) == ["Expert alpha", "Expert beta"]
    assert result["judgement"].startswith("Consensus: approach B")
    experts = [t for t in report.tasks if t.kind == "work"]
    assert len({t.server for t in experts}) == 3, "experts of one round go to distinct servers"


def test_consensus_debate_stops_early_on_agreement(sims, coordinator) -> None:
    _, team = _experts_team(sims, _expert_replies(round2="approach B"))
    spec = ConsensusSpec(
        problem="How to refactor?",
        experts=["Expert alpha", "Expert beta", "Expert gamma"],
        rounds=3,
        agreement_threshold=0.9,
    )
    report = api.execute(coordinator(team), spec)
    rounds = report.synthesis.result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]  # round 3 never ran: round 2 agreed
    assert rounds[0]["agreement"] < 0.9 and rounds[1]["agreement"] == 1.0
    round2 = [t for t in report.tasks if t.round == 2]
    assert len(round2) == 3 and all("ANSWER: approach B" in t.output for t in round2)


def test_consensus_tie_is_reported(sims, coordinator) -> None:
    replies = [{"match": "expert alpha", "reply": "ANSWER: yes"}, {"match": "expert beta", "reply": "ANSWER: no"}]
    s = sims(name="s", slots=2, replies=replies)
    team = sim_team(
        [(s, 2)], [{"name": f"Expert {n}", "system_prompt": f"You are expert {n}."} for n in ("alpha", "beta")]
    )
    report = api.execute(coordinator(team), ConsensusSpec(problem="q", experts=["Expert alpha", "Expert beta"]))
    result = report.synthesis.result
    assert result["tie"] is True and sorted(result["tied"]) == ["no", "yes"] and result["answer"] is None


def test_first_result_cancels_losers_and_closes_their_requests(sims, coordinator) -> None:
    fast = sims(name="fast", tokens_per_second=1000)
    slow1 = sims(name="slow1", tokens_per_second=5)
    slow2 = sims(name="slow2", tokens_per_second=5)
    team = sim_team(
        [(fast, 1), (slow1, 1), (slow2, 1)], [{"name": "Solver", "options": {"num_predict": 50}}], balancer=NO_PROBES
    )
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "p",
            "synthesis_strategy": "use_first_result",
            "tasks": [
                {"task_id": f"try{i}", "specialist": "Solver", "server": name}
                for i, name in enumerate(["fast", "slow1", "slow2"])
            ],
        }
    )
    report = api.execute(coordinator(team), plan)
    assert report.success and report.synthesis.result["task_id"] == "try0"
    statuses = {t.task_id: t.status for t in report.tasks}
    assert statuses == {"try0": "succeeded", "try1": "cancelled", "try2": "cancelled"}
    assert "request was closed" in report.tasks[1].error
    # The simulator saw both losing HTTP requests closed by the client before they finished.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (slow1.stats()["cancelled"], slow2.stats()["cancelled"]) != (1, 1):
        time.sleep(0.05)
    assert (slow1.stats()["cancelled"], slow2.stats()["cancelled"]) == (1, 1)
    assert slow1.stats()["completed"] == 0 and slow2.stats()["completed"] == 0


def test_custom_synthesis_by_dotted_path_and_by_callable(sims, coordinator) -> None:
    s = sims(name="s", slots=2)
    team = sim_team([(s, 2)], [{"name": "A"}])
    handle = coordinator(team)
    tasks = [{"task_id": "a", "specialist": "A"}, {"task_id": "b", "specialist": "A"}]
    plan = OrchestrationPlan.model_validate(
        {"problem": "p", "tasks": tasks, "synthesis_strategy": "tests.test_patterns:my_synthesis"}
    )
    report = api.execute(handle, plan)
    assert report.synthesis.result == {"count": 2, "servers": ["s"]}
    plan2 = plan.model_copy(update={"synthesis_strategy": "merge_all"})
    report2: Any = ray.get(handle.run_plan.remote(plan2, None, lambda results: [r.task_id for r in results]))
    assert report2.synthesis.strategy == "custom" and report2.synthesis.result == ["a", "b"]
    # A typo in the dotted path fails when the run starts, not after every task ran.
    requests = s.stats()["requests"]
    with pytest.raises(ConfigError, match=r"tests\.test_patterns:my_synthesys"):
        api.execute(handle, plan.model_copy(update={"synthesis_strategy": "tests.test_patterns:my_synthesys"}))
    assert s.stats()["requests"] == requests


def test_success_criteria_majority_and_at_least(sims, coordinator) -> None:
    ok = sims(name="ok", slots=3)
    team = sim_team([(ok, 3)], [{"name": "A"}, {"name": "Ghost", "model": "missing-model"}])
    team.servers[0].models = ["gemma3:270m"]
    tasks = [{"task_id": f"a{i}", "specialist": "A"} for i in range(2)] + [{"task_id": "g", "specialist": "Ghost"}]
    handle = coordinator(team)
    for criteria, expected in [
        ("majority", True),
        ("all_tasks_complete", False),
        ("at_least: 3", False),
        ("any", True),
    ]:
        plan = OrchestrationPlan.model_validate({"problem": "p", "tasks": tasks, "success_criteria": criteria})
        report = api.execute(handle, plan)
        assert report.success is expected, criteria
        ghost = next(t for t in report.tasks if t.task_id == "g")
        assert ghost.status == "failed" and "missing-model" in ghost.error
