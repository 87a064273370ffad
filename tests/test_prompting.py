"""Prompt layout: stable parts first, so tasks of one specialist share the longest prefix (KV-cache reuse)."""

from __future__ import annotations

from typing import Any

from teamorch.actors.backends.embedded import render_prompt
from teamorch.config import SpecialistConfig
from teamorch.messages import ChatRequest, Task
from teamorch.policies.prompting import MAX_UPSTREAM_CHARS, build_messages

SPEC = SpecialistConfig(name="Reviewer", system_prompt="You review Python code for bugs and say why they matter.")
PROBLEM = "Find the bugs in the payment service before the release."
CONTEXT = {"repo": "payments", "conventions": "PEP 8\ntype hints everywhere", "owners": ["ana", "bo"]}
UPSTREAM = {"scan": {"specialist": "Scanner", "output": "3 files changed: a.py, b.py, c.py"}}


def task(name: str, **input_data: Any) -> Task:
    return Task(task_id=f"review_{name}", specialist=SPEC.name, input_data=input_data)


def as_text(messages: list[dict[str, str]]) -> str:
    """The messages as a chat template lays them out for the model: in order, each after its role."""
    return "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)


def common_prefix(a: str, b: str) -> str:
    """The bytes a prefix cache can reuse from `a` when `b` comes next (character by character)."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def test_two_tasks_of_one_specialist_share_everything_up_to_the_task_input() -> None:
    a = as_text(build_messages(SPEC, task("a", file="a.py", instruction="Review a.py."), PROBLEM, CONTEXT, {}))
    b = as_text(build_messages(SPEC, task("b", file="b.py", instruction="Review b.py."), PROBLEM, CONTEXT, {}))
    shared = common_prefix(a, b)
    # The first byte that differs is the task's own input: role, problem and context are all before it.
    assert shared == a[: a.index("file: a.py") + len("file: ")]
    for stable in (SPEC.system_prompt, PROBLEM, "repo: payments", "PEP 8\ntype hints everywhere", "owners: [ana, bo]"):
        assert stable in shared


def test_upstream_findings_come_before_the_task_input_and_are_shared_too() -> None:
    a = as_text(build_messages(SPEC, task("a", file="a.py"), PROBLEM, CONTEXT, UPSTREAM))
    b = as_text(build_messages(SPEC, task("b", file="b.py"), PROBLEM, CONTEXT, UPSTREAM))
    assert a.index("Context:") < a.index("Findings from other specialists:") < a.index("Input:")
    assert "### Scanner (scan)\n3 files changed: a.py, b.py, c.py" in common_prefix(a, b)


def test_tasks_without_input_data_differ_only_in_the_instruction_at_the_end() -> None:
    a = build_messages(SPEC, task("a", instruction="Check rounding."), PROBLEM, CONTEXT, UPSTREAM)
    b = build_messages(SPEC, task("b", instruction="Check refunds."), PROBLEM, CONTEXT, UPSTREAM)
    assert a[0] == b[0] == {"role": "system", "content": SPEC.system_prompt}
    assert a[1]["content"].endswith("\n\nYour task: Check rounding.")
    assert a[1]["content"].removesuffix("Check rounding.") == b[1]["content"].removesuffix("Check refunds.")


def test_without_an_instruction_the_task_names_itself_last() -> None:
    content = build_messages(SPEC, task("a"), PROBLEM, {}, {})[1]["content"]
    assert content == f"Problem: {PROBLEM}\n\nYour task: review_a (as Reviewer)"


def test_a_role_without_a_prompt_is_named_in_the_system_message() -> None:
    messages = build_messages(SpecialistConfig(name="Tester"), task("a"), PROBLEM, {}, {})
    assert messages[0] == {"role": "system", "content": "You are Tester."}


def test_rendering_is_deterministic_and_nested_keys_are_sorted() -> None:
    one = build_messages(SPEC, task("a", opts={"b": 1, "a": 2}), PROBLEM, {"cfg": {"y": [1, 2], "x": "z"}}, {})
    two = build_messages(SPEC, task("a", opts={"a": 2, "b": 1}), PROBLEM, {"cfg": {"x": "z", "y": [1, 2]}}, {})
    assert one == two
    assert "cfg: {x: z, y: [1, 2]}" in one[1]["content"]


def test_a_long_upstream_output_is_cut() -> None:
    upstream = {"scan": {"specialist": "Scanner", "output": "x" * (MAX_UPSTREAM_CHARS + 500)}}
    content = build_messages(SPEC, task("a"), PROBLEM, {}, upstream)[1]["content"]
    assert "x" * MAX_UPSTREAM_CHARS + "\n\nYour task" in content


def test_the_embedded_completion_prompt_keeps_the_stable_first_order() -> None:
    # llama.cpp reuses the previous call's prefix: the base-model prompt must not move task data forward.
    def prompt(name: str) -> str:
        messages = build_messages(SPEC, task(name, file=f"{name}.py"), PROBLEM, CONTEXT, UPSTREAM)
        return render_prompt(ChatRequest(model="m", messages=messages, role=SPEC.name), max_chars=10_000)

    a, b = prompt("a"), prompt("b")
    assert a.startswith(f"The following is a report written by a reviewer.\n{SPEC.system_prompt}\n\nTask: Problem:")
    assert common_prefix(a, b) == a[: a.index("file: a.py") + len("file: ")]
    assert a.endswith("Your task: review_a (as Reviewer)\n\nReport:\n1.")
