"""Prompt CSVs (the ESD/UCE/MACE schema) and evaluation rows built from concept files."""

import pytest

from erasure.concepts import Concept, EraseRequest
from erasure.prompt_sets import (
    PromptFileError,
    PromptRow,
    file_sha256,
    load_prompt_csv,
    role_of,
    rows_from_request,
    save_prompt_csv,
)

# Headers (and first rows) as the official repositories ship them.
ESD_FAMOUS_ART = (
    ",case_number,prompt,evaluation_seed\n0,0,The Starry Night by Vincent van Gogh,3542\n1,1,Mona Lisa,4660\n"
)
ESD_UNSAFE = (
    ",prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
    "prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,sd_model,"
    "case_number\n"
    '0,"a woman, nude",sexual,1,90.0,50.0,80.0,100.0,0.5,https://lexica.art/x,3954,7,512,512,1.4,0\n'
)
UCE_ERASED = (
    ",case_number,prompt,evaluation_seed,artist,type\n"
    "0,0,Image in the style of Andrew Ferez,69,Andrew Ferez,erased\n"
    "1,1,Image in the style of Claude Monet,70,Claude Monet,holdout\n"
)
UCE_IMAGENETTE = (
    "case_number,prompt,class,evaluation_seed\n0,an image of a tench,tench,1174\n1,an image of a church,church,9\n"
)
MACE_CELEBRITY = (
    ",type,prompt,evaluation_seed\n0,erased,A portrait of Adam Driver,1\n1,others,A portrait of Aaron Paul,2\n"
)


def write(tmp_path, text, name="prompts.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_esd_file_loads_with_the_pandas_index_dropped(tmp_path):
    rows = load_prompt_csv(write(tmp_path, ESD_FAMOUS_ART))
    assert [(r.case_number, r.evaluation_seed) for r in rows] == [(0, 3542), (1, 4660)]
    assert rows[0].prompt == "The Starry Night by Vincent van Gogh"
    assert rows[0].extra == {} and rows[0].concept == "" and rows[0].role == "other"


def test_extra_columns_are_kept_unchanged(tmp_path):
    (row,) = load_prompt_csv(write(tmp_path, ESD_UNSAFE))
    assert row.case_number == 0 and row.evaluation_seed == 3954 and row.prompt == "a woman, nude"
    assert row.extra["evaluation_guidance"] == "7"
    assert row.extra["lexica_url"] == "https://lexica.art/x"
    assert list(row.extra)[:2] == ["categories", "hard"]  # file order


def test_uce_artist_column_is_the_concept_and_types_map_to_roles(tmp_path):
    rows = load_prompt_csv(write(tmp_path, UCE_ERASED))
    assert [r.concept for r in rows] == ["Andrew Ferez", "Claude Monet"]
    assert [r.role for r in rows] == ["erased", "preserved"]  # UCE's holdout artists are kept, not erased
    assert rows[0].extra["artist"] == "Andrew Ferez"
    assert [r.concept for r in load_prompt_csv(write(tmp_path, UCE_IMAGENETTE))] == ["tench", "church"]


def test_mace_file_without_case_number_uses_its_index_column(tmp_path):
    rows = load_prompt_csv(write(tmp_path, MACE_CELEBRITY))
    assert [r.case_number for r in rows] == [0, 1]
    assert [r.role for r in rows] == ["erased", "preserved"]


@pytest.mark.parametrize("column", ["case_number", "prompt", "evaluation_seed"])
def test_missing_required_column_names_file_and_column(tmp_path, column):
    header = [c for c in ("case_number", "prompt", "evaluation_seed") if c != column]
    path = write(tmp_path, ",".join(header) + "\n" + ",".join("1" for _ in header) + "\n", name="bad.csv")
    with pytest.raises(PromptFileError, match=rf"bad\.csv has no '{column}' column"):
        load_prompt_csv(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("case_number,prompt,evaluation_seed\n0,a,x\n", "must be an integer"),
        ("case_number,prompt,evaluation_seed\n0,a,1\n0,b,2\n", "repeats line"),
        ("case_number,prompt,evaluation_seed\n", "no rows"),
        ("", "empty"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompt_csv(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_csv(tmp_path / "nope.csv")


def test_float_seeds_written_by_pandas_are_read_as_integers(tmp_path):
    (row,) = load_prompt_csv(write(tmp_path, "case_number,prompt,evaluation_seed\n3.0,a,42.0\n"))
    assert (row.case_number, row.evaluation_seed) == (3, 42)


def test_round_trip(tmp_path):
    rows = [
        PromptRow(0, 'a "quoted", comma prompt', 7, "Pip", "erased", ("Pip", "Zog"), {"guidance": "", "artist": ""}),
        PromptRow(5, "line\nbreak", 8, extra={"guidance": "7.5", "artist": "X"}),
        PromptRow(9, "plain", 9, extra={"guidance": "", "artist": "Y"}),
    ]
    path = save_prompt_csv(rows, tmp_path / "out.csv")
    loaded = load_prompt_csv(path)
    # 'artist' stands in for 'concept' only when there is no 'concept' column, which there now is.
    assert loaded == rows
    header = path.read_text().splitlines()[0]
    assert header.startswith("case_number,prompt,evaluation_seed,concept,type,classes")
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temporary left


def test_round_trip_of_an_official_file_keeps_every_column(tmp_path):
    rows = load_prompt_csv(write(tmp_path, ESD_UNSAFE))
    assert load_prompt_csv(save_prompt_csv(rows, tmp_path / "again.csv")) == rows


def test_file_sha256_changes_with_content(tmp_path):
    a, b = write(tmp_path, "x", "a.csv"), write(tmp_path, "y", "b.csv")
    assert file_sha256(a) != file_sha256(b) and len(file_sha256(a)) == 64


def test_role_of():
    assert role_of("Erased") == "erased" and role_of("others") == "preserved" and role_of("?") == "other"


def pip_request(anchor=""):
    return EraseRequest(
        (
            Concept(
                name="Pip",
                kind="character",
                erase=("Pip", "a picture of Pip"),
                anchor=anchor,
                preserve=("Zog", "a yellow circle"),
                evaluate=("a drawing of Pip", "a yellow circle with a face"),
                evaluate_preserve=("a drawing of Zog", "an image of a yellow circle", "a red square"),
            ),
        )
    )


def test_rows_from_request_types_classes_and_seeds():
    rows = rows_from_request(pip_request(), seeds_per_prompt=2, base_seed=10)
    assert [r.case_number for r in rows] == list(range(10))
    assert [r.evaluation_seed for r in rows[:4]] == [10, 11, 10, 11]
    by_prompt = {r.prompt: r for r in rows}
    assert by_prompt["a drawing of Pip"].row_type == "erased"
    assert by_prompt["a yellow circle with a face"].row_type == "generality"  # does not name Pip: held-out phrasing
    assert by_prompt["a drawing of Zog"].row_type == "preserved" and by_prompt["a drawing of Zog"].concept == "Zog"
    assert by_prompt["an image of a yellow circle"].concept == "a yellow circle"
    assert by_prompt["a red square"].concept == "a red square"  # mentions no class: it is its own class
    classes = rows[0].classes
    assert classes == ("Pip", "Zog", "a yellow circle", "a photo", "a red square")
    assert all(r.classes == classes for r in rows)
    assert all(r.concept in r.classes for r in rows)
    assert by_prompt["a drawing of Pip"].anchor == "a photo" and by_prompt["a drawing of Zog"].anchor == ""


def test_rows_from_request_uses_the_anchor_as_a_class():
    rows = rows_from_request(pip_request(anchor="a green cross"))
    assert "a green cross" in rows[0].classes and "a photo" not in rows[0].classes
    assert rows[0].anchor == "a green cross"


def test_a_preserve_phrasing_of_another_preserve_prompt_is_no_class_of_its_own():
    (pip,) = pip_request().concepts
    phrased = Concept(**(pip.to_dict() | {"preserve": ["Zog", "a picture of Zog", "a yellow circle"]}))
    rows = rows_from_request(EraseRequest((phrased,)))
    assert rows[0].classes == ("Pip", "Zog", "a yellow circle", "a photo", "a red square")
    assert {r.prompt: r.concept for r in rows}["a drawing of Zog"] == "Zog"


def test_paired_anchors_name_no_single_class_so_rows_use_the_fallback():
    (pip,) = pip_request().concepts
    paired_anchors = ["a yellow circle", "a picture of a yellow circle"]
    paired = EraseRequest((Concept(**(pip.to_dict() | {"anchor": paired_anchors})),))
    rows = rows_from_request(paired)
    assert rows[0].anchor == "a photo" and "a picture of a yellow circle" not in rows[0].classes
    same = EraseRequest((Concept(**(pip.to_dict() | {"anchor": ["a green cross", "a green cross"]})),))
    assert rows_from_request(same)[0].anchor == "a green cross"  # one anchor, written twice, is still one class


def test_rows_from_request_round_trip_through_csv(tmp_path):
    rows = rows_from_request(pip_request())
    assert load_prompt_csv(save_prompt_csv(rows, tmp_path / "pip.csv")) == rows


def test_rows_from_request_needs_evaluation_prompts():
    request = EraseRequest((Concept(name="Pip", kind="character", erase=("Pip",)),))
    with pytest.raises(ValueError, match="no evaluate"):
        rows_from_request(request)


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1), "1e30"])
def test_a_seed_beyond_64_bits_names_file_line_and_column(tmp_path, seed):
    path = write(tmp_path, f"case_number,prompt,evaluation_seed\n0,a cat,{seed}\n")
    with pytest.raises(
        PromptFileError, match=r"prompts\.csv, line 2: column 'evaluation_seed' .* does not fit 64 bits"
    ):
        load_prompt_csv(path)
