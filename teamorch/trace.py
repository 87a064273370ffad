"""Pictures of a run: a Chrome/Perfetto trace and a Gantt timeline (HTML, or PNG with matplotlib).

Both are drawn from a `RunReport` alone (plus, when known, the plan for the
critical path and the servers' slot counts), so any finished run can be
pictured later: from `teamorch run --json` output or from its journal. Every
picture answers the same questions: which server slot ran what and when, how
long each task waited for a slot, where a slot sat idle while work was
queued, and which chain of dependent tasks set the wall time.

Attempts carry only a server name, not a slot number, so slots are
reconstructed by interval packing: the balancer never gives a server more than
`slots` concurrent requests, hence the packing never needs more lanes than
slots. If it does (clock skew between nodes, or a `slots` that does not match
the server), the extra lanes are drawn and flagged rather than an attempt
being hidden. Pure Python: no Ray, no network, no JavaScript in the page.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from teamorch.errors import ConfigError, TeamorchError
from teamorch.journal import EVENTS_FILE, RunJournal
from teamorch.messages import OrchestrationPlan, RunReport, Synthesis, TaskResult
from teamorch.policies.synthesis import compute_statistics

NO_SERVER = "(no server)"  # attempts whose server is unknown still get drawn, never dropped
Style = Literal["ok", "failed", "cancelled"]
WaitKind = Literal["queue", "retry", "unserved"]

# ---- layout: the one model of a run that every picture draws ------------------------------------


@dataclass(frozen=True)
class Bar:
    """One attempt on one server slot lane; times are seconds from the run's start."""

    task_id: str
    specialist: str
    server: str
    attempt: int  # 1-based, within the task
    start: float
    end: float
    outcome: str
    error: str | None
    tokens: int | None  # the task's tokens, on its final attempt only
    lane: int  # 0-based slot lane on the server
    over_slots: bool  # the lane is beyond the server's configured slots
    critical: bool

    @property
    def style(self) -> Style:
        # A cancelled attempt lost a race on purpose (hedging) or was stopped by the user: not a server failure.
        return "ok" if self.outcome == "ok" else "cancelled" if self.outcome == "cancelled" else "failed"


@dataclass(frozen=True)
class Wait:
    """Time a task spent off every server: queued for its first slot, between retries, or never served."""

    task_id: str
    kind: WaitKind
    start: float
    end: float


@dataclass(frozen=True)
class Gap:
    """A slot lane idle between two attempts; during `queued` (sub-intervals) some task was waiting to run."""

    start: float
    end: float
    queued: tuple[tuple[float, float], ...] = ()

    @property
    def queued_seconds(self) -> float:
        return sum(end - start for start, end in self.queued)


@dataclass
class Layout:
    origin: float  # epoch seconds of the run's first timestamp
    end: float  # seconds from origin to the last timestamp
    bars: dict[str, list[Bar]] = field(default_factory=dict)  # server -> bars, by start
    lanes: dict[str, int] = field(default_factory=dict)  # server -> lanes drawn
    waits: list[Wait] = field(default_factory=list)
    critical: list[str] = field(default_factory=list)


def assign_lanes(intervals: Sequence[tuple[float, float]]) -> list[int]:
    """A lane per interval such that intervals in one lane never overlap, using as few lanes as possible.

    Greedy by start time, reusing the lowest free lane: optimal for intervals
    (the lane count equals the peak overlap), and lowest-first keeps slot 1 the
    busiest row, as people read a Gantt chart. Touching intervals share a lane.
    """
    lanes: list[int] = [0] * len(intervals)
    lane_end: list[float] = []
    for index in sorted(range(len(intervals)), key=lambda i: (intervals[i][0], intervals[i][1])):
        start, end = intervals[index]
        free = next((n for n, busy_until in enumerate(lane_end) if busy_until <= start), None)
        if free is None:
            free = len(lane_end)
            lane_end.append(end)
        lane_end[free] = end
        lanes[index] = free
    return lanes


def _merge(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def idle_gaps(intervals: Sequence[tuple[float, float]], queued: Sequence[tuple[float, float]] = ()) -> list[Gap]:
    """The gaps between consecutive busy intervals of one lane, each with how long work was queued meanwhile.

    A lane idle while a task waited for a slot is capacity the balancer left
    unused (or a model the server lacks); idle with nothing queued is only a
    dependency wait, which no scheduler can fill.
    """
    waiting = _merge(queued)
    gaps: list[Gap] = []
    busy_until: float | None = None
    for start, end in sorted(intervals):
        if busy_until is not None and start > busy_until:
            inside = [(max(a, busy_until), min(b, start)) for a, b in waiting]
            gaps.append(Gap(busy_until, start, tuple((a, b) for a, b in inside if b > a)))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def critical_path(report: RunReport, plan: OrchestrationPlan | None = None) -> list[str]:
    """The chain of tasks that set the wall time, first to last.

    It ends at the last task to finish; each step back is the dependency that
    finished last, since that is the one the task was waiting for. Without the
    plan's edges the chain is the last-finishing task alone.
    """
    ended = {r.task_id: r.ended_at for r in report.tasks if r.ended_at is not None}
    if not ended:
        return []
    depends = {t.task_id: t.depends_on for t in plan.tasks} if plan is not None else {}
    chain = [max(ended, key=lambda task_id: ended[task_id])]
    while deps := [d for d in depends.get(chain[-1], []) if d in ended and d not in chain]:
        chain.append(max(deps, key=lambda task_id: ended[task_id]))
    return chain[::-1]


def _waits(result: TaskResult, origin: float) -> list[Wait]:
    """Where a task was off-server: before its first attempt, between attempts, or throughout if never served."""
    if result.started_at is None:
        return []
    if not result.attempts:
        end = result.ended_at if result.ended_at is not None else result.started_at
        return [Wait(result.task_id, "unserved", result.started_at - origin, end - origin)]
    first = min(result.attempts, key=lambda a: a.started_at)
    waits = [
        Wait(result.task_id, "queue", result.started_at - origin, max(result.started_at, first.started_at) - origin)
    ]
    ordered = sorted(result.attempts, key=lambda a: a.started_at)
    waits += [
        Wait(result.task_id, "retry", before.ended_at - origin, after.started_at - origin)
        for before, after in itertools.pairwise(ordered)
        if after.started_at > before.ended_at
    ]
    return waits


def _first_and_last(tasks: Sequence[TaskResult]) -> tuple[float, float]:
    """The run's first and last timestamps (epoch): the report keeps no start time of its own."""
    stamps = [t for r in tasks for t in (r.started_at, r.ended_at) if t is not None]
    stamps += [t for r in tasks for a in r.attempts for t in (a.started_at, a.ended_at)]
    return (min(stamps), max(stamps)) if stamps else (0.0, 0.0)


def layout(report: RunReport, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None) -> Layout:
    """Every attempt placed on a slot lane of its server, every wait, and the critical path."""
    origin, last = _first_and_last(report.tasks)
    out = Layout(origin=origin, end=last - origin, critical=critical_path(report, plan))
    per_server: dict[str, list[tuple[TaskResult, int]]] = {}
    for result in report.tasks:
        for number, attempt in enumerate(result.attempts):
            per_server.setdefault(attempt.server or NO_SERVER, []).append((result, number))
        out.waits += _waits(result, origin)
    for server in sorted(set(per_server) | set(slots or {})):  # a configured server left unused shows as empty
        entries = per_server.get(server, [])
        attempts = [r.attempts[n] for r, n in entries]
        lanes = assign_lanes([(a.started_at, a.ended_at) for a in attempts])
        allowed = (slots or {}).get(server)
        bars = [
            Bar(
                task_id=result.task_id,
                specialist=result.specialist,
                server=server,
                attempt=number + 1,
                start=attempt.started_at - origin,
                end=attempt.ended_at - origin,
                outcome=attempt.outcome,
                error=attempt.error,
                tokens=result.tokens if number == len(result.attempts) - 1 else None,
                lane=lane,
                over_slots=allowed is not None and lane >= allowed,
                critical=result.task_id in out.critical,
            )
            for (result, number), attempt, lane in zip(entries, attempts, lanes, strict=True)
        ]
        out.bars[server] = sorted(bars, key=lambda b: (b.start, b.lane))
        out.lanes[server] = max(max(lanes, default=-1) + 1, allowed or 0)
    return out


def _lane_gaps(lay: Layout, server: str) -> dict[int, list[Gap]]:
    queued = [(w.start, w.end) for w in lay.waits]
    return {
        lane: idle_gaps([(b.start, b.end) for b in lay.bars[server] if b.lane == lane], queued)
        for lane in range(lay.lanes[server])
    }


def _utilization(report: RunReport, lay: Layout, server: str) -> float:
    """The report's own figure (busy fraction of the wall time) when it has one, else measured from the bars."""
    if server in report.statistics.server_utilization:
        return report.statistics.server_utilization[server]
    busy = sum(end - start for start, end in _merge([(b.start, b.end) for b in lay.bars[server]]))
    wall = report.duration or lay.end
    return min(1.0, busy / wall) if wall > 0 else 0.0


# ---- Chrome / Perfetto trace ---------------------------------------------------------------------


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def _meta(name: str, pid: int, tid: int | None, value: str | int) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    event: dict[str, Any] = {"name": name, "ph": "M", "pid": pid, "args": {key: value}}
    if tid is not None:
        event["tid"] = tid
    return event


def _attempt_event(bar: Bar, pid: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "specialist": bar.specialist,
        "attempt": bar.attempt,
        "outcome": bar.outcome,
        "error": bar.error,
        "critical_path": bar.critical,
    }
    if bar.tokens is not None:
        args["tokens"] = bar.tokens
    if bar.over_slots:
        args["over_slots"] = "more attempts overlapped on this server than its configured slots"
    categories = ["attempt", *([] if bar.style == "ok" else [bar.style]), *(["critical"] if bar.critical else [])]
    event = {
        "name": bar.task_id if bar.style == "ok" else f"{bar.task_id} [{bar.outcome}]",
        "cat": ",".join(categories),
        "ph": "X",
        "ts": _us(bar.start),
        "dur": _us(bar.end - bar.start),
        "pid": pid,
        "tid": bar.lane + 1,
        "args": args,
    }
    if bar.style != "ok":
        event["cname"] = "terrible" if bar.style == "failed" else "grey"  # chrome://tracing's reserved colours
    return event


def chrome_trace(
    report: RunReport, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The run as a Chrome trace (JSON object format): open it in ui.perfetto.dev or chrome://tracing.

    One process per server with one thread per slot lane, one complete span per
    attempt, and a "queue" process with one thread per task showing when it
    waited for a slot. Times are microseconds from the run's first timestamp.
    """
    lay = layout(report, plan, slots)
    events: list[dict[str, Any]] = []
    for pid, server in enumerate(lay.bars, start=1):
        events += [_meta("process_name", pid, None, f"server {server}"), _meta("process_sort_index", pid, None, pid)]
        allowed = (slots or {}).get(server)
        for lane in range(lay.lanes[server]):
            over = f" (over {allowed} configured)" if allowed is not None and lane >= allowed else ""
            events.append(_meta("thread_name", pid, lane + 1, f"slot {lane + 1}{over}"))
            events.append(_meta("thread_sort_index", pid, lane + 1, lane + 1))
        events += [_attempt_event(bar, pid) for bar in lay.bars[server]]
    queue_pid = len(lay.bars) + 1
    events += [_meta("process_name", queue_pid, None, "queue"), _meta("process_sort_index", queue_pid, None, queue_pid)]
    tids = {task_id: n for n, task_id in enumerate(dict.fromkeys(w.task_id for w in lay.waits), start=1)}
    events += [_meta("thread_name", queue_pid, tid, task_id) for task_id, tid in tids.items()]
    events += [
        {
            "name": w.task_id if w.kind == "queue" else f"{w.task_id} [{w.kind}]",
            "cat": "queue" if w.kind == "queue" else f"queue,{w.kind}",
            "ph": "X",
            "ts": _us(w.start),
            "dur": _us(w.end - w.start),
            "pid": queue_pid,
            "tid": tids[w.task_id],
            "args": {"kind": w.kind, "seconds": round(w.end - w.start, 3)},
        }
        for w in lay.waits
    ]
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "run_id": report.run_id,
            "pattern": report.pattern or "plan",
            "success": report.success,
            "wall_seconds": round(report.duration, 3),
            "critical_path": lay.critical,
        },
    }


# ---- HTML timeline -------------------------------------------------------------------------------

LABEL_W, PLOT_W, ROW_H, BAR_H, AXIS_H, CHAR_W = 170, 1000, 28, 20, 24, 7.0
COLOURS = {"ok": "#3b82f6", "failed": "#dc2626", "cancelled": "#a1a1aa", "queue": "#94a3b8", "retry": "#f59e0b"}
CRITICAL_STROKE = "#111827"
_DEFS = """<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>
<pattern id="idle" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#f3f4f6"/><line x1="0" y1="0" x2="0" y2="6" stroke="#d1d5db" stroke-width="3"/></pattern>
<pattern id="idle-queued" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#ffedd5"/><line x1="0" y1="0" x2="0" y2="6" stroke="#fb923c" stroke-width="3"/></pattern>
</defs></svg>"""
_CSS = """body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#111827;margin:24px;max-width:1240px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 2px}.sub{color:#4b5563;margin:0 0 6px}
.legend span{display:inline-block;margin-right:16px}.sw{display:inline-block;width:22px;height:12px;
vertical-align:-1px;margin-right:5px;border-radius:2px}svg text{font:12px system-ui,sans-serif}
table{border-collapse:collapse;margin-top:8px}td,th{padding:3px 10px;border-bottom:1px solid #e5e7eb;text-align:left}
td.n,th.n{text-align:right}.bad{color:#dc2626;font-weight:600}.good{color:#15803d;font-weight:600}"""


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds >= 10 else f"{seconds:.2f}s"


def _tick_step(span: float) -> float:
    """A 1-2-5 step giving about eight ticks over `span` seconds."""
    raw = max(span, 1e-6) / 8
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


class _Chart:
    """One SVG with rows sharing the run's time axis, so every chart on the page lines up."""

    def __init__(self, end: float, rows: int) -> None:
        self.scale = PLOT_W / max(end, 1e-6)
        self.end = end
        self.height = AXIS_H + rows * ROW_H + 4
        self.parts: list[str] = []

    def x(self, seconds: float) -> float:
        return LABEL_W + seconds * self.scale

    def row_label(self, row: int, text: str) -> None:
        y = AXIS_H + row * ROW_H + ROW_H / 2 + 4
        self.parts.append(
            f'<text x="{LABEL_W - 8}" y="{y:.1f}" text-anchor="end">{html.escape(_fit(text, LABEL_W - 12))}</text>'
        )
        self.parts.append(
            f'<line x1="{LABEL_W}" x2="{LABEL_W + PLOT_W}" y1="{AXIS_H + (row + 1) * ROW_H}" '
            f'y2="{AXIS_H + (row + 1) * ROW_H}" stroke="#f3f4f6"/>'
        )

    def rect(
        self,
        row: int,
        start: float,
        end: float,
        attrs: str,
        title: str,
        label: str = "",
        ink: str = "#fff",
        overlays: Sequence[tuple[float, float, str]] = (),
    ) -> None:
        """A bar with a tooltip and a label cut to fit; `overlays` (start, end, attrs) lie on it, under the label."""
        y = AXIS_H + row * ROW_H + (ROW_H - BAR_H) / 2
        shapes = [
            f'<rect x="{self.x(a):.1f}" y="{y:.1f}" width="{max((b - a) * self.scale, 0.0):.1f}" height="{BAR_H}" {at}/>'
            for a, b, at in [(start, end, attrs), *overlays]
        ]
        text = _fit(label, (end - start) * self.scale - 6)
        if text:
            x = self.x(start) + 3
            shapes.append(f'<text x="{x:.1f}" y="{y + BAR_H / 2 + 4:.1f}" fill="{ink}">{html.escape(text)}</text>')
        self.parts.append(f"<g><title>{html.escape(title)}</title>{''.join(shapes)}</g>")

    def svg(self) -> str:
        step = _tick_step(self.end)
        ticks = [
            f'<line x1="{self.x(t):.1f}" x2="{self.x(t):.1f}" y1="{AXIS_H - 4}" y2="{self.height}" stroke="#e5e7eb"/>'
            f'<text x="{self.x(t):.1f}" y="{AXIS_H - 8}" text-anchor="middle" fill="#6b7280">{t:g}s</text>'
            for t in (round(n * step, 6) for n in range(int(self.end / step) + 1))
        ]
        width = LABEL_W + PLOT_W + 20
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{self.height}" '
            f'viewBox="0 0 {width} {self.height}">{"".join(ticks)}{"".join(self.parts)}</svg>'
        )


def _fit(text: str, width: float) -> str:
    """`text` cut with an ellipsis to what fits in `width` pixels (an estimate: no font metrics without JS)."""
    room = int(width / CHAR_W)
    if room < 3:
        return ""
    return text if len(text) <= room else text[: room - 1] + "…"


def _bar_title(bar: Bar) -> str:
    lines = [
        f"{bar.task_id} — {bar.specialist}",
        f"server {bar.server}, slot {bar.lane + 1}, attempt {bar.attempt}",
        f"{_fmt(bar.start)} → {_fmt(bar.end)} ({_fmt(bar.end - bar.start)})",
        f"outcome: {bar.outcome}" + (" — on the critical path" if bar.critical else ""),
    ]
    lines += [f"error: {bar.error}"] if bar.error else []
    lines += [f"tokens: {bar.tokens}"] if bar.tokens is not None else []
    lines += ["beyond the server's configured slots (overlap in the recorded times)"] if bar.over_slots else []
    return "\n".join(lines)


def _server_section(report: RunReport, lay: Layout, server: str, slots: Mapping[str, int] | None) -> str:
    chart = _Chart(lay.end, lay.lanes[server])
    gaps = _lane_gaps(lay, server)
    allowed = (slots or {}).get(server)
    for lane in range(lay.lanes[server]):
        chart.row_label(lane, f"slot {lane + 1}" + (" (over)" if allowed is not None and lane >= allowed else ""))
        for gap in gaps[lane]:
            why = f", {_fmt(gap.queued_seconds)} of it with work queued" if gap.queued else ", nothing queued"
            idle = f"idle {_fmt(gap.end - gap.start)}"
            # Only the part of the gap when work was waiting is capacity left unused: that part is orange.
            queued = [(a, b, 'class="gap-queued" fill="url(#idle-queued)"') for a, b in gap.queued]
            chart.rect(lane, gap.start, gap.end, 'class="gap" fill="url(#idle)"', idle + why, idle, "#374151", queued)
    for bar in lay.bars[server]:
        stroke = f' stroke="{CRITICAL_STROKE}" stroke-width="3"' if bar.critical else ""
        attrs = (
            f'class="attempt {bar.style}{" critical" if bar.critical else ""}" data-task="{html.escape(bar.task_id)}" '
            f'fill="{COLOURS[bar.style]}" rx="3"{stroke}'
        )
        label = bar.task_id if bar.style == "ok" else f"✗ {bar.task_id} ({bar.outcome})"
        chart.rect(bar.lane, bar.start, bar.end, attrs, _bar_title(bar), label)
    idle = sum(g.end - g.start for lane_gaps in gaps.values() for g in lane_gaps)
    queued_idle = sum(g.queued_seconds for lane_gaps in gaps.values() for g in lane_gaps)
    failed = sum(1 for b in lay.bars[server] if b.style == "failed")
    summary = (
        f"utilization {_utilization(report, lay, server):.0%} of the wall time · "
        f"{allowed if allowed is not None else lay.lanes[server]} slot(s) · {len(lay.bars[server])} attempt(s)"
        f"{f', {failed} failed' if failed else ''} · idle between attempts {_fmt(idle)}"
        f" ({_fmt(queued_idle)} while work was queued)"
    )
    return f"<h2>server {html.escape(server)}</h2><p class=sub>{summary}</p>{chart.svg()}"


def _queue_section(lay: Layout) -> str:
    tasks = list(dict.fromkeys(w.task_id for w in lay.waits))
    if not tasks:
        return ""
    chart = _Chart(lay.end, len(tasks))
    for row, task_id in enumerate(tasks):
        chart.row_label(row, task_id)
    for w in lay.waits:
        what = {"queue": "waited for a slot", "retry": "between attempts (backoff + queue)", "unserved": "never served"}
        colour = COLOURS["retry"] if w.kind == "retry" else COLOURS["queue"]
        title = f"{w.task_id} {what[w.kind]}: {_fmt(w.end - w.start)}"
        attrs = f'class="wait {w.kind}" fill="{colour}" rx="3"'
        chart.rect(tasks.index(w.task_id), w.start, w.end, attrs, title, _fmt(w.end - w.start))
    return (
        "<h2>waiting for a slot</h2><p class=sub>per task: from its dispatch to its first attempt, "
        f"and between retries</p>{chart.svg()}"
    )


def _legend() -> str:
    items = [
        (f"background:{COLOURS['ok']}", "attempt"),
        (f"background:{COLOURS['failed']}", "failed attempt"),
        (f"background:{COLOURS['cancelled']}", "cancelled attempt"),
        (f"background:{COLOURS['ok']};outline:3px solid {CRITICAL_STROKE};outline-offset:-3px", "critical path"),
        ("background:repeating-linear-gradient(45deg,#f3f4f6 0 3px,#d1d5db 3px 6px)", "slot idle"),
        ("background:repeating-linear-gradient(45deg,#ffedd5 0 3px,#fb923c 3px 6px)", "slot idle, work queued"),
        (f"background:{COLOURS['queue']}", "queue wait"),
        (f"background:{COLOURS['retry']}", "retry wait"),
    ]
    return "<p class=legend>" + "".join(f'<span><i class=sw style="{s}"></i>{t}</span>' for s, t in items) + "</p>"


def _task_table(report: RunReport, lay: Layout) -> str:
    rows = []
    for r in report.tasks:
        queued = sum(w.end - w.start for w in lay.waits if w.task_id == r.task_id)
        status = f'<span class="{"good" if r.status == "succeeded" else "bad"}">{r.status}</span>'
        cells = [html.escape(r.task_id), html.escape(r.specialist), html.escape(r.server or "-"), status]
        cells += [f"{queued:.2f}", f"{r.duration:.2f}", str(len(r.attempts)), str(r.tokens)]
        cells.append("●" if r.task_id in lay.critical else "")
        rows.append("<tr>" + "".join(f"<td{' class=n' if 4 <= i <= 7 else ''}>{c}</td>" for i, c in enumerate(cells)))
    head = ["task", "specialist", "server", "status", "waited s", "on server s", "attempts", "tokens", "critical"]
    header = "".join(f"<th{' class=n' if 4 <= i <= 7 else ''}>{h}</th>" for i, h in enumerate(head))
    return f"<h2>tasks</h2><table><tr>{header}</tr>{''.join(rows)}</table>"


def timeline_html(
    report: RunReport, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None
) -> str:
    """A self-contained page (inline SVG, no scripts, no network): a Gantt chart per server, slot lanes as
    rows, idle gaps shaded, the critical path outlined, queue waits per task, and a task table."""
    lay = layout(report, plan, slots)
    verdict = '<span class="good">succeeded</span>' if report.success else '<span class="bad">failed</span>'
    stats = report.statistics
    path = " → ".join(lay.critical) or "-"
    chain = [r for r in report.tasks if r.task_id in lay.critical]
    starts = [r.started_at for r in chain if r.started_at is not None]
    ends = [r.ended_at for r in chain if r.ended_at is not None]
    span = f" ({_fmt(max(ends) - min(starts))})" if starts and ends else ""
    header = (
        f"<h1>Run {html.escape(report.run_id)}</h1>"
        f"<p class=sub>{html.escape(report.pattern or 'plan')} ({html.escape(report.plan_source)}) · {verdict} · "
        f"wall time {_fmt(report.duration)} · {stats.successful_tasks}/{stats.total_tasks} tasks succeeded · "
        f"{stats.tokens} tokens · parallel efficiency {stats.parallel_efficiency:.2f}x</p>"
        f"<p class=sub>{html.escape(_fit(' '.join(report.problem.split()), 1400))}</p>"
        f"<p><b>critical path:</b> {html.escape(path)}{span}"
        + ("" if plan is not None else " <i>(plan unknown: the last task to finish)</i>")
        + (f'</p><p class="bad">error: {html.escape(report.error)}' if report.error else "")
        + "</p>"
    )
    body = "".join(_server_section(report, lay, server, slots) for server in lay.bars)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>teamorch run {html.escape(report.run_id)}</title><style>{_CSS}</style></head><body>"
        f"{_DEFS}{header}{_legend()}{body or '<p>No attempt reached a server.</p>'}"
        f"{_queue_section(lay)}{_task_table(report, lay)}</body></html>\n"
    )


# ---- PNG (optional: matplotlib) ------------------------------------------------------------------


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TeamorchError(
            "a PNG timeline needs matplotlib: pip install matplotlib (or pip install 'teamorch[viz]'); "
            "an .html timeline needs nothing extra"
        ) from None
    return Figure


def timeline_png(
    report: RunReport, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None
) -> bytes:
    """The same Gantt chart as a PNG (for READMEs and chat), drawn with matplotlib when it is installed."""
    figure_cls = _matplotlib()
    lay = layout(report, plan, slots)
    rows = [(server, lane) for server in lay.bars for lane in range(lay.lanes[server])]
    fig = figure_cls(figsize=(12, 1.2 + 0.45 * max(len(rows), 1)), dpi=120)
    ax = fig.add_subplot()
    for y, (server, lane) in enumerate(rows):
        for gap in _lane_gaps(lay, server)[lane]:
            extent = [(gap.start, gap.end - gap.start)]
            ax.broken_barh(extent, (y - 0.35, 0.7), facecolor="none", edgecolor="#d1d5db", hatch="///", linewidth=0)
            queued = [(start, end - start) for start, end in gap.queued]
            ax.broken_barh(queued, (y - 0.35, 0.7), facecolor="none", edgecolor="#fb923c", hatch="///", linewidth=0)
        for bar in (b for b in lay.bars[server] if b.lane == lane):
            edge = (CRITICAL_STROKE, 2.5) if bar.critical else ("white", 0.5)
            extent = [(bar.start, bar.end - bar.start)]
            ax.broken_barh(extent, (y - 0.35, 0.7), facecolor=COLOURS[bar.style], edgecolor=edge[0], linewidth=edge[1])
            ax.text(bar.start + 0.01 * lay.end, y, bar.task_id, va="center", fontsize=8, color="white", clip_on=True)
    ax.set_yticks(range(len(rows)), [f"{server} / slot {lane + 1}" for server, lane in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(lay.end, 1e-6))
    ax.set_xlabel("seconds from the run's start")
    ax.grid(axis="x", color="#e5e7eb")
    ax.set_axisbelow(True)
    ax.set_title(
        f"run {report.run_id} · {report.pattern or 'plan'} · wall {_fmt(report.duration)} · "
        f"critical path: {' → '.join(lay.critical) or '-'}",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---- files: what the CLI calls --------------------------------------------------------------------


def write_trace(
    report: RunReport, path: str | Path, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None
) -> None:
    Path(path).write_text(json.dumps(chrome_trace(report, plan, slots)) + "\n", encoding="utf-8")


def write_timeline(
    report: RunReport, path: str | Path, plan: OrchestrationPlan | None = None, slots: Mapping[str, int] | None = None
) -> None:
    """`.html` (self-contained) or `.png` (needs matplotlib), chosen by the file's suffix."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in (".html", ".htm"):
        target.write_text(timeline_html(report, plan, slots), encoding="utf-8")
    elif suffix == ".png":
        target.write_bytes(timeline_png(report, plan, slots))
    else:
        raise ConfigError(
            f"cannot draw a timeline as {suffix or 'a file without suffix'}: use .html or .png", field="-o"
        )


def _report_from_file(path: Path) -> RunReport:
    """A `teamorch run --json` file: a full report, or the finished tasks an interrupted run kept."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"not a readable JSON report: {exc}", file=str(path)) from None
    try:
        if isinstance(payload, dict) and "synthesis" not in payload and "tasks" in payload:
            tasks = [TaskResult.model_validate(t) for t in payload["tasks"]]
            start, end = _first_and_last(tasks)
            return RunReport(
                run_id=path.stem,
                problem="(interrupted run: only its finished tasks were written)",
                success=False,
                duration=end - start,
                tasks=tasks,
                synthesis=Synthesis(strategy="-"),
                statistics=compute_statistics(tasks, end - start),
                error=payload.get("error"),
            )
        return RunReport.model_validate(payload)  # a RunReport, or a report rebuilt from a journal
    except ValidationError as exc:
        raise ConfigError(f"not a teamorch run report: {exc.errors()[0]['msg']}", file=str(path)) from None


def _journal_dir(path_or_run_id: str, runs_dir: Path) -> Path | None:
    """The run directory named by a run id in `runs_dir`, a run directory, or its events file."""
    candidate = Path(path_or_run_id).expanduser()
    if candidate.name == EVENTS_FILE:
        candidate = candidate.parent
    return next((d for d in (Path(runs_dir) / path_or_run_id, candidate) if (d / EVENTS_FILE).is_file()), None)


def load_run_for_timeline(path_or_run_id: str, runs_dir: Path) -> tuple[RunReport, OrchestrationPlan | None]:
    """A report and, when its journal is at hand, its plan (for the critical path).

    Accepts a report JSON file (`teamorch run --json`), a run id in `runs_dir`,
    or a run directory / its `events.jsonl`. A report file whose run also has a
    journal in `runs_dir` gets the journal's plan, so the critical path follows
    the real dependency edges.
    """
    candidate = Path(path_or_run_id).expanduser()
    if candidate.is_file() and candidate.name != EVENTS_FILE:
        report = _report_from_file(candidate)
        journaled = (Path(runs_dir) / report.run_id / EVENTS_FILE).is_file()
        return report, RunJournal.open(runs_dir, report.run_id).plan() if journaled else None
    directory = _journal_dir(path_or_run_id, runs_dir)
    if directory is None:
        raise ConfigError(
            f"{path_or_run_id!r} is neither a report JSON file (teamorch run --json) nor a run in {Path(runs_dir).absolute()}",
            field="REPORT_OR_RUN_ID",
        )
    journal = RunJournal.open(directory.parent, directory.name)
    return journal.rebuild_report(), journal.plan()
