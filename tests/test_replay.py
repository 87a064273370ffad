"""The policy replay (`benchmarks.replay`) runs every workload of `benchmarks.prefix`, the same way every time.

Pure: the real policy functions over the simulator's pure rules on a virtual clock; no Ray, no sockets.
"""

from __future__ import annotations

import pytest

from benchmarks.prefix import tasks
from benchmarks.replay import Case, Replay, bound_of, cases, jobs, replay


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: f"{c.workload}-{c.label}")
def test_replay_is_deterministic_and_never_beats_the_lower_bound(case: Case) -> None:
    first = replay(case, trace=True)
    again = replay(case, trace=True)
    assert first == again
    assert sum(first.per_server.values()) == len(tasks(case.work)) == len(first.spans)
    assert first.makespan >= bound_of(case)
    if case.work.max_loaded:
        assert first.loads >= len(case.work.specialists), "every model is loaded at least once"
    else:
        assert first.loads == 0 and 0.0 < first.hit_rate < 1.0


def test_slots_never_run_more_than_their_count_and_the_planner_replays_too() -> None:
    case = next(c for c in cases() if c.label == "B" and c.work.prefill_tps)
    result = Replay(case.work, case.shapes, planner=True).run(jobs(case.work, tasks(case.work)), trace=True)
    slots = {s.name: s.slots for s in case.shapes}
    for span in result.spans:
        assert span.slot < slots[span.server]
        overlapping = [o for o in result.spans if o.server == span.server and o.start <= span.start < o.end]
        assert len(overlapping) <= slots[span.server]
    assert result.makespan >= bound_of(case)
