"""Bad input fails fast and says where: every case exits 2 naming the file, the field and the value,
before any model call (the simulator the team points at counts no request) and before Ray starts
(this module is in the fast lane, which fails if anything imports Ray)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from teamorch import cli
from teamorch.journal import RunJournal
from teamorch.sim import SimConfig, SimServer


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(name="box")) as server:
        yield server


@dataclass
class Files:
    """One case's working directory: a valid plan and team to spoil, and where runs go."""

    root: Path
    sim_url: str

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def plan(self, **changes: Any) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "problem": "review the code",
            "tasks": [
                {"task_id": "find", "specialist": "Analyst"},
                {"task_id": "fix", "specialist": "Analyst", "depends_on": ["find"]},
            ],
        }
        return {**plan, **changes}

    def team(self, **changes: Any) -> dict[str, Any]:
        team: dict[str, Any] = {
            "servers": [{"name": "box", "url": self.sim_url, "models": ["gemma3:270m"]}],
            "default_model": "gemma3:270m",
            "specialists": [{"name": "Analyst"}],
        }
        return {**team, **changes}

    def write(self, name: str, content: Any) -> str:
        path = self.root / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return str(path)

    def run(self, plan: Any = None, team: Any = None, *extra: str) -> list[str]:
        """`teamorch run` of the plan and team given (the valid ones where None)."""
        plan_file = self.write("plan.yaml", self.plan() if plan is None else plan)
        team_file = self.write("team.yaml", self.team() if team is None else team)
        return ["run", plan_file, "--team", team_file, "--runs-dir", str(self.runs), *extra]

    def journaled(self, run_id: str) -> RunJournal:
        """A run the way `teamorch run` leaves it when its driver dies before anything finished."""
        raw = self.plan()
        self.write("team.yaml", self.team())
        with RunJournal.create(self.runs, run_id, raw, self.team()) as journal:
            return journal


def unwritable(files: Files) -> str:
    """A runs dir nobody can create: under a regular file (root writes through chmod)."""
    blocker = files.root / "a-file"
    blocker.write_text("")
    return str(blocker / "runs")


def edited_plan(files: Files) -> list[str]:
    journal = files.journaled("edited")
    files.write(str(journal.plan_file.relative_to(files.root)), files.plan(problem="review other code"))
    return ["resume", "edited", "--runs-dir", str(files.runs)]


def cycle(files: Files) -> list[str]:
    tasks = [
        {"task_id": "a", "specialist": "Analyst", "depends_on": ["b"]},
        {"task_id": "b", "specialist": "Analyst", "depends_on": ["a"]},
    ]
    return files.run(files.plan(tasks=tasks))


def many_tasks(files: Files) -> list[str]:
    return files.run(files.plan(tasks=[{"task_id": f"t{i}", "specialist": "Analyst"} for i in range(501)]))


def existing_run(files: Files) -> list[str]:
    files.journaled("taken")
    return files.run(None, None, "--run-id", "taken")


# (id, argv for this case, what stderr must name: the file, the field, the value)
Case = tuple[str, Callable[[Files], list[str]], Callable[[Files], list[str]]]
CASES: list[Case] = [
    (
        "plan not YAML",
        lambda f: f.run("tasks: [unclosed\nproblem: x\n"),
        lambda f: ["plan.yaml", "line 2, column 8", "expected ',' or ']'"],
    ),
    ("plan a list", lambda f: f.run("- a\n- b\n"), lambda f: ["plan.yaml", "top level", "got list"]),
    ("team not YAML", lambda f: f.run(None, "servers: {{{"), lambda f: ["team.yaml", "line 1", "invalid YAML"]),
    ("plan file missing", lambda f: ["run", str(f.root / "nope.yaml")], lambda f: ["nope.yaml", "cannot read"]),
    (
        "timeout not a number",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Analyst", "timeout": "soon"}])),
        lambda f: ["plan.yaml", "tasks[0].timeout", "'soon'"],
    ),
    (
        "negative timeout",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Analyst", "timeout": -5}])),
        lambda f: ["plan.yaml", "tasks[0].timeout", "-5"],
    ),
    (
        "slots not a number",
        lambda f: f.run(None, f.team(servers=[{"name": "box", "url": f.sim_url, "slots": "two"}])),
        lambda f: ["team.yaml", "servers[0].slots", "'two'"],
    ),
    (
        "url without scheme",
        lambda f: f.run(None, f.team(servers=[{"name": "box", "url": "box:11434"}])),
        lambda f: ["team.yaml", "servers[0]", "'box:11434'"],
    ),
    (
        "duplicate server names",
        lambda f: f.run(None, f.team(servers=[{"name": "box", "url": f.sim_url}] * 2)),
        lambda f: ["team.yaml", "servers", "duplicate name 'box'"],
    ),
    (
        "unset header secret",
        lambda f: f.run(
            None, f.team(servers=[{"name": "box", "url": f.sim_url, "headers": {"X-Key": "${NOPE_UNSET}"}}])
        ),
        lambda f: ["team.yaml", "servers[0].headers.X-Key", "NOPE_UNSET"],
    ),
    ("unknown plan key", lambda f: f.run(f.plan(taks=[])), lambda f: ["plan.yaml", "taks", "Extra inputs"]),
    (
        "unknown specialist",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Ghost"}])),
        lambda f: ["plan.yaml", "tasks[0].specialist", "'Ghost'"],
    ),
    (
        "unknown server",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Analyst", "server": "nowhere"}])),
        lambda f: ["plan.yaml", "tasks[0].server", "'nowhere'"],
    ),
    (
        "unknown model",
        lambda f: f.run(None, f.team(specialists=[{"name": "Analyst", "model": "llama9:900b"}])),
        lambda f: ["plan.yaml", "specialists[0].model", "'llama9:900b'"],
    ),
    ("dependency cycle", cycle, lambda f: ["plan.yaml", "depends_on", "a -> b -> a"]),
    (
        "duplicate task ids",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Analyst"}] * 2)),
        lambda f: ["plan.yaml", "tasks[1].task_id", "'a'"],
    ),
    (
        "unknown dependency",
        lambda f: f.run(f.plan(tasks=[{"task_id": "a", "specialist": "Analyst", "depends_on": ["zz"]}])),
        lambda f: ["plan.yaml", "tasks[0].depends_on", "'zz'"],
    ),
    ("too many tasks", many_tasks, lambda f: ["plan.yaml", "tasks", "501 tasks; the limit is 500"]),
    (
        "bad success criteria",
        lambda f: f.run(f.plan(success_criteria="most")),
        lambda f: ["plan.yaml", "success_criteria", "'most'"],
    ),
    (
        "synthesis does not import",
        lambda f: f.run(f.plan(synthesis_strategy="no_such_module_xyz:combine")),
        lambda f: ["plan.yaml", "synthesis_strategy", "'no_such_module_xyz:combine'"],
    ),
    (
        "unknown synthesis",
        lambda f: f.run(f.plan(synthesis_strategy="merge_some")),
        lambda f: ["plan.yaml", "synthesis_strategy", "'merge_some'"],
    ),
    (
        "unknown pattern",
        lambda f: f.run({"pattern": "swarm", "problem": "p"}),
        lambda f: ["plan.yaml", "pattern", "'swarm'"],
    ),
    (
        "consensus of one",
        lambda f: f.run({"pattern": "consensus", "problem": "p", "experts": ["Analyst"]}),
        lambda f: ["plan.yaml", "experts", "at least 2"],
    ),
    (
        "item_files match nothing",
        lambda f: f.run(
            {"pattern": "divide_and_conquer", "problem": "p", "specialists": ["Analyst"], "item_files": ["src/*.py"]}
        ),
        lambda f: ["plan.yaml", "item_files[0]", "'src/*.py'"],
    ),
    (
        "context file missing",
        lambda f: f.run(f.plan(context_files={"code": "missing.py"})),
        lambda f: ["plan.yaml", "context_files.code", "missing.py"],
    ),
    ("malformed run id", lambda f: f.run(None, None, "--run-id", "../escape"), lambda f: ["--run-id", "'../escape'"]),
    ("run id taken", existing_run, lambda f: ["--run-id", "'taken'", "teamorch resume taken"]),
    (
        "runs dir not writable",
        lambda f: [*f.run(), "--runs-dir", unwritable(f)],
        lambda f: ["--runs-dir", str(f.root / "a-file" / "runs")],
    ),
    (
        "resume unknown run",
        lambda f: ["resume", "ghost", "--runs-dir", str(f.runs)],
        lambda f: ["'ghost'", str(f.runs)],
    ),
    (
        "resume a run whose plan changed",
        edited_plan,
        lambda f: [str(f.runs / "edited" / "plan.yaml"), "plan_version", "start a new run"],
    ),
]


@pytest.mark.parametrize(("name", "argv", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_file_field_and_value(
    name: str,
    argv: Callable[[Files], list[str]],
    named: Callable[[Files], list[str]],
    sim: SimServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = Files(tmp_path, sim.url)
    args = argv(files)
    asked, journals = sim.stats()["requests"], set(tmp_path.rglob("events.jsonl"))
    assert cli.main(args) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for part in named(files):
        assert part in err, f"{name}: {part!r} not in {err!r}"
    assert sim.stats()["requests"] == asked  # no model call
    assert set(tmp_path.rglob("events.jsonl")) == journals  # no run was started, nor a journal written
