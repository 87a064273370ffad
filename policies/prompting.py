"""How a specialist's task becomes chat messages, laid out stable-first for prefix caching.

Ollama keeps one KV cache per parallel slot and hands a request the free slot
with the longest common token prefix; llama.cpp reuses its previous call's
prefix the same way. Only the tokens after the first difference are prefilled
again, so the prompt is ordered from what changes least to what changes most:

1. system: the role prompt (the same for every task of the specialist);
2. the problem and the shared context (the same for every task of the run);
3. upstream findings (shared by the tasks that depend on the same tasks);
4. the task's own input data, then its instruction, last.

Rendering is deterministic: the same inputs give the same bytes, so equal
parts of two prompts really are one prefix. Top-level keys keep the order the
plan gave them (the author's order reads best); nested mappings are dumped
with sorted keys.
"""

from __future__ import annotations

from typing import Any

import yaml

from teamorch.config import SpecialistConfig
from teamorch.messages import Task

# One upstream output is cut to this many characters: a long report must not crowd out the task.
MAX_UPSTREAM_CHARS = 4000


def prompt_blocks(
    spec: SpecialistConfig, task: Task, problem: str, context: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> list[str]:
    """The prompt in its four stable-first blocks: role, shared (problem and context), upstream findings, the task.

    A block is "" when there is nothing to put in it (no upstream findings).
    `teamorch.policies.prefix.signature` hashes these blocks for the balancer,
    so the cut between two blocks is where two prompts may stop sharing.
    """
    shared = [f"Problem: {problem}"]
    if context:
        shared.append("Context:\n" + _render(context))
    findings = ""
    if upstream:
        findings = "Findings from other specialists:\n" + "\n\n".join(
            f"### {u.get('specialist', task_id)} ({task_id})\n{(u.get('output') or '')[:MAX_UPSTREAM_CHARS]}"
            for task_id, u in upstream.items()
        )
    data = dict(task.input_data)
    instruction = data.pop("instruction", None) or data.pop("prompt", None)
    own = [f"Input:\n{_render(data)}"] if data else []
    own.append(f"Your task: {instruction or f'{task.task_id} (as {spec.name})'}")
    system = spec.system_prompt or f"You are {spec.name}."
    return [system, "\n\n".join(shared), findings, "\n\n".join(own)]


def messages_from_blocks(blocks: list[str]) -> list[dict[str, str]]:
    """Role as the system message; the other non-empty blocks, in order, as the user message."""
    return [
        {"role": "system", "content": blocks[0]},
        {"role": "user", "content": "\n\n".join(b for b in blocks[1:] if b)},
    ]


def build_messages(
    spec: SpecialistConfig, task: Task, problem: str, context: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> list[dict[str, str]]:
    """Role as the system message; problem, context, upstream findings, input and instruction as the user message.

    `upstream` maps a dependency's task id to its `specialist` and `output`.
    """
    return messages_from_blocks(prompt_blocks(spec, task, problem, context, upstream))


def _render(data: dict[str, Any]) -> str:
    """`key: value` lines; multi-line strings start on their own line, other values as one-line YAML."""
    lines = []
    for key, value in data.items():
        if isinstance(value, str) and "\n" in value:
            lines.append(f"{key}:\n{value}")
        elif isinstance(value, str):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {yaml.safe_dump(value, default_flow_style=True, sort_keys=True).strip()}")
    return "\n".join(lines)
