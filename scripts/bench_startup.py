"""Start-up cost of the command line: wall time of ``erasure --help`` and of a UCE erasure on the toy checkpoint.

Each command runs in a fresh process, ``--repeats`` times, and the best time is kept (the least disturbed by
other work on the machine). ``--compare DIR`` also times a second checkout (e.g. a ``git worktree`` of an older
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(checkout: Path, argv: list[str]) -> float:
    """Seconds of wall time of ``python -m erasure ARGV`` run from ``checkout``'s package."""
    env = os.environ | {"PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "erasure", *argv], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


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
    best: dict[str, dict[str, float]] = {name: {} for name in checkouts}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():  # alternate, so load on the machine hits both alike
                scratch = Path(folder) / name
                scratch.mkdir(exist_ok=True)
                for label, command in commands(args.model.resolve(), scratch).items():
                    shutil.rmtree(scratch / "uce", ignore_errors=True)  # every erase writes a fresh folder
                    seconds = timed(checkout, command)
                    best[name][label] = min(best[name].get(label, float("inf")), round(seconds, 3))
        floor = {}  # what no erasure code can go below: the interpreter, and the interpreter with torch
        for _ in range(args.repeats):
            for label, code in (("python", "pass"), ("python + import torch", "import torch")):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                floor[label] = min(floor.get(label, float("inf")), round(time.perf_counter() - started, 3))
    report: dict = {"best_seconds": best, "floor_seconds": floor, "repeats": args.repeats}
    if args.compare:
        report["ratio_compare_over_this"] = {k: round(best["compare"][k] / best["this"][k], 2) for k in best["this"]}
        # the best ratio any start-up work could reach while the command still imports torch
        torch_floor = floor["python + import torch"]
        report["largest_reachable_ratio"] = {k: round(best["compare"][k] / torch_floor, 2) for k in best["compare"]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
