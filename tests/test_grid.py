"""Comparison and sample grids: size arithmetic, grouping, labels, cell contents, saving, and the ``grid`` command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.cli import main
from erasure.comparison import folder_columns, select_rows
from erasure.edit import Edit, fingerprint
from erasure.files import save_images
from erasure.generate import generate_paired
from erasure.grid import comparison_grid, comparison_layout, sample_grid, save_grid
from erasure.prompt_sets import PromptRow
from erasure.testing import save_tiny_pipeline, tiny_pipeline


def solid(colour, count, size=64):
    images = np.zeros((count, size, size, 3), np.uint8)
    images[:] = colour
    for i in range(count):  # a distinct mark per image, so cells cannot be confused
        images[i, : 4 + 4 * i, :8] = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    return images


def crop(image, box):
    return np.asarray(image.crop(box))


def has_ink(image, box):
    """Whether the box holds dark (text) pixels."""
    return (crop(image, box).min(axis=-1) < 110).any()


PROMPTS = ["a drawing of Pip", "a drawing of Zog", "an image of Pip", "a yellow circle"]
GROUPS = ["erased", "preserved", "erased", "preserved"]
SEEDS = [3, 4, 5, 6]


@pytest.fixture
def columns():
    return {"base": solid((200, 30, 30), 4), "uce (runs/pip)": solid((30, 30, 200), 4)}


def test_layout_arithmetic():
    layout = comparison_layout(["base", "a", "b"], GROUPS, (64, 64), label_width=200, padding=4, margin=10)
    assert layout.cell == (128, 128)  # 64 px images are doubled
    assert layout.width == 10 + 200 + 4 + 3 * 128 + 2 * 4 + 10
    header_bottom = layout.column_boxes[0][3]
    band = layout.group_boxes["erased"][3] - layout.group_boxes["erased"][1]
    assert layout.height == header_bottom + 4 + 2 * (band + 4) + 4 * (128 + 4) - 4 + 10
    assert set(layout.cell_boxes) == {(r, c) for r in range(4) for c in range(3)}
    for (row, col), (left, top, right, bottom) in layout.cell_boxes.items():
        assert (right - left, bottom - top) == (128, 128)
        assert left == 10 + 200 + 4 + col * 132
        assert top == layout.row_label_boxes[row][1]


@pytest.mark.parametrize(
    ("size", "cell_size", "expected"),
    [((64, 64), None, (128, 128)), ((50, 50), None, (150, 150)), ((200, 200), None, (200, 200)),
     ((512, 512), None, (256, 256)), ((512, 256), None, (512, 256)), ((64, 64), 96, (96, 96))],
)  # fmt: skip
def test_cell_size_rule(size, cell_size, expected):
    assert comparison_layout(["base"], ["erased"], size, cell_size=cell_size).cell == expected


def test_rows_are_grouped_erased_first_keeping_order(columns):
    layout = comparison_layout(list(columns), ["preserved", "erased", "generality", "erased", "other"], (64, 64))
    assert layout.row_order == (1, 3, 2, 0, 4)
    tops = [layout.group_boxes[g][1] for g in ("erased", "generality", "preserved", "other")]
    assert tops == sorted(tops)
    assert layout.group_boxes["erased"][3] <= layout.row_label_boxes[1][1]
    assert layout.row_label_boxes[3][3] <= layout.group_boxes["generality"][1]


def test_comparison_grid_size_cells_and_labels(columns):
    grid = comparison_grid(columns, PROMPTS, GROUPS, SEEDS, title="Pip")
    layout = comparison_layout(list(columns), GROUPS, (64, 64), title="Pip")
    assert grid.size == (layout.width, layout.height)
    for (row, col), box in layout.cell_boxes.items():
        source = list(columns.values())[col][row]
        expected = source.repeat(2, axis=0).repeat(2, axis=1)  # nearest-neighbour doubling
        np.testing.assert_array_equal(crop(grid, box), expected)
    for box in [*layout.column_boxes, *layout.row_label_boxes.values(), layout.title_box]:
        assert has_ink(grid, box)
    for box in layout.group_boxes.values():
        assert (crop(grid, box) != 255).any(axis=-1).mean() > 0.5  # a filled header band
        assert has_ink(grid, box)
    # the space between cells is background
    left, top, right, bottom = layout.cell_boxes[0, 0]
    assert (crop(grid, (right, top, right + 4, bottom)) == 255).all()


def test_comparison_grid_accepts_pil_images_and_no_groups():
    images = [Image.new("RGB", (32, 32), (0, 128, 0)) for _ in range(2)]
    grid = comparison_grid({"base": images}, ["a", "b"])
    layout = comparison_layout(["base"], ["prompts", "prompts"], (32, 32))
    assert grid.size == (layout.width, layout.height)
    assert (crop(grid, layout.cell_boxes[1, 0]) == (0, 128, 0)).all()


def test_comparison_grid_refuses_bad_input(columns):
    with pytest.raises(ValueError, match="one group per prompt"):
        comparison_grid(columns, PROMPTS, GROUPS[:3])
    with pytest.raises(ValueError, match="one seed per prompt"):
        comparison_grid(columns, PROMPTS, GROUPS, SEEDS[:2])
    with pytest.raises(ValueError, match="3 images for 4 prompts"):
        comparison_grid({"base": columns["base"][:3]}, PROMPTS, GROUPS)
    with pytest.raises(ValueError, match="one size"):
        comparison_grid({"base": columns["base"], "big": solid((0, 0, 0), 4, size=32)}, PROMPTS, GROUPS)


def test_sample_grid_size_and_contents():
    images = solid((10, 150, 10), 5)
    grid = sample_grid(images, [f"label {i}" for i in range(5)], columns=3, padding=6)
    assert grid.width == 6 + 3 * (128 + 6)
    rows_height = (grid.height - 6) // 2
    assert grid.height == 6 + 2 * rows_height
    for index in range(5):
        row, col = divmod(index, 3)
        left, top = 6 + col * 134, 6 + row * rows_height
        np.testing.assert_array_equal(
            crop(grid, (left, top, left + 128, top + 128)), images[index].repeat(2, 0).repeat(2, 1)
        )
        assert has_ink(grid, (left, top + 128, left + 128, top + rows_height - 6))  # its label
    unlabelled = sample_grid(images, columns=5)
    assert unlabelled.size == (6 + 5 * 134, 6 + 134)


def test_save_grid_writes_png_and_manifest_atomically(tmp_path, columns):
    grid = comparison_grid(columns, PROMPTS, GROUPS, SEEDS)
    path = save_grid(grid, tmp_path / "out" / "grid.png", {"prompts": PROMPTS, "seeds": SEEDS})
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(grid))
    manifest = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["image"] == "grid.png"
    assert (manifest["width"], manifest["height"]) == grid.size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.json", "grid.png"]
    with pytest.raises(ValueError, match="PNG"):
        save_grid(grid, tmp_path / "grid.jpg")


def test_select_rows_takes_distinct_prompts_per_group():
    table = [("a", "erased"), ("a", "erased"), ("b", "erased"), ("c", "erased"), ("d", "preserved"), ("e", "holdout")]
    rows = [PromptRow(i, prompt, i, row_type=kind) for i, (prompt, kind) in enumerate(table)]
    assert [r.case_number for r in select_rows(rows, per_group=2)] == [0, 2, 4, 5]
    assert [r.case_number for r in select_rows(rows, per_group=None)] == [0, 2, 3, 4, 5]


def first_attn2_key(pipe):
    return next(f"unet.{name}" for name, _ in pipe.unet.named_parameters() if "attn2.to_k" in name)


def test_generate_paired_pairs_seeds_and_restores_the_pipe():
    pipe = tiny_pipeline("sd1")
    key = first_attn2_key(pipe)
    weight = pipe.unet.get_parameter(key[len("unet.") :])
    before = weight.detach().clone()
    edits = {
        "zero": Edit({key: torch.zeros_like(weight)}, {"method": "uce"}),
        "strong": Edit({key: weight.detach() * 3}, {"method": "uce"}),  # large, but within the 10x limit
    }
    out = generate_paired(pipe, edits, ["a cat", "a dog"], [1, 2], steps=2, progress=False)
    assert list(out) == ["base", "zero", "strong"]
    assert out["base"].shape == (2, 64, 64, 3) and out["base"].dtype == np.uint8
    np.testing.assert_array_equal(out["zero"], out["base"])  # same prompt and seed, same weights: same image
    assert not np.array_equal(out["strong"], out["base"])
    assert torch.equal(weight, before)
    with pytest.raises(ValueError, match="base"):
        generate_paired(pipe, {"base": edits["zero"]}, ["a"], [0])


def write_folder(folder, colour, label, count=4):
    types = ["erased", "preserved", "erased", "generality"][:count]
    records = [
        {"case_number": i, "index": 0, "seed": 10 + i, "prompt": f"prompt {i}", "row": {"type": t}}
        for i, t in enumerate(types)
    ]
    save_images(folder, solid(colour, count), records, {"model": label})


def test_folder_columns_and_the_images_command(tmp_path):
    write_folder(tmp_path / "eval" / "images" / "base", (250, 0, 0), "base")
    write_folder(tmp_path / "eval" / "images" / "esd", (0, 0, 250), "esd", count=3)
    columns, prompts, groups, seeds = folder_columns([tmp_path / "eval"])
    assert list(columns) == ["base", "esd"]
    assert prompts == ["prompt 0", "prompt 1", "prompt 2"]  # only images every model has
    assert groups == ["erased", "preserved", "erased"] and seeds == [10, 11, 12]
    assert np.asarray(columns["esd"][2])[40, 40].tolist() == [0, 0, 250]

    out = tmp_path / "grid.png"
    assert main(["grid", "--images", str(tmp_path / "eval"), "--per-group", "1", "--out", str(out)]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["columns"] == ["base", "esd"]
    assert [r["group"] for r in manifest["rows"]] == ["erased", "preserved"]
    box = manifest["layout"]["cell_boxes"][1][1]
    assert np.asarray(Image.open(out).convert("RGB").crop(box))[60, 60].tolist() == [0, 0, 250]
    before = out.read_bytes()
    assert main(["grid", "--images", str(tmp_path / "eval"), "--per-group", "2", "--out", str(out)]) == 1
    assert out.read_bytes() == before  # an existing grid is kept unless --overwrite
    assert (
        main(["grid", "--images", str(tmp_path / "eval"), "--per-group", "2", "--out", str(out), "--overwrite"]) == 0
    )
    assert out.read_bytes() != before


def test_images_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "x.png")
    with pytest.raises(ValueError, match="manifest"):
        folder_columns([tmp_path / "plain"])


def test_grid_command_generates_base_and_edit_with_shared_seeds(tmp_path, capsys):
    model = save_tiny_pipeline(tmp_path / "tiny")
    pipe = tiny_pipeline("sd1")
    key = first_attn2_key(pipe)
    weight = pipe.unet.get_parameter(key[5:]).detach()
    config = {"method": "uce", "base_fingerprint": fingerprint({key: weight})}
    Edit({key: weight * 3}, config).save(tmp_path / "run")
    concept = tmp_path / "pip.toml"
    concept.write_text(
        '[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\npreserve = ["Zog"]\n'
        'evaluate = ["a drawing of Pip"]\nevaluate_preserve = ["a drawing of Zog", "a red circle"]\n'
    )
    out = tmp_path / "grid.png"
    argv = ["grid", "--model", str(model), "--edit", str(tmp_path / "run"), "--concept", str(concept)]
    assert main([*argv, "--steps", "2", "--seed", "7", "--out", str(out)]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["columns"] == ["base", "uce (run)"]
    assert [(r["prompt"], r["group"], r["seed"]) for r in manifest["rows"]] == [
        ("a drawing of Pip", "erased", 7),
        ("a drawing of Zog", "preserved", 8),
        ("a red circle", "preserved", 9),
    ]
    assert manifest["steps"] == 2 and manifest["edits"][0]["method"] == "uce"
    assert Image.open(out).size == (manifest["layout"]["width"], manifest["layout"]["height"])
    assert main(["grid", "--model", str(model), "--out", str(tmp_path / "other.png")]) == 1
    assert "--concept" in capsys.readouterr().err
