"""The seed's API (`TeamOrchestrator`) on a real Ray cluster against the Ollama-API simulator."""

from __future__ import annotations

import logging

from teamorch import ExecutionWave, OrchestrationPlan, Task, TeamOrchestrator


def test_seed_api_shapes_and_max_workers(sims, ray_cluster, caplog) -> None:
    a = sims(name="ollama01", slots=4, tokens_per_second=400)
    b = sims(name="ollama02", slots=4, tokens_per_second=400)
    team = {
        "servers": [{"name": "ollama01", "url": a.url, "slots": 4}, {"name": "ollama02", "url": b.url, "slots": 4}],
        "default_model": "gemma3:270m",
        "specialists": [{"name": "Syntax Analyst"}, {"name": "Whitespace Analyst"}],
    }
    logger = logging.getLogger("seed")
    with caplog.at_level(logging.INFO, logger="seed"), TeamOrchestrator(team, max_workers=1, logger=logger) as orch:
        task1 = Task(
            task_id="syntax_analysis",
            specialist="Syntax Analyst",
            server="ollama02",
            input_data={"file": "main.py"},
            timeout=300,
        )
        task2 = Task(
            task_id="whitespace_analysis",
            specialist="Whitespace Analyst",
            server="ollama01",
            input_data={"file": "main.py"},
            timeout=300,
        )
        plan = OrchestrationPlan(
            problem="Analyze main.py",
            waves=[ExecutionWave(wave_number=1, tasks=[task1, task2])],
            synthesis_strategy="merge_all",
            success_criteria="all_tasks_complete",
        )
        results = orch.execute_plan(plan, thread=["user: it crashes"])
        assert results["success"] is True
        assert results["duration"] > 0
        assert results["statistics"]["parallel_efficiency"] > 0
        assert set(results["results"]) == {"syntax_analysis", "whitespace_analysis"}
        servers = {t["task_id"]: t["server"] for t in results["tasks"]}
        assert servers == {"syntax_analysis": "ollama02", "whitespace_analysis": "ollama01"}  # seed's pins honoured
        # max_workers=1: the two tasks never overlapped although each server had free slots.
        t1, t2 = sorted(results["tasks"], key=lambda t: t["started_at"])
        assert t1["ended_at"] <= t2["started_at"] + 0.01

        # The simulator answers with "[server] model answer: <hash> tok ...", never JSON: the planner's answer
        # and its repair are both rejected, and the heuristic (no list in the context, no decision question)
        # picks parallel analysis over both analysts.
        plan2 = orch.create_orchestration_plan("Fix complex error with multiple issues", {"file": "main.py"})
        assert plan2.plan_source == "heuristic" and plan2.pattern == "parallel_analysis"
        assert [t.specialist for t in plan2.tasks] == ["Syntax Analyst", "Whitespace Analyst"]
        assert "no JSON object" in plan2.plan_notes[0] and "no JSON object" in plan2.plan_notes[1]
        results2 = orch.execute_plan(plan2)
        assert results2["plan_source"] == "heuristic"
        stats = orch.get_statistics()
        assert stats["runs"] == 2 and stats["total_tasks"] == 2 + len(plan2.tasks)
        # The pattern methods build the spec here and run it on the coordinator.
        results3 = orch.parallel_analysis("Analyze main.py", ["Syntax Analyst", "Whitespace Analyst"])
        assert results3["pattern"] == "parallel_analysis" and set(results3["results"]) == {
            "syntax_analyst",
            "whitespace_analyst",
        }
    assert any("syntax_analysis" in r.getMessage() for r in caplog.records)
