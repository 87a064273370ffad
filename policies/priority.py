"""Several runs on one fleet: interactive requests are granted before batch ones, and neither class starves.

A run is `interactive` (someone is waiting for its answer: the default for
`teamorch run` and the API) or `batch` (asked for with `priority_class: batch`
or `--priority-class batch`). The balancer orders its queue by a request's
rank (`rank`: interactive above batch), then by the plan's critical-path
`priority`, then as its policy does (arrival; peak_ewma: longest job first).
A rank only orders the queue: nothing running is preempted, so an
interactive request waits for a slot to free up, never behind a queued batch
request (unless that one was promoted, below).

Aging is per class, not per request (`Aging`): when the batch class has gone
`aging_seconds` without a grant while it had requests waiting, its oldest
waiting request is promoted to the interactive rank, where it goes by arrival,
ahead of every interactive request that came after it. One promotion is
pending at a time; the clock restarts at each batch grant. So batch gets at
least one slot per `aging_seconds` under any interactive load, and an
interactive run is never stuck behind a whole batch backlog. Per-request aging
("one class step per N seconds waited") would have promoted every request of
a batch run submitted at once in the same instant, putting the backlog as a
whole ahead of any interactive run that arrives later.
"""

from __future__ import annotations

import bisect

from teamorch.messages import PriorityClass

CLASS_RANK: dict[PriorityClass, int] = {"batch": 0, "interactive": 1}
TOP_RANK = max(CLASS_RANK.values())


def rank(priority_class: PriorityClass) -> int:
    """The class's place in the queue: a higher rank goes first."""
    return CLASS_RANK[priority_class]


class Aging:
    """The batch class's starvation clock over its waiting requests (keys as the balancer's queue names them).

    `add` and `remove` follow the queue; `served` is a batch grant; `due`
    names the request to promote now, if any, and counts it as promoted.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.waiting: list[tuple[float, int]] = []  # (enqueued, key) of batch requests not promoted, oldest first
        self.clock = float("-inf")  # the last batch grant or promotion: the class has waited since then
        self.promoted: int | None = None  # promoted, not yet granted: the next promotion waits for it

    def add(self, key: int, enqueued: float) -> None:
        bisect.insort(self.waiting, (enqueued, key))

    def remove(self, key: int, enqueued: float) -> None:
        """`key` left the queue (granted, refused or cancelled); unknown keys are ignored."""
        if key == self.promoted:
            self.promoted = None
            return
        at = bisect.bisect_left(self.waiting, (enqueued, key))
        if at < len(self.waiting) and self.waiting[at] == (enqueued, key):
            del self.waiting[at]

    def served(self, now: float) -> None:
        """A batch request was granted: the class is not starving."""
        self.clock = max(self.clock, now)

    def due(self, now: float) -> int | None:
        """The oldest batch request, once the class has waited `seconds` since its arrival and the last grant."""
        if self.promoted is not None or not self.waiting:
            return None
        enqueued, key = self.waiting[0]
        if now - max(self.clock, enqueued) < self.seconds:
            return None
        del self.waiting[0]
        self.promoted, self.clock = key, now
        return key
