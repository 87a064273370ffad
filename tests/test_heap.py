"""`teamorch.actors.settle_heap`: an actor process freezes its startup heap and collects young objects less often.

Run in a fresh interpreter each (a frozen heap and a changed threshold would
outlive the test in pytest's own process); the Ray worker side, that every
actor the coordinator starts does it, is in `test_batched_calls.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = (
    "import gc, json; from teamorch.actors import GC_YOUNG_THRESHOLD, settle_heap; before = gc.get_threshold(); "
    "settle_heap(); print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), GC_YOUNG_THRESHOLD]))"
)


def _probe(env: dict[str, str]) -> tuple[list[int], list[int], int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    before, after, frozen, young = json.loads(out.stdout)
    return before, after, frozen, young


def test_in_a_ray_worker_the_startup_heap_is_frozen_and_young_collections_are_rarer() -> None:
    before, after, frozen, young = _probe({**os.environ, "RAY_RAYLET_PID": "1"})
    assert frozen > 1_000  # the imported modules' objects, left out of every later full collection
    assert after == [max(before[0], young), *before[1:]]
    assert after[0] > before[0]


def test_outside_a_ray_worker_nothing_changes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"}
    before, after, frozen, _ = _probe(env)
    assert (after, frozen) == (before, 0)
