"""Which slots serve each prefix group and each model: the queued work placed as a whole, before any request.

Why a placement at all: the earliest-finish scheduler (`teamorch.policies.balancing`)
decides one request at a time. With long shared prompts, the request at the
head of the queue finishes soonest on whatever slot is free, so a fast server
takes a specialist it has never served, prefills its role prompt cold, and
the next request of the specialist it displaced pays the same again (prefix
thrash). With servers that hold one model, a server whose model still has
queued work switches to another and a load back follows. Each choice looks
right and the run pays many cold prefills and loads. The big routers bound
this with a balance rule around a cache-aware choice (SGLang's cache-aware
router and its balance thresholds, llm-d's prefix + load scorers); here the
whole queue is known, so its work is placed first:

* A **group** is a model plus the first prompt block (a specialist's role
  prompt), `GroupWork`: its queued requests' output tokens, their prompt
  tokens, and the prefix they all share (one cold prefill per slot).
* A **bin** is one slot of a server, or the whole server when it holds fewer
  models than the queue asks for (`Host.bound`): such a server serves one model
  at a time on all its slots, and switching costs a load.
* `place` finds the shortest makespan T at which every group fits (`_pack`,
  bisected over T): first each group on the bins that already hold it (its
  prefix cached, its model resident), shared so that they end together;
  then what is left of each group, largest first, on the bin that fits it most
  tightly, else the bin that does most of it, each new bin costing the
  group's cold prefill there (and a load where its model is not resident);
  a bin taken cold must fit one whole request. Work is in each server's
  measured seconds, so a hot group gets as many slots as its work needs and
  small groups share a slot one after the other.
* The plan is each slot's **lane**: the groups it serves, in order (what it
  holds first). The scheduler still picks, request by request, the slot where
  each finishes first, but only among the slots open to its group
  (`Assignment.slots`): a slot is open to the first group of its lane, and to
  the next once the one before has nothing left in the queue, so a slot
  serves its groups one after the other instead of alternating between them
  and a one-model server keeps its model while it has queued work. A slot
  with no lane, or whose lane is done, is open to any group: spare capacity
  is spilled into, never held back (the bounded-load rule, with the bound
  taken from the plan). A group with no lane on any server it may use goes
  anywhere (`Assignment.homeless`).

The plan is made again at every planning round from the queue and the
slots' contents, so it follows the servers' measured speeds as they are
learned; a server not measured yet gets no lanes (the balancer's caller
leaves it out). Groups whose cold start is cheap beside one of their requests
(a short role prompt, a resident model) or that have a single request are
not placed (`sticky`): spreading them costs nothing and the scheduler
balances them freely, as before.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# A group is placed only when one cold prefill (plus a load on a one-model server) costs at least this fraction of
# one of its requests: below it a second copy of the prefix is cheap and the scheduler spreads the group freely.
# The prefix benchmark's specialists cost 3-5 requests (a 500-word role prompt), its multi-model ones 3 (a load).
STICKY_FRACTION = 1.0
# The plan is packed with this much more time than the shortest makespan found: at the shortest, every group is
# split wherever a sliver fits, each piece a cold prefill; a little room keeps small groups whole on one slot.
SLACK = 0.05
# The makespan is bisected to this relative precision (the plan's own estimates are coarser).
PRECISION = 0.005
# A remainder of a group's work smaller than this fraction is rounding, not a reason to open another bin.
_EPS = 1e-9


@dataclass
class GroupWork:
    """The queued work of one group, summed in integers so any order of additions and removals gives the same plan.

    `shared`: the prompt tokens every queued request of the group shares (the
    deepest prefix block all of them hold, `share`): one cold prefill per bin
    that does not hold it; `own`: the rest of their prompts, prefilled by each request.
    """

    model: str
    count: int = 0
    tokens: int = 0  # expected output tokens
    prompt: int = 0  # prompt tokens
    chain: tuple[str, ...] = ()  # one request's prefix blocks (the group shares its first) and their token counts
    marks: tuple[int, ...] = ()
    shared: int = 0

    def add(self, tokens: int, prompt: int, chain: Sequence[str], marks: Sequence[int], sign: int = 1) -> None:
        self.count += sign
        self.tokens += sign * tokens
        self.prompt += sign * prompt
        if not self.chain:
            self.chain, self.marks = tuple(chain), tuple(marks)

    def share(self, holding: Callable[[str], int]) -> None:
        """Set `shared` from `holding` (queued requests holding a prefix block, the planner's prefix counts): the
        blocks of `chain` every request of the group holds."""
        k = 0
        while k < len(self.chain) and holding(self.chain[k]) >= self.count:
            k += 1
        self.shared = self.marks[k - 1] if k else 0

    @property
    def own(self) -> int:
        return max(0, self.prompt - self.count * self.shared)


@dataclass(frozen=True)
class Rate:
    """One server's cost model, per slot: seconds = fixed + per_token x output + prefill x uncached prompt."""

    fixed: float
    per_token: float
    prefill: float
    load: float

    def work(self, g: GroupWork) -> float:
        """Seconds of one slot to serve all of `g` warm (its shared block cached)."""
        return g.count * self.fixed + self.per_token * g.tokens + self.prefill * g.own


@dataclass(frozen=True)
class Host:
    """One server as placement sees it: per slot, seconds until it frees and the group its cache holds."""

    name: str
    rate: Rate
    slots: tuple[tuple[float, str | None], ...]
    models: tuple[str, ...] | None = None  # resident models (None: not known, assumed resident)
    bound: bool = False  # holds fewer models than the queue asks for: one bin for all its slots


Lane = tuple[str, ...]


@dataclass
class Assignment:
    """The plan: per (server, slot index in `Host.slots`) the groups it serves, in order; `placed`: the groups
    placed (any other may go anywhere); `horizon`: the plan's makespan, seconds from its start.

    Kept for one planning round (and the schedule the planner continues from
    it): `took` swaps the lanes of two empty slots when the server gives a
    request the other one, since empty slots are alike.
    """

    lanes: dict[tuple[str, int], Lane] = field(default_factory=dict)
    placed: frozenset[str] = frozenset()
    horizon: float = math.inf

    def slots(
        self, group: str, server: str, empty: Sequence[bool], left: Callable[[str], int]
    ) -> frozenset[int] | None:
        """The slots of `server` (`empty`: which hold no prompt) a request of `group` may take; None: any.

        A slot is open to a group when every group before it in the slot's lane
        has nothing left in the queue (`left`), so a slot serves its groups one
        after the other instead of alternating between them. A slot whose lane
        is done (or empty) is idle capacity, open to any group: the spill.
        """
        if group not in self.placed:
            return None
        ok = {i for i in range(len(empty)) if _open(group, self.lanes.get((server, i), ()), left)}
        if any(empty[i] for i in ok):
            ok.update(i for i, e in enumerate(empty) if e)
        return frozenset(ok)

    def took(self, group: str, server: str, slot: int, empty: Sequence[bool], left: Callable[[str], int]) -> None:
        """A request of `group` takes `slot`: if that slot is empty and not open to it, it swaps lanes with an
        empty slot that is (the server picks among empty slots by index, the plan does not care which)."""
        if group not in self.placed or not empty[slot] or _open(group, self.lanes.get((server, slot), ()), left):
            return
        for j, e in enumerate(empty):
            if e and j != slot and _open(group, self.lanes.get((server, j), ()), left):
                mine, theirs = self.lanes.get((server, slot), ()), self.lanes.get((server, j), ())
                self.lanes[(server, slot)], self.lanes[(server, j)] = theirs, mine
                return

    def homeless(self, group: str, servers: Iterable[str], width: Callable[[str], int]) -> bool:
        """Whether a placed `group` has no lane on any of `servers` (pinned elsewhere, say): then it goes anywhere."""
        return group in self.placed and not any(
            group in self.lanes.get((name, i), ()) for name in servers for i in range(width(name))
        )


def _open(group: str, lane: Lane, left: Callable[[str], int]) -> bool:
    for other in lane:
        if other == group:
            return True
        if left(other) > 0:
            return False
    return True


@dataclass(frozen=True)
class _Bin:
    """A slot, or a one-model server's slots together (`slots`), as placement packs it."""

    host: Host
    slots: tuple[int, ...]
    used: float  # seconds from now it is busy before any placed work
    holds: frozenset[str]  # groups whose prefix it has cached
    models: frozenset[str] | None  # models resident (None: not known, assumed resident)


def _bins(hosts: Sequence[Host]) -> list[_Bin]:
    out = []
    for h in hosts:
        models = frozenset(h.models) if h.models is not None else None
        if h.bound:
            used = sum(free for free, _ in h.slots) / len(h.slots)
            held = frozenset(g for _, g in h.slots if g is not None)
            out.append(_Bin(h, tuple(range(len(h.slots))), used, held, models))
        else:
            out += [_Bin(h, (i,), free, frozenset({g} if g else ()), models) for i, (free, g) in enumerate(h.slots)]
    return out


class _Table:
    """What every trial packing reads, computed once per `place`: per group and bin, the seconds the bin takes
    for all of the group's work, its cold prefill, its load, and whether the bin holds the group already."""

    def __init__(self, groups: Sequence[tuple[str, GroupWork]], free: GroupWork | None, bins: Sequence[_Bin]) -> None:
        self.groups, self.bins = groups, bins
        self.work = [[b.host.rate.work(g) / len(b.slots) or _EPS for b in bins] for _, g in groups]
        self.prefill = [[b.host.rate.prefill * g.shared for b in bins] for _, g in groups]
        self.warm = [
            [i for i, b in enumerate(bins) if key in b.holds or (b.host.bound and b.models and g.model in b.models)]
            for key, g in groups
        ]
        self.free = [b.host.rate.work(free) / len(b.slots) or _EPS for b in bins] if free is not None else None


class _Packing:
    """One trial packing at one makespan: each bin's busy time, what it holds, and its lane so far."""

    def __init__(self, table: _Table, makespan: float) -> None:
        self.t, self.makespan = table, makespan
        self.used = [b.used for b in table.bins]
        self.holds = [set(b.holds) for b in table.bins]
        self.models = [set(b.models) if b.models is not None else None for b in table.bins]
        self.lanes: dict[int, list[str]] = {}

    def cold(self, gi: int, i: int) -> float:
        key, g = self.t.groups[gi]
        if key in self.holds[i]:
            return 0.0
        models = self.models[i]
        load = self.t.bins[i].host.rate.load if models is not None and g.model not in models else 0.0
        return load + self.t.prefill[gi][i]

    def doable(self, gi: int, i: int, until: float) -> float:
        """The fraction of group `gi`'s work bin `i` can still do by `until`."""
        return max(0.0, until - self.used[i] - self.cold(gi, i)) / self.t.work[gi][i]

    def take(self, gi: int, i: int, fraction: float) -> None:
        key, g = self.t.groups[gi]
        self.used[i] += self.cold(gi, i) + fraction * self.t.work[gi][i]
        self.holds[i].add(key)
        models = self.models[i]
        if models is not None:
            models.add(g.model)
        self.lanes.setdefault(i, []).append(key)


def sticky(g: GroupWork, rate: Rate, bound: bool, held: bool = False) -> bool:
    """Whether a cold start of `g` (prefill of its shared block, a load on a one-model server) costs at least
    STICKY_FRACTION of one of its requests on a server of `rate`: only then is it worth keeping together.

    `held`: a slot holds its prefix. A lone request has nothing to be kept
    together with, unless a slot holds its prefix: then which of those slots it
    takes is placed like any work (`_fewest_warm`), or it takes the fastest
    and a group placed there waits or goes cold elsewhere (prefix fleet B).
    """
    if g.count < 1 or (g.count < 2 and not held):
        return False
    cold = rate.prefill * g.shared + (rate.load if bound else 0.0)
    per_request = rate.work(g) / g.count
    return per_request <= 0.0 or cold >= STICKY_FRACTION * per_request


def median_host(hosts: Sequence[Host]) -> Host:
    """The server of median speed, which `sticky` is judged on."""
    return sorted(hosts, key=lambda h: (h.rate.per_token, h.name))[len(hosts) // 2]


Lanes = dict[tuple[str, int], Lane]


def _cold_pieces(p: _Packing, gi: int, left: float) -> bool:
    """Place the `left` fraction of group `gi` on bins that do not hold it; False when it does not fit.

    Best fit: the bin left fullest among those that take the whole rest (the
    big empty ones stay for the work that needs them), else the one doing most,
    and again with what remains. (First fit, worst fit and least-cold-cost fit
    were tried on the prefix benchmark's fleets: best fit found the shortest
    makespan in 190 of 197 plans.) A bin taken cold must fit one whole request
    at least: a fraction of one is not a request. Taking a bin changes no other
    bin's room for this group, so the bins are sorted once, most room first.
    """
    count = p.t.groups[gi][1].count
    room = sorted((d, i) for i in range(len(p.t.bins)) if (d := p.doable(gi, i, p.makespan)) > _EPS)
    room.reverse()
    while left > _EPS:
        least = min(left, 1.0 / count) - _EPS
        if not room or room[0][0] <= least:
            return False
        fits = bisect.bisect_left([-d for d, _ in room], -left + _EPS)  # room[:fits] hold all that is left
        part, i = room.pop(fits - 1 if fits else 0)
        part = min(left, part)
        p.take(gi, i, part)
        left -= part
    return True


def _pack(table: _Table, makespan: float) -> Lanes | None:
    """Each slot's lane when every group fits in `makespan` by the greedy of the module docstring; None: no fit.

    Two passes: first every group takes the bins that hold it (no cold cost),
    then each places the rest of its work on other bins. A bin holding one
    group is never taken cold by another while its own group still needs it.
    """
    p = _Packing(table, makespan)
    left = [1.0] * len(table.groups)
    for gi, all_warm in enumerate(table.warm):
        warm = _fewest_warm(p, gi, all_warm)
        until = min(makespan, _fill(p, gi, warm))
        for i in warm:
            part = p.doable(gi, i, until)
            if part > 0.0:
                p.take(gi, i, part)
                left[gi] -= part
    for gi in range(len(table.groups)):
        if left[gi] > _EPS and not _cold_pieces(p, gi, left[gi]):
            return None
    free = table.free  # the groups not placed go anywhere: the capacity left must hold them
    if free is not None and sum(max(0.0, makespan - used) / w for used, w in zip(p.used, free, strict=True)) < 1.0:
        return None
    return {(table.bins[i].host.name, slot): tuple(lane) for i, lane in p.lanes.items() for slot in table.bins[i].slots}


def _fewest_warm(p: _Packing, gi: int, warm: Sequence[int]) -> Sequence[int]:
    """Of the bins holding group `gi`, as many as it has requests, when it has fewer: those left fullest by one of
    its requests (best fit, as `_cold_pieces`), if that many can do one by the makespan; else all of them.

    Why: shared over more warm bins than it has requests, a group's last
    request is split (on paper) over all of them, most of it on the fastest,
    which then looks busy with it; the request goes there and a group that
    needs that fast slot cold waits or goes to a slow one. Prefix fleet B: a
    specialist's last request took the 2x slot (done sooner than on its warm
    0.5x slot) and the last one of another paid its cold prefill there after
    it, ending the run; on the 0.5x slot it would have ended as early as that
    cold prefill, started at once on the 2x slot.
    """
    count = p.t.groups[gi][1].count
    if len(warm) <= count:
        return warm
    room = sorted((p.makespan - p.used[i] - p.t.work[gi][i] / count, i) for i in warm)
    fits = [i for r, i in room if r >= 0.0]
    return fits[:count] if len(fits) >= count else warm


def _fill(p: _Packing, gi: int, warm: Sequence[int]) -> float:
    """When all of group `gi` is done if the bins holding it (`warm`) share it so that they all end together.

    Why not fill them one by one: every bin holding the group is where its
    requests go anyway (each finishes soonest there), and a bin emptied of it
    only invites another group's cold prefill there.
    """
    if not warm:
        return 0.0
    starts = sorted((p.used[i], 1.0 / p.t.work[gi][i]) for i in warm)  # (busy until, fraction per second)
    done, rate, t = 0.0, 0.0, starts[0][0]
    for k, (used, speed) in enumerate(starts):
        if k and rate > 0.0 and done + rate * (used - t) >= 1.0:
            break
        done += rate * (used - t)
        t, rate = used, rate + speed
    return t + (1.0 - done) / rate if rate > 0.0 else math.inf


def _merged(groups: Iterable[GroupWork]) -> GroupWork | None:
    total: GroupWork | None = None
    for g in groups:
        total = total or GroupWork(g.model)
        total.count += g.count
        total.tokens += g.tokens
        total.prompt += g.prompt
    return total


def place(groups: Mapping[str, GroupWork], hosts: Sequence[Host]) -> Assignment:
    """Place the queued groups on `hosts` for the shortest makespan the greedy finds (module docstring)."""
    hosts = [h for h in hosts if h.slots]
    if not hosts:
        return Assignment()
    mid = median_host(hosts)
    held = {g for h in hosts for _, g in h.slots if g is not None}
    placed = sorted(
        ((k, g) for k, g in groups.items() if sticky(g, mid.rate, mid.bound, k in held)),
        key=lambda kg: (-statistics.median(h.rate.work(kg[1]) for h in hosts), kg[0]),
    )
    if not placed:
        return Assignment()
    keys = {k for k, _ in placed}
    table = _Table(placed, _merged(g for k, g in groups.items() if g.count > 0 and k not in keys), _bins(hosts))
    # Start from the work spread evenly over every bin (no schedule is much shorter) and grow by half until the
    # greedy packs it; then bisect between the last miss and the first fit.
    n = len(table.bins)
    high = sum(b.used for b in table.bins) / n + sum(min(w) for w in table.work) / n
    high += min(table.free) / n if table.free is not None else 0.0
    low, lanes = 0.0, None
    while lanes is None:
        low, high = high, high * 1.5
        lanes = _pack(table, high)
    while high - low > PRECISION * high:  # feasibility grows with the makespan (near enough for a greedy): bisect
        mid = (low + high) / 2
        trial = _pack(table, mid)
        if trial is None:
            low = mid
        else:
            high, lanes = mid, trial
    roomier = _pack(table, high * (1.0 + SLACK))
    return Assignment(roomier or lanes, frozenset(keys), high)
