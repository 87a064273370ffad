"""`python -m teamorch.scenarios.multi_file [--team TEAM.yaml] [--json OUT.json]` — the seed's Scenario 2.

Six analysts read six files of `data/multi_file/shop` in parallel; a dependency
analyzer combines their findings and reports the import cycles. The cycles are
also computed here from the files themselves (Python's `ast`), and both are
shown, so the team's answer can be checked against the truth.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from teamorch.scenarios import HERE, run

PACKAGE = "shop"
SOURCE = HERE / "data" / "multi_file" / PACKAGE


def import_graph(package_dir: Path = SOURCE, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> modules of the same package it imports at module level."""
    modules = {p.stem for p in package_dir.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        tree = ast.parse((package_dir / f"{module}.py").read_text(encoding="utf-8"))
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from shop import pricing` names modules; `from shop.models import Product` names one.
                targets = [f"{package}.{a.name}" for a in node.names] if node.module == package else [node.module]
            for target in targets:
                parts = target.split(".")
                if parts[0] == package and len(parts) > 1 and parts[1] in modules and parts[1] != module:
                    graph[module].add(parts[1])
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each rotated to start at its smallest name, sorted."""
    cycles: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                i = path.index(min(path))
                cycles.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return sorted(list(c) for c in cycles)


def describe(cycles: list[list[str]]) -> str:
    return "\n".join("  " + " -> ".join([*c, c[0]]) for c in cycles) or "  (none)"


def main(argv: list[str] | None = None) -> int:
    truth = find_cycles(import_graph())
    print(f"Import cycles computed from the files ({SOURCE.relative_to(HERE.parent)}):\n{describe(truth)}\n")
    code = run("multi_file", argv)
    print(f"\nFor comparison, the cycles computed from the files:\n{describe(truth)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
