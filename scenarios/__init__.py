"""Runnable scenarios: the seed's three and a review pipeline.

Each `scenarios/<name>.yaml` runs with `teamorch run` or `python -m scenarios.<name>`
(same flags: --team, --json, --address, --quiet). With no --team they run on the
embedded default fleet; with --team they run on your servers.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(name: str, argv: list[str] | None = None) -> int:
    """`teamorch run scenarios/<name>.yaml ARGV...`; returns the CLI's exit code."""
    from teamorch.cli import main

    return main(["run", str(HERE / f"{name}.yaml"), *(sys.argv[1:] if argv is None else argv)])
