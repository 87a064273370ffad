"""`make bench`: overhead, speedup, routing quality and prefix/model-aware routing, in one process on one Ray instance.

One process so the ~6 s Ray start is paid once; each benchmark starts and
stops its own coordinators and simulator fleet. Every figure printed is
measured in this run; nothing is asserted (a benchmark that fails on a slow
machine teaches nothing, a printed ratio does).

    .venv/bin/python -m benchmarks.run_all [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import embedded_prefix, overhead, prefix, priority, routing, scale, speedup, startup, tail
from benchmarks.common import SIM_NOTE, ensure_ray, machine_info, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables (Markdown) to this file")
    args = parser.parse_args(argv)

    began = time.monotonic()
    ensure_ray()
    info = machine_info()
    header = "\n".join(
        [
            "# teamorch benchmarks",
            SIM_NOTE,
            "",
            table(["machine", "value"], [[k, v] for k, v in info.items()]),
            "",
            "Command: " + " ".join([Path(sys.executable).name, "-m", "benchmarks.run_all", *(argv or sys.argv[1:])]),
        ]
    )
    print(header, flush=True)
    sections = [header]
    for name, module in (
        ("overhead", overhead),
        ("speedup", speedup),
        ("routing", routing),
        ("prefix", prefix),
        ("embedded prefix", embedded_prefix),
        ("tail", tail),
        ("scale", scale),
        ("priority", priority),
        ("startup", startup),
    ):
        print(f"\n... running {name}", flush=True)
        started = time.monotonic()
        result = module.main()
        sections.append(result["text"] + f"\n\n({name}: {time.monotonic() - started:.0f} s)")
    footer = f"\nTotal wall time: {time.monotonic() - began:.0f} s"
    print(footer, flush=True)
    sections.append(footer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(sections) + "\n", encoding="utf-8")
        print(f"tables written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
