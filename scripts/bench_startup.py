"""Start-up cost of the command line: wall time of ``erasure --help`` and of a UCE erasure on the toy checkpoint.

Each command runs in a fresh process, ``--repeats`` times, and the best time is kept (the least disturbed by
other work on the machine), as wall time and as CPU time (the child's user + system seconds, which a busy machine
disturbs far less). ``--compare DIR`` also times a second checkout (e.g. a ``git worktree`` of an older
commit) in the same run, alternating the two, and prints the ratios. The floor is timed in the same run: a bare
interpreter, and one that imports torch (every erasure imports torch: the edit is torch tensors), with the largest
ratio against the compared checkout that any start-up work could reach while torch is imported.

Example::

    git worktree add /tmp/old HEAD~5
    python scripts/bench_startup.py --compare /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_timed(command: list[str], **kwargs) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one child process.

    CPU is the child's user + system time, which other work on a busy machine disturbs far less than the wall time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def keep_best(table: dict[str, float], label: str, seconds: float) -> None:
    """Keep the smallest time seen for ``label`` (the run least disturbed by other work)."""
    table[label] = min(table.get(label, float("inf")), round(seconds, 3))


def timed(checkout: Path, argv: list[str]) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of ``python -m erasure ARGV`` run from ``checkout``'s package."""
    env = os.environ | {"PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    return run_timed([sys.executable, "-m", "erasure", *argv], cwd=checkout, env=env)


def commands(model: Path, scratch: Path) -> dict[str, list[str]]:
    """The measured command lines."""
    return {
        "help": ["--help"],
        "erase uce": [
            "erase",
            "uce",
            "--model",
            str(model),
            "--prompt",
            "Pip",
            "--out",
            str(scratch / "uce"),
            "--no-progress",
        ],  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "checkpoints/toyworld-sd", help="toy pipeline folder")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time in the same run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per command; the best is kept")
    args = parser.parse_args(argv)
    checkouts = {"this": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
    best: dict[str, dict[str, float]] = {name: {} for name in checkouts}  # wall seconds
    best_cpu: dict[str, dict[str, float]] = {name: {} for name in checkouts}  # user + system seconds
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():  # alternate, so load on the machine hits both alike
                scratch = Path(folder) / name
                scratch.mkdir(exist_ok=True)
                for label, command in commands(args.model.resolve(), scratch).items():
                    shutil.rmtree(scratch / "uce", ignore_errors=True)  # every erase writes a fresh folder
                    wall, cpu = timed(checkout, command)
                    keep_best(best[name], label, wall)
                    keep_best(best_cpu[name], label, cpu)
        floor: dict[str, float] = {}  # what no erasure code can go below: the interpreter, and it with torch
        floor_cpu: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, code in (("python", "pass"), ("python + import torch", "import torch")):
                wall, cpu = run_timed([sys.executable, "-c", code])
                keep_best(floor, label, wall)
                keep_best(floor_cpu, label, cpu)
    report: dict = {
        "best_seconds": best, "best_cpu_seconds": best_cpu, "floor_seconds": floor, "floor_cpu_seconds": floor_cpu,
        "repeats": args.repeats,
    }  # fmt: skip
    if args.compare:
        for kind, times, floors in (("", best, floor), ("cpu_", best_cpu, floor_cpu)):
            ratio = {k: round(times["compare"][k] / times["this"][k], 2) for k in times["this"]}
            report[f"{kind}ratio_compare_over_this"] = ratio
            # the best ratio any start-up work could reach while the command still imports torch
            torch_floor = floors["python + import torch"]
            reach = {k: round(times["compare"][k] / torch_floor, 2) for k in times["compare"]}
            report[f"{kind}largest_reachable_ratio"] = reach
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
