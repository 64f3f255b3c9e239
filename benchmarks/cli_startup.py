"""How long the `panda` command takes to start, as a user runs it.

Times `panda --help` and `panda recipe validate recipes/demo.toml` through the
installed console script (next to this Python; `python -m panda` if there is
none), prints the median of --runs runs after --warmup untimed ones, and
appends one JSON line to benchmarks/results.jsonl.

    .venv/bin/python benchmarks/cli_startup.py [--runs 15] [--warmup 2]

Goals on the 2-core reference machine (issue 3): --help <= 0.25 s,
validate <= 0.4 s. If one is missed, `python -X importtime -m panda ...` shows
where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.jsonl"

# name -> (arguments, goal in seconds)
COMMANDS: dict[str, tuple[list[str], float]] = {
    "help": (["--help"], 0.25),
    "validate_demo": (["recipe", "validate", "recipes/demo.toml"], 0.4),
}


def panda_command() -> list[str]:
    """The console script installed with this interpreter, else `python -m panda`."""
    script = Path(sys.executable).parent / ("panda.exe" if os.name == "nt" else "panda")
    return [str(script)] if script.exists() else [sys.executable, "-m", "panda"]


def time_once(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:  # timing a failure would measure the wrong thing
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def median_time(command: list[str], runs: int, warmup: int) -> float:
    for _ in range(warmup):  # fill the OS page cache and Python's bytecode cache
        time_once(command)
    return statistics.median(time_once(command) for _ in range(runs))


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    args = parser.parse_args()

    panda = panda_command()
    figures: dict[str, float] = {}
    print(f"command: {' '.join(panda)} (median of {args.runs} runs after {args.warmup} warm-ups)")
    for name, (arguments, goal) in COMMANDS.items():
        seconds = median_time([*panda, *arguments], args.runs, args.warmup)
        figures[f"{name}_s"] = round(seconds, 4)
        verdict = "ok" if seconds <= goal else "MISSED"
        print(f"  panda {' '.join(arguments):<40} {seconds:6.3f} s  (goal <= {goal} s: {verdict})")

    record = {"benchmark": "cli_startup",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "python": platform.python_version(),
              "command": " ".join(Path(p).name for p in panda), "runs": args.runs,
              "warmup": args.warmup, **figures}
    if not args.no_save:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
