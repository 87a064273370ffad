"""The design's rules, checked: a pure core that imports without Ray, short functions.

ARCHITECTURE.md promises that `policies/` and the leaf modules can be used
and unit-tested without a cluster, that everything crossing an actor boundary
is a pydantic model (tests/test_actor_messages.py), and that actors stay thin.
Each promise leaks quietly (one convenience import, one `-> dict`), so each is a test.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import teamorch
import teamorch.policies

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    "teamorch",
    "teamorch.messages",
    "teamorch.config",
    "teamorch.errors",
    "teamorch.journal",
    "teamorch.actors.metrics",
    "teamorch.plans",
    "teamorch.cli_team",
    "teamorch.sim_model",
    "teamorch.trace",
    *(f"teamorch.policies.{m.name}" for m in pkgutil.iter_modules(teamorch.policies.__path__)),
]
MAX_CODE_LINES = 60


def test_pure_modules_import_neither_ray_nor_httpx() -> None:
    # A fresh interpreter: this test process may already hold Ray from other tests.
    code = f"import sys\nfor m in {PURE!r}: __import__(m)\nprint(sorted({{'ray', 'httpx'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"importing {PURE} pulled in {out.stdout.strip()}"


def test_public_names_are_the_lazy_exports() -> None:
    assert sorted(teamorch._WHERE) == sorted(teamorch.__all__)
    # Resolving every name imports teamorch.api and so Ray: in a fresh interpreter, not in the fast lane's.
    code = "import teamorch\nfor n in teamorch.__all__: getattr(teamorch, n)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code in a function: blank lines, comments and the docstring do not count."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : fn.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_no_function_in_actors_or_policies_is_longer_than_a_screen() -> None:
    long = []
    for path in sorted([*(ROOT / "actors").rglob("*.py"), *(ROOT / "policies").rglob("*.py")]):
        text = path.read_text()
        source = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node, source)
                if n > MAX_CODE_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
