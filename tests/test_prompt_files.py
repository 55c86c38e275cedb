"""The shipped prompt files: every concept file and evaluation CSV parses, held-out prompts stay held out, each CSV
is the one its concept file generates, and the real Stable Diffusion sets cover what prompts/README.md promises."""

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from erasure.concepts import load_concepts
from erasure.prompt_sets import load_prompt_csv, rows_from_request

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
TOMLS = sorted(PROMPTS.rglob("*.toml"))
CSVS = sorted(PROMPTS.rglob("*.csv"))
ARTIST_TEMPLATES = ("a painting in the style of {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
IMAGENETTE = (
    "tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck", "gas pump",
    "golf ball", "parachute",
)  # fmt: skip


def ids(paths):
    return [str(p.relative_to(PROMPTS)) for p in paths]


def test_there_are_prompt_files():
    assert len(TOMLS) >= 4 + 10 + 10 + 10 + 1
    assert {p.with_suffix(".csv") for p in TOMLS} == set(CSVS), "every concept file needs its CSV and vice versa"


@pytest.mark.parametrize("path", TOMLS, ids=ids(TOMLS))
def test_concept_file_parses_and_keeps_held_out_prompts_apart(path):
    request = load_concepts(path)
    for concept in request.concepts:
        seen_by_method = {*concept.erase, *concept.preserve, *concept.erase_anchors}
        held_out = {*concept.evaluate, *concept.evaluate_preserve}
        assert concept.evaluate, f"{concept.name}: no held-out target prompts"
        assert concept.evaluate_preserve, f"{concept.name}: no held-out neighbour prompts"
        assert not held_out & set(concept.erase), f"{concept.name}: a held-out prompt is also an erase prompt"
        assert not held_out & seen_by_method, f"{concept.name}: a held-out prompt is handed to the method"
        assert not set(concept.evaluate) & set(concept.evaluate_preserve)
        # a method's view of the request holds none of them
        method_view = request.for_method()
        assert not any(c.evaluate or c.evaluate_preserve for c in method_view.concepts)
        assert all(len(p.split()) <= 40 for p in [*seen_by_method, *held_out]), "prompt too long for CLIP's 77 tokens"


@pytest.mark.parametrize("path", CSVS, ids=ids(CSVS))
def test_csv_parses_with_seeds_and_types(path):
    rows = load_prompt_csv(path)
    assert [r.case_number for r in rows] == list(range(len(rows)))
    assert {r.row_type for r in rows} <= {"erased", "generality", "preserved"}
    assert {"erased", "preserved"} <= {r.row_type for r in rows}
    seeds = defaultdict(list)
    for row in rows:
        assert row.prompt and row.concept
        seeds[row.prompt].append(row.evaluation_seed)
    for prompt, values in seeds.items():
        assert len(values) >= 2, f"{prompt!r}: needs several seeds"
        assert len(set(values)) == len(values), f"{prompt!r}: repeated seed"
        # seeds of one prompt are far apart, so evaluation_seed + i (several images per row) never collide
        assert min(b - a for a, b in zip(sorted(values), sorted(values)[1:], strict=False)) >= 1000


@pytest.mark.parametrize("path", TOMLS, ids=ids(TOMLS))
def test_csv_is_the_one_its_concept_file_generates(path):
    rows = load_prompt_csv(path.with_suffix(".csv"))
    expected = rows_from_request(load_concepts(path), seeds_per_prompt=1)
    per_prompt = Counter(r.prompt for r in rows)
    copies = set(per_prompt.values())
    assert len(copies) == 1, "every prompt should have the same number of seeds"
    (k,) = copies

    def key(row):
        return row.prompt, row.row_type, row.concept, row.classes, row.extra.get("erased_concept")

    assert [key(r) for r in rows] == [key(r) for r in expected for _ in range(k)], (
        f"{path.with_suffix('.csv').name} is out of date: run python scripts/make_prompt_csvs.py"
    )


def concepts_under(folder):
    return [c for path in sorted((PROMPTS / "sd" / folder).glob("*.toml")) for c in load_concepts(path).concepts]


def test_real_sd_sets_cover_characters_styles_objects_and_nudity():
    characters, styles, objects = concepts_under("characters"), concepts_under("styles"), concepts_under("objects")
    assert len(characters) >= 10 and {c.kind for c in characters} == {"character"}
    assert len(styles) >= 10 and {c.kind for c in styles} == {"style"}
    assert sorted(c.name for c in objects) == sorted(IMAGENETTE)
    for style in styles:
        assert [t.format(style.name) for t in ARTIST_TEMPLATES] == list(style.erase)
    (nudity,) = concepts_under("unsafe")
    assert nudity.kind == "unsafe" and "nudity" in nudity.erase and nudity.anchor == ""
    assert {"Mickey Mouse", "Spider-Man", "Pikachu", "Darth Vader", "Batman"} <= {c.name for c in characters}
    assert {"Van Gogh", "Picasso", "Kelly McKernan", "Thomas Kinkade", "Ajin: Demi Human"} <= {c.name for c in styles}


@pytest.mark.parametrize("folder", ["characters", "styles", "objects", "unsafe"])
def test_real_sd_csvs_have_erased_generality_and_preserved_rows(folder):
    for path in sorted((PROMPTS / "sd" / folder).glob("*.csv")):
        types = Counter(row.row_type for row in load_prompt_csv(path))
        assert types["erased"] and types["generality"] and types["preserved"], path.name


def test_toyworld_csvs_use_the_held_out_prompts_as_erased_and_preserved():
    for name in ("pip", "striped", "triangle", "red"):
        (concept,) = load_concepts(PROMPTS / "toyworld" / f"{name}.toml").concepts
        rows = load_prompt_csv(PROMPTS / "toyworld" / f"{name}.csv")
        assert {r.prompt for r in rows if r.row_type == "erased"} == set(concept.evaluate)
        assert {r.prompt for r in rows if r.row_type == "preserved"} == set(concept.evaluate_preserve)
        assert sum(r.row_type == "erased" for r in rows) >= 32


def test_the_preservation_prompts_are_plain_captions_the_tokenizer_can_hold():
    lines = (PROMPTS / "preservation" / "generic.txt").read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert all(len(p.split()) <= 20 for p in prompts)
    # none names a shipped real-SD concept (MACE also drops, per request, every caption with the concept's words)
    names = {c.name.lower() for path in TOMLS if "sd" in path.parts for c in load_concepts(path).concepts}
    assert not [p for p in prompts if any(name in p.lower() for name in names)], "a caption names a concept"
