"""Does a bare word erase its concept? Prompt expansion measured on toy concepts that have no concept file.

A new user types ``erasure erase uce --model checkpoints/toyworld-sd --prompt WORD``. For each concept word below
(one per kind: a character, a style, a shape, a colour; none has a file in ``prompts/toyworld/``) this script writes
a concept file holding just that: ``erase = [WORD]``, no preserve prompts. Its held-out prompts come from the toy
caption grammar (:mod:`erasure.toyworld.captions`) in the two evaluation templates the erase phrasings never use
("an image of {x}", "a drawing of {x}"): the target is every subject containing the word (up to ``--subjects``,
evenly spread), the neighbours the subjects that share the target's other attributes without the word. Then
``scripts/measure_toyworld_erasure.py`` erases each with every ``--methods`` entry, twice: with the default
expansion (``expand=auto``: the toy grammar's phrasings) and without it (``NAME@off`` with ``expand=off``), and
judges base and edited images with the oracle and the toy CLIP. The table and the JSON (``--out``) are that
script's.

Example::

    python scripts/measure_expansion.py --methods uce --out runs/measure/expansion.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erasure.toyworld.captions import HELD_OUT_TEMPLATES, all_subjects  # noqa: E402
from erasure.toyworld.render import CHARACTERS  # noqa: E402

#: word -> kind: one concept of each kind, none of which has a concept file.
CONCEPTS = {"Zog": "character", "outlined": "style", "cross": "object", "blue": "attribute"}


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def held_out(subjects: list[str]) -> list[str]:
    return [template.format(x=subject) for subject in subjects for template in HELD_OUT_TEMPLATES]


def concept_prompts(word: str, count: int) -> tuple[list[str], list[str]]:
    """Held-out target and neighbour prompts of a toy concept word."""
    subjects = all_subjects()
    if word in CHARACTERS:
        colour, shape = CHARACTERS[word]
        others = [name for name in CHARACTERS if name != word]
        return held_out([word]), held_out([*others, f"a {colour} {shape}"])
    targets = [s for s in subjects if word in s.split() and s not in CHARACTERS]
    neighbours = [s for s in subjects if word not in s.split() and s not in CHARACTERS]
    return held_out(spread(targets, count)), held_out(spread(neighbours, count))


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def write_concept_file(folder: Path, word: str, kind: str, count: int) -> Path:
    """A concept file as a new user's ``--prompt WORD``: the bare word, no preserve prompts, held-out prompts."""
    targets, neighbours = concept_prompts(word, count)
    path = folder / f"{word.lower()}.toml"
    path.write_text(
        "# Written by scripts/measure_expansion.py: the bare word, as `--prompt WORD` gives it.\n[[concept]]\n"
        f'name = "{word}"\nkind = "{kind}"\nerase = ["{word}"]\nanchor = ""\n'
        f"evaluate = {toml_list(targets)}\nevaluate_preserve = {toml_list(neighbours)}\n",
        encoding="utf-8",
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["uce"], help="registered method names")
    parser.add_argument("--words", nargs="+", default=list(CONCEPTS), help=f"concept words of {', '.join(CONCEPTS)}")
    parser.add_argument("--subjects", type=int, default=6, help="target (and neighbour) subjects per concept")
    parser.add_argument("--folder", type=Path, default=REPO / "runs/measure/expansion", help="concept files here")
    parser.add_argument("--out", type=Path, default=REPO / "runs/measure/expansion.json", help="JSON results")
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in args.words if word not in CONCEPTS]
    if unknown:
        parser.error(f"--words {', '.join(unknown)}: choose from {', '.join(CONCEPTS)}")
    args.folder.mkdir(parents=True, exist_ok=True)
    files = [write_concept_file(args.folder, word, CONCEPTS[word], args.subjects) for word in args.words]
    methods = [name for method in args.methods for name in (method, f"{method}@off")]
    settings = [item for method in args.methods for item in ("--set", f"{method}@off.expand=off")]
    spec = importlib.util.spec_from_file_location(
        "measure_toyworld_erasure", REPO / "scripts/measure_toyworld_erasure.py"
    )
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    return measure.main(
        ["--methods", *methods, *settings, "--concepts", *map(str, files), "--out", str(args.out), *rest]
    )


if __name__ == "__main__":
    raise SystemExit(main())
