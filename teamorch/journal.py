"""The durable run journal: what a run did, on disk, so a dead driver costs no finished LLM call.

A run lives in `<runs_dir>/<run_id>/`: `plan.yaml` and `team.yaml` as the user
wrote them (`${ENV}` stays `${ENV}`, so the copies hold no secret), and
`events.jsonl`, one JSON event per line, append-only. Each append is written,
flushed and fsynced before `append` returns, so whatever the coordinator acts on
(a result handed to dependants, a task counted done) is already durable; only
`tokens_generated` progress is written without an fsync (it is not a fact
anyone acts on, and a run streams many; a machine crash may lose those written
since the last fact, a process crash loses none). A crash can only tear the
last line, which readers ignore and the next writer cuts off; damage anywhere
else is reported with its file and line, never skipped.

The idea is LangGraph's `put_writes`: a checkpointer keeps every finished task's
writes keyed by (task_id, idx) and ignores a second write of the same key, so a
resumed super-step reruns only the tasks that had not finished. Here the key is
the task: a `succeeded` or `failed` result is final and recorded once, whatever
Ray's at-least-once delivery or a restarted actor sends twice; a `cancelled` or
`skipped` result only says what the interrupted session did, and a later
session may record the task again. Attempts are keyed by (session, task,
attempt), because every session's specialists count attempts from 1.

The journal is the source of truth for a run's report: `rebuild_report` derives
the `RunReport` from the events alone, for any session count.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from teamorch.config import ENV_REFERENCE
from teamorch.errors import ConfigError, TeamorchError
from teamorch.messages import OrchestrationPlan, RunReport, SessionSpan, TaskResult
from teamorch.policies.reporting import build_report
from teamorch.policies.synthesis import Strategy

EVENTS_FILE = "events.jsonl"
PLAN_FILE = "plan.yaml"
TEAM_FILE = "team.yaml"
DEFAULT_RUNS_DIR = ".teamorch/runs"
RUNS_DIR_ENV = "TEAMORCH_RUNS_DIR"
REDACTED = "[redacted]"
# Results no later session may replace: the task ran to its end. `cancelled`/`skipped` only describe an interruption.
FINAL_STATUSES = frozenset({"succeeded", "failed"})
# Shorter expansions are not credentials, and scrubbing them ("1", "true") would mangle unrelated text.
MIN_SECRET_LENGTH = 4

_RUN_ID = re.compile(r"^(?!\.)[A-Za-z0-9._-]{1,64}$")


class RunNotFound(ConfigError):
    """No journal for this run id in the runs directory (an input error: the CLI exits 2)."""


class JournalCorrupt(ConfigError):
    """A journal damaged before its last line, which a crash mid-write cannot cause."""


class JournalError(TeamorchError):
    """A journal used against its state: written while read-only, resumed twice at once, resumed when finished."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---- events --------------------------------------------------------------------------------------


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Whether `append` fsyncs the line before returning: a fact the coordinator or a resume acts on must be on
    # disk first; progress need not be (see TokensGenerated).
    durable: ClassVar[bool] = True

    seq: int = 0  # assigned by RunJournal.append: strictly increasing over the whole run
    session: int = 0  # 0: the journal's current session (append fills it in); 1 for the first, +1 per resume
    at: float = Field(default_factory=time.time)  # epoch seconds

    def key(self) -> tuple[Any, ...] | None:
        """What makes two events the same fact; None: every append is a new fact."""
        return None


class RunStarted(_Event):
    """The run as the user gave it. `plan`/`team` are the files' raw mappings: `${ENV}` unexpanded."""

    type: Literal["run_started"] = "run_started"
    run_id: str
    plan: dict[str, Any]
    team: dict[str, Any] | None = None
    plan_version: str  # plan_version(plan): a resumed run must be given the same plan

    def key(self) -> tuple[Any, ...]:
        return (self.type,)


class PlanResolved(_Event):
    """The plan the tasks belong to. Appended before the first task and whenever the plan grows
    (a consensus round, the judge); an LLM-written plan is journaled so a resume never asks again."""

    type: Literal["plan_resolved"] = "plan_resolved"
    plan: OrchestrationPlan


class TaskQueued(_Event):
    """The coordinator handed the task to its specialist; it waits for a server slot until `task_started`."""

    type: Literal["task_queued"] = "task_queued"
    task_id: str
    specialist: str

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session, self.task_id)


class TaskStarted(_Event):
    type: Literal["task_started"] = "task_started"
    task_id: str
    server: str | None = None
    attempt: int = Field(default=1, ge=1)

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session, self.task_id, self.attempt)


class AttemptFailed(_Event):
    type: Literal["attempt_failed"] = "attempt_failed"
    task_id: str
    server: str | None = None
    attempt: int = Field(default=1, ge=1)
    error_class: str  # a messages.ErrorClass, or the exception's class name when no server was involved
    error: str
    seconds: float = 0.0

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session, self.task_id, self.attempt)


class TokensGenerated(_Event):
    """How far one attempt's answer has streamed: sent by its server actor while it generates, at most every
    `policies.progress.REPORT_EVERY` seconds and not at all for a call that ends sooner.

    It is progress, not a fact a resume acts on (nothing reads it back but a
    display), yet it is journaled like every event, so `seq` has no gaps
    whether a reader follows `events()` or reads `events.jsonl`. It is not
    fsynced: the next fact's fsync makes it durable with everything before it,
    so a crash loses at most the progress written since the last fact. The
    journal keeps it only while its attempt runs (its `task_started` is
    journaled, neither its `attempt_failed` nor the task's `task_finished`), so
    a late report never follows the task's end. `tokens` counts streamed
    chunks: one per token from Ollama and llama.cpp (which also counts the
    end-of-text token), while the simulator sends several tokens per chunk (at
    most 20 chunks per answer); the exact count is the result's `tokens`. `tokens_per_second` is the decode rate since the
    first token, `ttft` the seconds from the call to its first token.
    """

    durable: ClassVar[bool] = False

    type: Literal["tokens_generated"] = "tokens_generated"
    task_id: str
    attempt: int = Field(default=1, ge=1)
    server: str
    tokens: int = Field(ge=1)
    tokens_per_second: float = Field(default=0.0, ge=0)
    ttft: float | None = None

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session, self.task_id, self.attempt, self.tokens)


class TaskFinished(_Event):
    type: Literal["task_finished"] = "task_finished"
    result: TaskResult

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session, self.result.task_id)


class RunFinished(_Event):
    """The session's end. `interrupted`: cut short (Ctrl-C, cancel) and resumable, not finished."""

    type: Literal["run_finished"] = "run_finished"
    success: bool
    error: str | None = None
    interrupted: bool = False

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session)


class RunResumed(_Event):
    type: Literal["run_resumed"] = "run_resumed"

    def key(self) -> tuple[Any, ...]:
        return (self.type, self.session)


JournalEvent = Annotated[
    RunStarted
    | PlanResolved
    | TaskQueued
    | TaskStarted
    | AttemptFailed
    | TokensGenerated
    | TaskFinished
    | RunFinished
    | RunResumed,
    Field(discriminator="type"),
]
# What a specialist or a server actor may report while a task runs (`Coordinator.task_event`).
LiveEvent = TaskStarted | AttemptFailed | TokensGenerated
EVENT: TypeAdapter[JournalEvent] = TypeAdapter(JournalEvent)


# Events whose every field is JSON-plain (no plan, no raw mapping): stored without the round trip when no secret
# is to be scrubbed (`RunJournal._stamped`).
_PLAIN_EVENTS = (TaskQueued, TaskStarted, AttemptFailed, TokensGenerated, TaskFinished)


def _plain_plan(event: JournalEvent) -> bool:
    """A `plan_resolved` whose plan holds only JSON values where a plan may hold any object (its `context`, each
    task's `input_data` and `options`): the round trip would rebuild the same plan. It re-validated the whole
    plan, a tenth of the coordinator's CPU per task for a 500-task plan (measured)."""
    if not isinstance(event, PlanResolved):
        return False
    plan = event.plan
    return _json_value(plan.context) and all(_json_value(t.input_data) and _json_value(t.options) for t in plan.tasks)


def _json_value(value: Any) -> bool:
    """`value` is made of exactly JSON's types (dict with str keys, list, str, int, bool, None, finite float),
    so dumping it as JSON and reading it back gives it unchanged."""
    kind = type(value)
    if kind is dict:
        return all(type(k) is str and _json_value(v) for k, v in value.items())
    if kind is list:
        return all(_json_value(v) for v in value)
    if kind is float:
        return math.isfinite(value)
    return kind in (str, int, bool, type(None))


def attempt_events(result: TaskResult) -> list[TaskStarted | AttemptFailed]:
    """The `task_started` and `attempt_failed` facts a finished task's attempts record.

    Appended when the result arrives, so every journal holds them even when no
    specialist reported them live; a live report of the same attempt has the
    same key, so each fact is written once whichever copy comes first.
    """
    events: list[TaskStarted | AttemptFailed] = []
    for number, attempt in enumerate(result.attempts, 1):
        where = {"task_id": result.task_id, "server": attempt.server, "attempt": number}
        events.append(TaskStarted(**where, at=attempt.started_at))
        if attempt.outcome != "ok":
            events.append(
                AttemptFailed(
                    **where,
                    error_class=attempt.outcome,
                    error=attempt.error or attempt.outcome,
                    seconds=max(0.0, attempt.ended_at - attempt.started_at),
                    at=attempt.ended_at,
                )
            )
    return events


# ---- what the journal tells --------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunState(_Model):
    """A run at a glance (`teamorch runs`)."""

    run_id: str
    status: Literal["running", "finished", "interrupted"]
    started_at: float
    sessions: int
    resumed_at: list[float] = Field(default_factory=list)
    done: int  # tasks with a final result (succeeded or failed)
    total: int | None = None  # tasks in the plan; None until the plan is resolved
    success: bool | None = None  # the last session's verdict, if it finished


# ---- run ids, runs directory, secrets ----------------------------------------------------------


def new_run_id(now: float | None = None) -> str:
    """UTC second plus a random suffix: ids sort by start time and two runs in one second differ."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + os.urandom(3).hex()


def validate_run_id(value: str) -> str:
    """A run id names a directory: letters, digits, `-`, `_`, `.`, 1-64 characters, no leading dot."""
    if not _RUN_ID.match(value):
        raise ConfigError(
            f"invalid run id {value!r}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'",
            field="--run-id",
        )
    return value


def resolve_run_id(value: str | None) -> str:
    return new_run_id() if value is None else validate_run_id(value)


def new_run_dir(runs_dir: Path, run_id: str) -> Path:
    """Where a new run's journal goes; an id already used is refused (the CLI asks before Ray starts)."""
    directory = Path(runs_dir) / validate_run_id(run_id)
    if directory.exists():
        raise ConfigError(
            f"run {run_id!r} already exists in {directory.parent}; continue it with `teamorch resume {run_id}`",
            field="--run-id",
        )
    return directory


def resolve_runs_dir(arg: str | None = None, *, writable: bool = True, env: Mapping[str, str] | None = None) -> Path:
    """`--runs-dir`, else $TEAMORCH_RUNS_DIR, else `.teamorch/runs`; absolute, because the coordinator
    actor that writes the journal does not share the driver's working directory.

    With `writable`, the directory is created and checked now, so a bad path fails before any model call.
    """
    env = os.environ if env is None else env
    source: str | None = "--runs-dir"
    if not arg:
        source, arg = (RUNS_DIR_ENV, env[RUNS_DIR_ENV]) if env.get(RUNS_DIR_ENV) else (None, DEFAULT_RUNS_DIR)
    path = Path(arg).expanduser().absolute()
    if writable:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"runs directory {path} cannot be created: {exc.strerror}", field=source) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"runs directory {path} is not writable", field=source)
    return path


def plan_version(plan_raw: Mapping[str, Any]) -> str:
    """A hash of the plan as written. Its `team:` section is left out: the fleet may change between
    sessions (`resume --team`), the work may not."""
    work = {k: v for k, v in plan_raw.items() if k != "team"}
    canonical = json.dumps(work, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced; longest first, so a secret containing another leaves no tail."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def secret_values(raw: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """What the `${VAR}` references under any `headers:` of a raw team or plan expand to in `env`.

    Those are the credentials a server could echo back into an error text. Only
    the variables' values count, not the whole header: `Bearer ${TOKEN}` leaks
    through any text containing the token alone.
    """
    env = os.environ if env is None else env
    found: list[str] = []
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            if key == "headers" and isinstance(value, Mapping):
                refs = [m.group(1) for v in value.values() if isinstance(v, str) for m in ENV_REFERENCE.finditer(v)]
                found += [env[name] for name in refs if len(env.get(name, "")) >= MIN_SECRET_LENGTH]
            else:
                found += secret_values(value, env)
    elif isinstance(raw, list):
        for item in raw:
            found += secret_values(item, env)
    return found


def _redact_tree(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact(str(k), secrets): _redact_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_tree(v, secrets) for v in value]
    return value


# ---- reading ------------------------------------------------------------------------------------


def _parse_line(line: bytes, path: Path, number: int, torn_ok: bool) -> JournalEvent | None:
    where = {"field": f"line {number}", "file": str(path)}
    try:
        payload = json.loads(line)
    except ValueError as exc:
        if torn_ok:
            return None  # the write a crash interrupted
        raise JournalCorrupt(f"not valid JSON ({exc}); only the last line can be torn by a crash", **where) from None
    try:
        return EVENT.validate_python(payload)
    except (ValidationError, TeamorchError) as exc:
        raise JournalCorrupt(f"not a journal event: {exc}", **where) from None


def parse_events(data: bytes, path: Path) -> tuple[list[JournalEvent], int]:
    """The events in a journal's bytes and the offset where the valid part ends (a torn tail starts there)."""
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    events: list[JournalEvent] = []
    offset = good_end = 0
    for index, line in enumerate(lines):
        end = offset + len(line) + (index < len(lines) - 1)
        if line.strip():
            event = _parse_line(line, path, index + 1, torn_ok=index == last)
            if event is None:
                break
            if events and event.seq <= events[-1].seq:
                raise JournalCorrupt(
                    f"seq {event.seq} after seq {events[-1].seq}: two writers or an edited file",
                    field=f"line {index + 1}",
                    file=str(path),
                )
            events.append(event)
            good_end = end
        offset = end
    return events, good_end


def read_events(path: Path) -> list[JournalEvent]:
    """Every event in a journal file; a torn last line is ignored, damage elsewhere raises `JournalCorrupt`."""
    events, _ = parse_events(path.read_bytes(), path)
    if not events or not isinstance(events[0], RunStarted):
        raise JournalCorrupt("the journal does not begin with run_started", field="line 1", file=str(path))
    return events


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable, not only the file's bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def _held_by_writer(path: Path) -> bool:
    """True while a live process holds the journal open for writing (its flock dies with the process)."""
    with path.open("rb") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # closing `probe` releases the shared lock


# ---- the journal --------------------------------------------------------------------------------


def _run_started(
    run_id: str, plan_raw: Mapping[str, Any], team_raw: Mapping[str, Any] | None, at: float | None
) -> JournalEvent:
    started = RunStarted(
        seq=1,
        session=1,
        at=time.time() if at is None else at,
        run_id=run_id,
        plan=dict(plan_raw),
        team=None if team_raw is None else dict(team_raw),
        plan_version=plan_version(plan_raw),
    )
    return EVENT.validate_python(started.model_dump(mode="json"))


class RunJournal:
    """One run's journal. `create` starts a run, `open` reads one, `resume` makes an opened one writable.

    Only one process writes a journal at a time (an exclusive flock on
    `events.jsonl`, released by the OS when the writer dies), which is also how
    `state()` tells a running run from an interrupted one. `append` is
    thread-safe, so a coordinator may call it from `asyncio.to_thread`.
    `in_memory` makes one with no directory: the same events, seq numbers and
    report for a run nobody asked to keep (the Python API's runs).
    """

    def __init__(
        self, run_id: str, directory: Path | None, events: list[JournalEvent], secrets: Iterable[str] | None
    ) -> None:
        self.directory = directory
        self.run_id = run_id
        self.path = None if directory is None else directory / EVENTS_FILE
        self.events = events
        started = self.started
        self.secrets = tuple(
            secret_values(started.plan) + secret_values(started.team) if secrets is None else [s for s in secrets if s]
        )
        self._index()
        self._file: IO[bytes] | None = None
        self._writable = False  # an in-memory journal is writable without a file
        self._lock = threading.Lock()
        self._group: int | None = None  # the thread whose group commit is open, if any
        self._unsynced = False  # a durable event written inside the group, not yet fsynced

    def _index(self) -> None:
        """What `append` checks on every call (duplicate keys, final results, the session), from the events."""
        self._keys = {e.key() for e in self.events} - {None}
        self._session = max(e.session for e in self.events)
        self._final = set(self.finished_results())

    # ---- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        runs_dir: Path,
        run_id: str,
        plan_raw: Mapping[str, Any],
        team_raw: Mapping[str, Any] | None = None,
        *,
        secrets: Iterable[str] | None = None,
        at: float | None = None,
    ) -> RunJournal:
        """Start a new run's journal (session 1), writable. `plan_raw`/`team_raw` are the files' mappings
        before `${ENV}` expansion; `secrets` default to what their header references expand to here."""
        directory = new_run_dir(runs_dir, run_id)
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            new_run_dir(runs_dir, run_id)  # another process took the id since: refused the same way
            raise
        except OSError as exc:
            raise ConfigError(f"cannot create run directory {directory}: {exc.strerror}", field="--runs-dir") from None
        _write_durably(directory / PLAN_FILE, yaml.safe_dump(dict(plan_raw), sort_keys=False, allow_unicode=True))
        if team_raw is not None:
            _write_durably(directory / TEAM_FILE, yaml.safe_dump(dict(team_raw), sort_keys=False, allow_unicode=True))
        journal = cls(run_id, directory, [_run_started(run_id, plan_raw, team_raw, at)], secrets)
        journal._open_writer(fresh=True)
        _fsync_dir(directory)
        _fsync_dir(directory.parent)
        return journal

    @classmethod
    def in_memory(
        cls,
        run_id: str,
        plan_raw: Mapping[str, Any],
        team_raw: Mapping[str, Any] | None = None,
        *,
        secrets: Iterable[str] | None = None,
    ) -> RunJournal:
        """A writable journal that keeps its events in memory only (no directory, nothing to resume)."""
        journal = cls(run_id, None, [_run_started(run_id, plan_raw, team_raw, None)], secrets)
        journal._writable = True
        return journal

    @classmethod
    def open(cls, runs_dir: Path, run_id: str, *, secrets: Iterable[str] | None = None) -> RunJournal:
        """An existing run's journal, read-only (`resume()` to write). Unknown id: `RunNotFound`."""
        directory = Path(runs_dir) / validate_run_id(run_id)
        path = directory / EVENTS_FILE
        if not path.is_file():
            raise RunNotFound(
                f"no run {run_id!r} in the runs directory {Path(runs_dir).absolute()} "
                f"(searched there; `teamorch runs` lists its runs, --runs-dir or ${RUNS_DIR_ENV} picks another)"
            )
        return cls(run_id, directory, read_events(path), secrets)

    def _open_writer(self, fresh: bool = False) -> None:
        """Take the writer's lock; on an existing file, cut a torn tail and reload what is on disk."""
        if self.path is None:
            raise JournalError(f"run {self.run_id!r} was journaled in memory only; there is nothing to resume")
        handle = self.path.open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise JournalError(f"run {self.run_id!r} is being written by another live process") from None
        if fresh:
            handle.write(self._line(self.events[0]))
        else:
            data = self.path.read_bytes()
            self.events, good_end = parse_events(data, self.path)
            self._index()
            handle.truncate(good_end)
            if good_end and data[good_end - 1 : good_end] != b"\n":
                handle.write(b"\n")  # a complete last event whose newline the crash took
        handle.flush()
        os.fsync(handle.fileno())
        self._file = handle
        self._writable = True

    def resume(self, at: float | None = None) -> int:
        """Make this journal writable for a new session; returns the session number."""
        with self._lock:
            self._open_writer()
        if self._finished():
            self.close()
            raise JournalError(f"run {self.run_id!r} already finished; its report is rebuilt from the journal")
        self.append(RunResumed(session=self.session + 1, at=time.time() if at is None else at))
        return self.session

    def close(self) -> None:
        """Stop writing (the events stay readable in memory); releases the writer's lock."""
        with self._lock:
            self._writable = False
            if self._file is not None:
                if self._unsynced:  # closed inside a group: what it wrote is durable all the same
                    os.fsync(self._file.fileno())
                    self._unsynced = False
                self._file.close()  # releases the flock
                self._file = None

    def __enter__(self) -> RunJournal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------------

    def _line(self, event: _Event) -> bytes:
        return (json.dumps(event.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def _stamped(self, event: _Event) -> JournalEvent:
        """The event as it will be stored: session filled in, secrets scrubbed (not from the raw files).

        The JSON round trip (dump, scrub, validate) exists for secrets and for
        the arbitrary objects a plan's context may hold; an event of a task
        with no secret to scrub is stored as given, with its session, which
        is what the round trip would rebuild. It was a sixth of the
        coordinator's CPU per task (measured), duplicates included.
        """
        stamped = event.model_copy(update={"session": event.session or self.session})
        if not self.secrets and (isinstance(stamped, _PLAIN_EVENTS) or _plain_plan(stamped)):
            return stamped
        payload = stamped.model_dump(mode="json", fallback=repr)  # a plan's context may hold any Python object
        if self.secrets and not isinstance(event, RunStarted):  # nothing to scrub: no walk over the plan's tree
            payload = _redact_tree(payload, self.secrets)
        return EVENT.validate_python(payload)

    def append(self, event: JournalEvent) -> JournalEvent | None:
        """Write one event durably (fsynced) before returning it as stored (seq, session, secrets scrubbed).
        None: a duplicate, not written.

        A task's final result is kept once per run, anything else once per key
        (`_Event.key`): the second delivery of a fact is dropped, never recorded twice.
        """
        with self._lock:
            if not self._writable:
                raise JournalError(f"journal of run {self.run_id!r} is open read-only; call resume() to write")
            stored = self._stamped(event)
            key = stored.key()
            if key in self._keys or (isinstance(stored, TaskFinished) and stored.result.task_id in self._final):
                return None
            if isinstance(stored, TokensGenerated) and not self._running(stored):
                return None
            stored = stored.model_copy(update={"seq": self.events[-1].seq + 1})
            if self._file is not None:
                self._file.write(self._line(stored))
                self._file.flush()
                if stored.durable and self._grouping():
                    self._unsynced = True
                elif stored.durable:
                    os.fsync(self._file.fileno())
            self.events.append(stored)
            self._session = max(self._session, stored.session)
            if key is not None:
                self._keys.add(key)
            if isinstance(stored, TaskFinished) and stored.result.status in FINAL_STATUSES:
                self._final.add(stored.result.task_id)
            return stored

    @contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: the events appended inside are written and flushed one by one, in order, and
        fsynced once when the group ends, before anything can act on them.

        An fsync per fact cost each task three (queued, started, finished) and
        held the coordinator's event loop meanwhile; a group is one for all the
        facts of one loop turn (a batch of results, of tasks started, of live
        events). The caller keeps the durability rule by opening a group around
        synchronous code only (no `await` inside): nothing else runs on its
        loop, so no dependant, client or report sees a fact before its fsync.
        Appends from other threads are not grouped (each is fsynced as usual);
        nested groups are one.
        """
        outer = self._group is None
        if outer:
            self._group = threading.get_ident()
        try:
            yield
        finally:
            if outer:
                with self._lock:
                    self._group = None
                    if self._unsynced and self._file is not None:
                        os.fsync(self._file.fileno())
                    self._unsynced = False

    def _grouping(self) -> bool:
        return self._group == threading.get_ident()

    def _running(self, progress: TokensGenerated) -> bool:
        """Whether the attempt `progress` reports on is running, as far as the journal knows: its start
        journaled, its failure and its task's end not. A report that arrives late (it travels from the server
        actor, the result through the specialist) is dropped rather than shown after the end."""
        session, task_id, attempt = progress.session, progress.task_id, progress.attempt
        return (
            ("task_started", session, task_id, attempt) in self._keys
            and ("attempt_failed", session, task_id, attempt) not in self._keys
            and ("task_finished", session, task_id) not in self._keys
            and task_id not in self._final
        )

    # ---- reading -------------------------------------------------------------------------------

    def read(self) -> list[JournalEvent]:
        """The events on disk now (another process may be appending)."""
        return read_events(self._on_disk(self.path))

    def since(self, seq: int) -> list[JournalEvent]:
        """The events after `seq`, in order: a client polling with its last seq misses none and sees none twice."""
        return self.events[bisect.bisect_right(self.events, seq, key=lambda e: e.seq) :]

    def _on_disk(self, path: Path | None) -> Path:
        if path is None:
            raise JournalError(f"run {self.run_id!r} was journaled in memory only")
        return path

    @property
    def started(self) -> RunStarted:
        first = self.events[0]
        assert isinstance(first, RunStarted)  # read_events and create guarantee it
        return first

    @property
    def session(self) -> int:
        """The current session: 1, then one more per resume."""
        return self._session

    @property
    def plan_file(self) -> Path:
        return self._on_disk(self.directory) / PLAN_FILE

    @property
    def team_file(self) -> Path | None:
        path = self._on_disk(self.directory) / TEAM_FILE
        return path if path.is_file() else None

    def check_plan(self, plan_raw: Mapping[str, Any]) -> None:
        """Refuse to continue this run with a plan other than the one it started with."""
        stored, given = self.started.plan_version, plan_version(plan_raw)
        if stored != given:
            raise ConfigError(
                f"run {self.run_id!r} was started from plan version {stored}, but this plan is version {given}; "
                "its journaled results belong to the other plan, so start a new run instead",
                field="plan_version",
                file=str(self.plan_file),
            )

    def plan(self) -> OrchestrationPlan | None:
        """The latest resolved plan, None if the run died before resolving one."""
        return next((e.plan for e in reversed(self.events) if isinstance(e, PlanResolved)), None)

    def finished_results(self) -> dict[str, TaskResult]:
        """Results a resumed run takes as they are (succeeded or failed): never sent to a server again."""
        final: dict[str, TaskResult] = {}
        for event in self.events:
            if isinstance(event, TaskFinished) and event.result.status in FINAL_STATUSES:
                final.setdefault(event.result.task_id, event.result)
        return final

    def results(self) -> dict[str, TaskResult]:
        """Every task's latest result, a final one taking precedence over a later interruption's."""
        latest = {e.result.task_id: e.result for e in self.events if isinstance(e, TaskFinished)}
        return {**latest, **self.finished_results()}

    def _session_end(self) -> RunFinished | None:
        """The current session's run_finished, if it wrote one."""
        return next(
            (e for e in reversed(self.events) if isinstance(e, RunFinished) and e.session == self.session), None
        )

    def _finished(self) -> bool:
        end = self._session_end()
        return end is not None and not end.interrupted

    def history(self, until: float | None = None) -> list[SessionSpan]:
        """Each session's span and the tasks whose result it recorded; `until` ends the current one later
        (the moment its run_finished is about to be written)."""
        spans: dict[int, SessionSpan] = {}
        for event in self.events:
            span = spans.setdefault(
                event.session, SessionSpan(session=event.session, started_at=event.at, ended_at=event.at)
            )
            span.ended_at = max(span.ended_at, event.at)
            if isinstance(event, TaskFinished):
                span.tasks.append(event.result.task_id)
        if until is not None and self.session in spans:
            spans[self.session].ended_at = max(spans[self.session].ended_at, until)
        return [spans[n] for n in sorted(spans)]

    def state(self) -> RunState:
        end = self._session_end()
        status: Literal["running", "finished", "interrupted"] = "finished"
        if not self._finished():
            status = "running" if self._writable or _held_by_writer(self._on_disk(self.path)) else "interrupted"
        plan = self.plan()
        return RunState(
            run_id=self.run_id,
            status=status,
            started_at=self.started.at,
            sessions=self.session,
            resumed_at=[e.at for e in self.events if isinstance(e, RunResumed)],
            done=len(self.finished_results()),
            total=None if plan is None else len(plan.tasks),
            success=None if end is None else end.success,
        )

    def rebuild_report(self, synthesis: Strategy | None = None) -> RunReport:
        """The run's report from the journal alone: every session's results, the time the sessions were alive
        as its duration (not the hours a dead driver lay idle), and which session ran what."""
        end = self._session_end()
        error = (
            end.error
            if end is not None
            else f"run interrupted: session {self.session} ended without finishing (teamorch resume {self.run_id})"
        )
        return self.report(error, synthesis)

    def report(self, error: str | None, synthesis: Strategy | None = None, until: float | None = None) -> RunReport:
        """The report as it stands, the run cut short by `error` (None: it was not) and the current session
        ending at `until`: what the coordinator returns and then journals as run_finished, so that
        `rebuild_report()` afterwards gives the same report."""
        plan = self.plan()
        if plan is None:
            raise JournalError(f"run {self.run_id!r} was interrupted before its plan was resolved; resume it")
        sessions = self.history(until)
        wall = sum(s.ended_at - s.started_at for s in sessions)
        report = build_report(plan, self.run_id, self.results(), wall, error, synthesis)
        report.sessions = sessions
        report.resumed_at = [e.at for e in self.events if isinstance(e, RunResumed)]
        return report


def list_runs(runs_dir: Path) -> list[RunState]:
    """Every run in a runs directory, oldest first (`teamorch runs`)."""
    if not Path(runs_dir).is_dir():
        return []
    states = [
        RunJournal.open(runs_dir, d.name).state()
        for d in Path(runs_dir).iterdir()
        if _RUN_ID.match(d.name) and (d / EVENTS_FILE).is_file()
    ]
    return sorted(states, key=lambda s: (s.started_at, s.run_id))
