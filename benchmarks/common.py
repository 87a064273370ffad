"""Shared plumbing for the benchmarks: a simulator fleet in its own process, Ray, tables.

Why the simulators run in a separate process: the client under test (LiteLLM's
Router in the driver, or teamorch's actors) burns CPU, and simulators sharing a
GIL with it would pace tokens late, charging the client's overhead to the
"servers". A child process keeps service times what the config says they are,
on both sides of every comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from teamorch.config import TeamConfig
from teamorch.sim import SimConfig

MODEL = "gemma3:270m"
SIM_NOTE = (
    "Servers are teamorch's Ollama-API simulator (teamorch.sim: real HTTP on 127.0.0.1 with Ollama's "
    "slots/queue/503 rules and configured tokens/s), NOT real Ollama."
)
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ the fleet


class Fleet:
    """Simulator servers served by one child process (`python -m benchmarks.common`).

    Use as a context manager; `urls` maps server name to its loopback URL.
    Counters are read and reset over HTTP (`/sim/stats`, `/sim/reset`), exactly
    as any client of a running simulator would.
    """

    def __init__(self, configs: Sequence[SimConfig]) -> None:
        self.configs = {c.name: c for c in configs}
        self.urls: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._http = httpx.Client(timeout=10.0)

    def __enter__(self) -> Fleet:
        payload = json.dumps([c.model_dump() for c in self.configs.values()])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.common"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(payload + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("simulator fleet process exited before printing its URLs")
        self.urls = json.loads(line)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # EOF tells the child to close its servers and exit
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        """The simulators' process, while the fleet is up (its CPU is the servers', not the client's)."""
        return self._proc.pid if self._proc is not None else None

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: self._http.get(f"{url}/sim/stats").json() for name, url in self.urls.items()}

    def reset(self, reload: bool = True) -> None:
        """Zero every counter; with `reload`, also restore each server's configured loaded-model set.

        Restoring `loaded` matters: a run that made a cold server load its model
        would otherwise hand the next run a warm server.
        """
        for name, url in self.urls.items():
            if reload:
                cfg = self.configs[name]
                self._http.post(f"{url}/sim/config", json={"loaded": cfg.loaded}).raise_for_status()
            self._http.post(f"{url}/sim/reset").raise_for_status()


def _serve_from_stdin() -> None:
    """Child side of `Fleet`: read configs, serve, print URLs, stop at stdin EOF."""
    import asyncio

    from teamorch.sim import SimServer

    configs = [SimConfig.model_validate(c) for c in json.loads(sys.stdin.readline())]

    async def main() -> None:
        servers = [SimServer(c) for c in configs]
        for server in servers:
            await server.start()
        print(json.dumps({s.config.name: s.url for s in servers}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for server in servers:
            await server.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------ Ray, teams


def no_options(module: str, doc: str | None) -> None:
    """For a benchmark that takes no options: `--help` prints what it measures and exits, anything else is an
    error (exit 2), instead of starting a run of many minutes with the argument ignored."""
    first = (doc or "").strip().splitlines()
    argparse.ArgumentParser(prog=f"python -m {module}", description=first[0] if first else None).parse_args()


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU seconds (user + system, every thread, Ray's own included) process `pid` has used so far (Linux /proc;
    0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def ensure_ray() -> None:
    """One local Ray instance per benchmark process (starting one costs ~6 s; every benchmark reuses it)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace="teamorch-bench",
            log_to_driver=False,
            logging_level="ERROR",
        )


def sim_team(
    fleet: Fleet,
    specialists: list[dict[str, Any]],
    policy: str = "peak_ewma",
    names: Iterable[str] | None = None,
) -> TeamConfig:
    """A team whose servers are the fleet's simulators, with `slots` = each simulator's slots."""
    chosen = list(names) if names is not None else list(fleet.urls)
    return TeamConfig.model_validate(
        {
            "servers": [{"name": n, "url": fleet.urls[n], "slots": fleet.configs[n].slots} for n in chosen],
            "default_model": MODEL,
            "specialists": specialists,
            "balancer": {"policy": policy},
        }
    )


# ------------------------------------------------------------------------------ numbers, tables


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values. No interpolation: p99 of 200 is a real sample."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def slot_gap_ms(stats: dict[str, dict[str, Any]]) -> float:
    """Median idle time (ms) of a slot between two requests, pooled over the fleet, as the servers saw it.

    From each simulator's own log of when a slot went idle and when it was
    taken again (`slot_gap_seconds` in `/sim/stats`), so it is the server's
    truth, not the router's.
    """
    return percentile([g for s in stats.values() for g in s["slot_gap_seconds"]], 50) * 1e3


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (also valid Markdown), so the README can paste it verbatim."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]
    body = [
        "| "
        + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        + " |"
        for r in cells
    ]
    return "\n".join([line, rule, *body]) + "\n"  # Markdown needs a blank line to end a table


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def machine_info() -> dict[str, str]:
    """What the README must record about where the numbers came from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ray

    info = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        info["litellm"] = version("litellm")
    except Exception:  # the bench extra is optional for overhead/speedup
        info["litellm"] = "not installed"
    return info


if __name__ == "__main__":
    _serve_from_stdin()
