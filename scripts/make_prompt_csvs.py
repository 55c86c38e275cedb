"""Write the evaluation CSV beside every concept file under prompts/ (``pip.toml`` -> ``pip.csv``).

The concept file is the source: its held-out ``evaluate`` and ``evaluate_preserve`` prompts become rows with
:func:`erasure.prompt_sets.rows_from_request` (type ``erased`` when a prompt names the concept, ``generality`` when
it describes it without naming it, ``preserved`` for the neighbours), repeated once per seed.

Seeds: seed ``j`` of a prompt is ``1000 * j + crc32(prompt) % 1000``. Different prompts thus get different seeds
(no row shares its noise with every other row), the same prompt keeps its seeds when other prompts are added, and
the seeds of one prompt are 1000 apart, so an evaluator that draws image ``i`` of a row with ``evaluation_seed + i``
never repeats another row's seed of that prompt for up to 1000 images per row.

Seeds per prompt: 3 for the real Stable Diffusion sets (512-pixel images are expensive); in the toy world enough
for at least 32 erased images per concept file (at least 2).

Usage::

    python scripts/make_prompt_csvs.py            # rewrite every CSV
    python scripts/make_prompt_csvs.py --check    # exit 1 if a CSV is missing or out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import zlib
from pathlib import Path

from erasure.concepts import load_concepts
from erasure.prompt_sets import PromptRow, rows_from_request, save_prompt_csv

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
SD_SEEDS_PER_PROMPT = 3
TOY_MIN_ERASED_IMAGES = 32


def prompt_seed(prompt: str, j: int) -> int:
    """Seed ``j`` of ``prompt``: ``1000 * j + crc32(prompt) % 1000``."""
    return 1000 * j + zlib.crc32(prompt.encode("utf-8")) % 1000


def seeds_per_prompt(toml: Path) -> int:
    """3 for real SD sets; in the toy world, enough for 32 erased images (at least 2)."""
    if "toyworld" not in toml.parts:
        return SD_SEEDS_PER_PROMPT
    rows = rows_from_request(load_concepts(toml), seeds_per_prompt=1)
    erased = sum(row.row_type == "erased" for row in rows)
    return max(2, math.ceil(TOY_MIN_ERASED_IMAGES / max(erased, 1)))


def rows_for(toml: Path) -> list[PromptRow]:
    """The evaluation rows of one concept file, with spread seeds."""
    rows = rows_from_request(load_concepts(toml), seeds_per_prompt=seeds_per_prompt(toml))
    seen: dict[tuple[str, str], int] = {}
    out = []
    for row in rows:
        key = (row.extra.get("erased_concept", ""), row.prompt)
        j = seen.get(key, 0)
        seen[key] = j + 1
        out.append(dataclasses.replace(row, evaluation_seed=prompt_seed(row.prompt, j)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every CSV is up to date")
    args = parser.parse_args(argv)
    stale = []
    for toml in sorted(PROMPTS.rglob("*.toml")):
        target = toml.with_suffix(".csv")
        rows = rows_for(toml)
        if args.check:
            with tempfile.TemporaryDirectory() as folder:
                fresh = save_prompt_csv(rows, Path(folder) / target.name).read_text(encoding="utf-8")
            if not target.is_file() or target.read_text(encoding="utf-8") != fresh:
                stale.append(target)
            continue
        save_prompt_csv(rows, target)
        print(f"{target.relative_to(PROMPTS.parent)}: {len(rows)} rows")
    for target in stale:
        print(f"out of date: {target.relative_to(PROMPTS.parent)} (run python scripts/make_prompt_csvs.py)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
