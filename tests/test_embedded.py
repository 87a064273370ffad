"""End to end on the real embedded model: llama.cpp + Gemma 3 270M from PyPI, no simulator."""

from __future__ import annotations

import pytest

from teamorch import api
from teamorch.config import TeamConfig
from teamorch.messages import OrchestrationPlan
from teamorch.policies.synthesis import vote

pytestmark = pytest.mark.model


def test_embedded_default_team_answers_for_real(coordinator) -> None:
    team = TeamConfig.model_validate(
        {
            "specialists": [
                {
                    "name": "Syntax Analyst",
                    "system_prompt": "You find Python syntax errors.",
                    "options": {"num_predict": 12},
                },
                {
                    "name": "Architect",
                    "system_prompt": "You merge findings into a plan.",
                    "options": {"num_predict": 12},
                },
            ]
        }
    )
    plan = OrchestrationPlan.model_validate(
        {
            "problem": "def f(x)\n    return x",
            "tasks": [
                {"task_id": "a", "specialist": "Syntax Analyst"},
                {"task_id": "b", "specialist": "Syntax Analyst"},
                {"task_id": "merge", "specialist": "Architect", "depends_on": ["a", "b"]},
            ],
        }
    )
    report = api.execute(coordinator(team), plan)
    assert report.success, [t.error for t in report.tasks]
    assert {r.server for r in report.tasks} <= {"ollama01", "ollama02"}
    # Two servers with one slot each: the two wave-1 tasks ran on different servers at the same time.
    a, b, merge = report.tasks
    assert a.server != b.server
    for r in report.tasks:
        assert r.output and r.output.startswith("1.")
        assert 0 < r.tokens <= 12
    assert len(merge.output) > len("1.")


def test_embedded_consensus_pattern_end_to_end(coordinator) -> None:
    """A coordination pattern on the real model: the vote runs over real (if shallow) answers."""
    from teamorch.messages import ConsensusSpec

    team = TeamConfig.model_validate(
        {
            "specialists": [
                {"name": "Expert A", "system_prompt": "You are a careful engineer."},
                {"name": "Expert B", "system_prompt": "You are a pragmatic engineer."},
                {"name": "Synthesizer", "system_prompt": "You state the consensus."},
            ]
        }
    )
    spec = ConsensusSpec(
        problem="Should a 2000-line module be split? Answer yes or no.",
        experts=["Expert A", "Expert B"],
        synthesizer="Synthesizer",
        options={"num_predict": 12},
    )
    report = api.execute(coordinator(team), spec)
    assert report.success, [t.error for t in report.tasks]
    experts = [t for t in report.tasks if t.kind == "work"]
    assert {t.server for t in experts} == {"ollama01", "ollama02"}  # diversity: one expert per server
    result = report.synthesis.result
    # The judge saw the experts' real answers: the report's vote is the one their outputs give.
    assert result["voters"] == 2
    assert (result["agreement"], result["votes"]) == (vote(experts)["agreement"], vote(experts)["votes"])
    assert result["judgement"] and result["judgement"].startswith("1.")


def test_embedded_json_schema_format_is_enforced_by_grammar() -> None:
    """Ollama's `format` on the embedded backend: llama.cpp grammar from the JSON schema, so the output parses."""
    import asyncio
    import json

    from teamorch.actors.backends.embedded import EmbeddedBackend
    from teamorch.config import ServerConfig
    from teamorch.messages import ChatRequest, ChatResponse

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    backend = EmbeddedBackend(ServerConfig(name="e", protocol="embedded"))
    req = ChatRequest(
        model="gemma3:270m",
        role="Reviewer",
        messages=[{"role": "user", "content": "Is 2 + 2 = 4? Answer yes or no."}],
        options={"num_predict": 32},
        format=schema,
    )

    counts: list[int] = []  # what the server actor's progress reporter is told, token by token

    async def ask() -> ChatResponse:
        try:
            return await backend.chat(req, counts.append)
        finally:
            await backend.aclose()

    response = asyncio.run(ask())
    assert json.loads(response.text)["answer"] in ("yes", "no")
    # Every sampled token is counted as it comes, including the end-of-text one llama.cpp leaves out of its total.
    assert counts == list(range(1, len(counts) + 1)) and counts[-1] >= response.tokens > 0
